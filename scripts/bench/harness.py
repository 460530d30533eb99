"""Serving and timing, for every bench of this package: a FUSE daemon in a session of its own, timed from
its command's start until the image reads, killed by a watchdog when a read hangs; timed reads and commands;
a scratch directory that keeps nothing mounted.
"""

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from kit.mounts import MountError, finish, kill_group, start_daemon, status_kib, unmount

from tarfuse.serve import mountinfo

CHUNK = 1 << 20  # the request size of sequential reads
GRACE_S = 10.0  # past the cap, the watchdog kills a daemon whose read never returns

ReadInto = Callable[[memoryview, int], int]  # fill the buffer from an image offset; return bytes read


class ToolFailed(Exception):
    """The tool did not serve the image (exited, refused, unreadable); the message says how."""


class TimedOut(ToolFailed):
    """A step ran past its time cap."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"timed out after {seconds:g} s")


@dataclasses.dataclass
class Served:
    """A served image, valid inside the `with` block that serves it."""

    ready_s: float
    size: int  # the size the tool shows for the image
    read_into: ReadInto
    fio_target: list[str] | None  # fio options naming the bytes to read; None: not applicable
    qemu_source: str | None  # what qemu-img convert reads; None: not applicable
    process: subprocess.Popen[bytes] | None = None  # the daemon, if there is one
    started: float = 0.0  # time.perf_counter() when its command started
    mountpoint: Path | None = None
    aborted: threading.Event = dataclasses.field(default_factory=threading.Event)

    def abort(self) -> None:
        """From another thread (the watchdog): kill the daemon, so reads blocked on it fail at once."""
        if self.process is not None and self.mountpoint is not None:
            self.aborted.set()
            kill_group(self.process)
            with contextlib.suppress(MountError):
                unmount(self.mountpoint)

    def pids(self) -> list[int]:
        """The daemon and all its descendants (workers, helpers such as nbdkit); empty without a daemon."""
        return [] if self.process is None else _with_descendants(self.process.pid)

    def peak_rss(self) -> int:
        """Peak resident memory (VmHWM) of the daemon and its children, in bytes."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, LookupError):  # gone, or a zombie
                total += status_kib(pid, "VmHWM") * 1024
        return total

    def pin(self, cpu: int) -> None:
        """Pin every thread of the daemon and its descendants to `cpu`; threads started later inherit it."""
        for pid in self.pids():  # check=False: a helper that has just exited
            subprocess.run(
                ["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=False, capture_output=True
            )


@contextlib.contextmanager
def serve_fuse(
    argv: Sequence[str], mountpoint: Path, image: Path, cap: float, probe: int = 1
) -> Iterator[Served]:
    """Run the FUSE daemon `argv`, which shows `image` under `mountpoint`, until the block ends; ready when
    the first `probe` bytes of `image` read. ToolFailed if it exits first, TimedOut past `cap`."""
    mountpoint.mkdir(exist_ok=True)
    log = mountpoint.with_suffix(".log")
    start = time.perf_counter()
    process = start_daemon(argv, log, append=True, new_session=True)
    try:

        def exited() -> None:
            if process.poll() is not None:
                raise ToolFailed(f"exited with status {process.returncode}: {_tail(log)}")

        ready = wait_readable(str(image), start, cap, exited, probe)
        with served_path(str(image), ready) as served:
            yield dataclasses.replace(served, process=process, started=start, mountpoint=mountpoint)
    finally:
        with contextlib.suppress(MountError):  # scratch() warns about what stays mounted
            finish(mountpoint, process, grace=10, group=True)


@contextlib.contextmanager
def served_path(path: str, ready: float) -> Iterator[Served]:
    """An image that is a file or a device: read with preadv, by fio with O_DIRECT, by qemu-img by name."""
    with open(path, "rb", buffering=0) as file:
        fd = file.fileno()
        yield Served(ready, os.lseek(fd, 0, os.SEEK_END), lambda buffer, at: os.preadv(fd, [buffer], at),
                     [f"--filename={path}", "--direct=1"], path)  # fmt: skip


def wait_readable(path: str, start: float, cap: float, check: Callable[[], None], size: int = 1) -> float:
    """Poll every millisecond until the first `size` bytes of `path` read; return seconds since `start`."""
    while True:
        with contextlib.suppress(OSError), open(path, "rb", buffering=0) as file:
            if os.pread(file.fileno(), size, 0):
                return time.perf_counter() - start
        check()
        if time.perf_counter() - start > cap:
            raise TimedOut(cap)
        time.sleep(0.001)


def _with_descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.name.isdigit():  # the parent is the second field after the command's ")"
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines()  # start_daemon made it
    return " / ".join(line.strip() for line in text[-lines:]) or "(no output)"


class PssSampler:
    """The peak PSS of a daemon's process tree, sampled every 50 ms while the `with` block runs and once at
    its end; None without a daemon. The tree is looked up once a second: walking /proc costs many samples."""

    def __init__(self, served: Served) -> None:
        self._served, self._done = served, threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)
        self._pids: list[int] = []
        self._pids_at = -1.0
        self.peak: int | None = None

    def _sample(self, fresh: bool = False) -> None:
        if self._served.process is None:
            return
        if fresh or time.monotonic() - self._pids_at >= 1.0:
            self._pids, self._pids_at = self._served.pids(), time.monotonic()
        self.peak = max(self.peak or 0, sum(_pss_kib(pid) for pid in self._pids) * 1024)

    def _run(self) -> None:
        while not self._done.wait(0.05):
            self._sample()

    def __enter__(self) -> "PssSampler":
        self._sample(fresh=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        if not self._served.aborted.is_set():
            self._sample(fresh=True)  # processes started since the last look count too


def _pss_kib(pid: int) -> int:
    # gone, or a zombie (an empty rollup)
    with contextlib.suppress(OSError, ValueError, StopIteration), open(f"/proc/{pid}/smaps_rollup") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
    return 0


@contextlib.contextmanager
def watchdog(served: Served, cap: float) -> Iterator[None]:
    """Kill the daemon if the block takes GRACE_S longer than `cap`: a read stuck in FUSE then fails."""
    timer = threading.Timer(cap + GRACE_S, served.abort)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def read_some(served: Served, buffer: memoryview, offset: int, cap: float) -> int:
    """One read of the served image; a failure is the tool's, or the watchdog's if it struck."""
    try:
        return served.read_into(buffer, offset)
    except OSError as exc:
        if served.aborted.is_set():
            raise TimedOut(cap) from None
        raise ToolFailed(f"read at offset {offset}: {exc.strerror or exc}") from None


def timed_read(served: Served, size: int, cap: float, consume: Callable[[memoryview], object] = len) -> float:
    """Read [0, size) in 1 MiB requests, giving each piece to `consume`; return the seconds it took."""
    buffer = memoryview(bytearray(CHUNK))
    offset = 0
    start = time.perf_counter()
    with watchdog(served, cap):
        while offset < size:
            n = read_some(served, buffer[: min(CHUNK, size - offset)], offset, cap)
            if n <= 0:
                raise ToolFailed(f"read returned {n} at offset {offset} of {size}")
            consume(buffer[:n])
            offset += n
            if time.perf_counter() - start > cap:
                raise TimedOut(cap)
    return time.perf_counter() - start


def latencies(read: Callable[[int], object], offsets: Iterable[int]) -> list[float]:
    """Time `read(offset)` at each offset; return the seconds, sorted."""
    times = []
    for offset in offsets:
        start = time.perf_counter()
        read(offset)
        times.append(time.perf_counter() - start)
    return sorted(times)


def quantile(ordered: Sequence[float], q: float) -> float:
    """The value below which the fraction `q` of the sorted `ordered` lies (p95: q=0.95)."""
    return ordered[int(len(ordered) * q)]


def drop_caches() -> None:
    """As root: write back, then drop the page cache (the tar's and any mount's)."""
    if os.geteuid() == 0:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_timed(
    command: Sequence[str], cap: float, served: Served | None = None, stdout: int = subprocess.PIPE
) -> tuple[float, str]:
    """Run `command` in a process group of its own; return the seconds it took and its output. Past `cap`
    kill the group, and the daemon of `served` (a read stuck in FUSE ends no other way): TimedOut."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=stdout, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        output, errors = process.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        if served is not None:
            served.abort()
        process.communicate()
        raise TimedOut(cap) from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        failed = f"{' '.join(command[:2])} exited with {process.returncode}"
        raise ToolFailed(f"{failed}: {(errors or output or '').strip()[-300:]}")
    return seconds, output or ""


@contextlib.contextmanager
def scratch(prefix: str, parent: str | Path | None = None, keep: bool = False) -> Iterator[Path]:
    """A temporary directory for a run's data and mount points, removed at the end unless `keep`, or a
    mount under it stays (what is mounted is unmounted first)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield workdir
    finally:
        for mountpoint in mountinfo.under(workdir):
            with contextlib.suppress(MountError):
                unmount(mountpoint)
        if mountinfo.under(workdir):
            print(f"warning: mounts left under {workdir}; not deleting it", file=sys.stderr)
        elif keep:
            print(f"data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Run a benchmark: SIGTERM stops it as Ctrl-C does, and either way what it mounted is unmounted."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; everything mounted was unmounted", file=sys.stderr)
        sys.exit(130)
