"""A stop signal, or the main process's death, that comes between a worker's flag check and its read(2):
the worker still ends (tarfuse/serve/workers.py, module docstring).

The machinery is the real one (workers.start, stop_flag, Group.stop, the death signal), around a loop
shaped like a worker's: ask the flag, then a blocking read(2) through ctypes, which returns EINTR to the
loop as libfuse's read does to pyfuse3's (os.read would retry it itself). The "requests" come through a
pipe. Each case runs in a fresh interpreter: workers.start forks, and this process may have threads.
"""

import os
import select
import signal
import subprocess
import sys
import textwrap

import pytest

TIMEOUT = 60.0  # a case that takes longer than this hangs
GRACE_S = 20.0  # Group.stop's SIGKILL deadline in the cases: far longer than a worker needs to end

# A worker's loop, with `window(stopping)` run between the flag check and the read: a signal that comes
# there is spent. `trial` forks one such worker, waits until it is past its first check, and stops the
# group; Group.stop's warning ("did not stop within ... killing it") is printed if it had to kill it.
_PRELUDE = """
import ctypes, logging, os, random, signal, sys, time
from tarfuse.serve import workers

workers.STOP_GRACE_S = GRACE_S
libc = ctypes.CDLL(None, use_errno=True)
logging.basicConfig(level=logging.WARNING, format="WARNING %(message)s", stream=sys.stdout)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # as daemon.mount does before the fork


def serving(requests, window):
    def serve(number):
        stopping = workers.stop_flag((signal.SIGTERM,))
        buffer = ctypes.create_string_buffer(1)
        while not stopping():
            window(stopping)
            libc.read(requests, buffer, 1)
        return 0
    return serve


def trial(window, queued=0):
    requests_r, requests_w = os.pipe()  # the worker holds both ends: its read blocks, never sees EOF
    passed_r, passed_w = os.pipe()
    os.write(requests_w, b"." * queued)

    def passed(stopping):
        os.write(passed_w, b".")
        window(stopping)

    group = workers.start(1, serving(requests_r, passed))
    os.read(passed_r, 1)
    group.stop()
    for fd in (requests_r, requests_w, passed_r, passed_w):
        os.close(fd)


def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
"""

_STOP_IN_THE_WINDOW = """
def signal_comes_now(stopping):
    while not stopping():  # the SIGTERM lands here, between the check and the read
        pass

for _ in range(TRIALS):
    trial(signal_comes_now)
print("done", flush=True)
"""

# The SIGTERM comes while the worker spins for a random time before its read, or once it blocks in it;
# with requests queued, while it reads them. Without the repeat, about one trial in five hangs.
_STOP_AT_RANDOM_MOMENTS = """
rng = random.Random(SEED)
for _ in range(TRIALS):
    delay = rng.uniform(0, 100e-6)
    trial(lambda stopping: spin(delay), queued=rng.randrange(4))
print("done", flush=True)
"""

_MAIN_DIES_IN_THE_WINDOW = """
main = os.getpid()
requests_r, requests_w = os.pipe()
passed_r, passed_w = os.pipe()

def main_dies_now(stopping):
    os.write(passed_w, b".")
    while os.getppid() == main:  # the main process is killed while we are here
        pass

group = workers.start(1, serving(requests_r, main_dies_now))
os.read(passed_r, 1)
print(*group.running, flush=True)
os.read(0, 1)  # until killed
"""


def run_case(body: str, **constants: object) -> str:
    """Run the prelude and `body` with `constants` defined; return its output, which must end in "done"."""
    code = "".join(f"{name} = {value!r}\n" for name, value in {"GRACE_S": GRACE_S, **constants}.items())
    code += textwrap.dedent(_PRELUDE) + textwrap.dedent(body)
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still stopping workers after {TIMEOUT:g} s: several did not end at their SIGTERM")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_stop_signal_that_comes_just_before_the_read_still_ends_the_worker() -> None:
    """The signal is spent before the read blocks, and no request comes after it: only a repeat ends it."""
    output = run_case(_STOP_IN_THE_WINDOW, TRIALS=2)
    assert "WARNING" not in output, output  # "did not stop within ... killing it"
    assert output.endswith("done\n")


def test_stop_signals_at_random_moments_while_reading_and_idle_end_every_worker() -> None:
    output = run_case(_STOP_AT_RANDOM_MOMENTS, TRIALS=60, SEED=20)
    assert "WARNING" not in output, output
    assert output.endswith("done\n")


def test_a_worker_whose_main_process_dies_just_before_its_read_ends() -> None:
    """The death signal comes between the flag check and the read, and no request comes after it."""
    code = f"GRACE_S = {GRACE_S!r}\n" + textwrap.dedent(_PRELUDE) + textwrap.dedent(_MAIN_DIES_IN_THE_WINDOW)
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as main:
        try:
            assert main.stdout is not None
            worker = int(main.stdout.readline())
            watch = os.pidfd_open(worker)  # readable once the worker has ended, reaped or not
        finally:
            main.kill()
    try:
        ended = select.select([watch], [], [], TIMEOUT)[0]
        if not ended:
            os.kill(worker, signal.SIGKILL)
        assert ended, "a worker outlived its main process"
    finally:
        os.close(watch)
