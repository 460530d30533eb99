"""Unmounting while readers are in flight: nothing hangs, the daemon exits 0, nothing stays mounted.

Readers are threads of this process and separate processes (kit.readers), each doing random reads of the
image and checking every byte against the sample image. README: "Exit status: 0 success".
"""

import contextlib
import errno
import gzip
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kit.mounts import Mount, MountFactory, is_mounted
from kit.readers import Job, Readers, Tally
from kit.sample import SampleImage

from tarfuse.serve.daemon import find_mount

pytestmark = pytest.mark.fuse

THREADS = PROCESSES = 3
TIMEOUT = 15.0  # a reader or daemon that takes longer than this hangs


class BusyReaders:
    """Reader threads and processes over one image (kit.readers); `stop` ends them and returns what each
    saw. `asked[n]` counts how often thread reader n asked whether to stop, which it does before each read.
    """

    def __init__(self, readers: Readers, stopping: threading.Event, stop_file: Path) -> None:
        self.readers, self.stopping, self.stop_file = readers, stopping, stop_file
        self.asked = [0] * THREADS

    def stop_asked_by(self, number: int) -> Callable[[], bool]:
        def ask() -> bool:
            self.asked[number] += 1
            return self.stopping.is_set()

        return ask

    def wait_until_each_thread_read_again(self) -> None:
        """Wait until every reader thread has ended, or finished a read that it began after this call.

        Two more questions: the first may come right after a read that began before.
        """
        before = list(self.asked)
        deadline = time.monotonic() + TIMEOUT
        for number in range(THREADS):
            while self.asked[number] < before[number] + 2 and self.readers.thread_alive(number):
                assert time.monotonic() < deadline, f"reader thread {number} made no progress"
                time.sleep(0.01)

    def wait_until_each_ended_by_itself(self) -> list[Tally]:
        """Wait until every reader has stopped at an error of its own, never told to; return the tallies."""
        tallies, lost = self.readers.join(TIMEOUT)
        assert not lost, f"readers go on reading: {lost}"
        return tallies

    def stop(self) -> list[Tally]:
        self.stopping.set()
        self.stop_file.touch()
        tallies, lost = self.readers.join(TIMEOUT)
        assert not lost, lost
        return tallies


@contextlib.contextmanager
def busy_readers(image: Path, sample: SampleImage, workdir: Path, reopen: bool) -> Iterator[BusyReaders]:
    """Start THREADS + PROCESSES readers of `image`, wait until each has read once; stop them at the end."""
    stop_file = workdir / "stop-readers"
    ready = [workdir / f"reader-{n}.ready" for n in range(THREADS + PROCESSES)]
    readers = Readers()
    busy = BusyReaders(readers, threading.Event(), stop_file)
    for seed in range(THREADS + PROCESSES):
        job = Job(str(image), str(sample.path), seed, str(stop_file), ready=str(ready[seed]), reopen=reopen)
        if seed < THREADS:
            readers.start_thread(job, busy.stop_asked_by(seed))
        else:
            readers.start_process(job)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not all(path.exists() for path in ready):
            assert time.monotonic() < deadline, "the readers did not start reading"
            time.sleep(0.01)
        yield busy
    finally:
        busy.stopping.set()
        stop_file.touch()
        readers.kill()


def assert_all_bytes_right(tallies: list[Tally], allowed_errors: set[str], short_ok: bool = False) -> None:
    """No reader saw a wrong byte, an error not in `allowed_errors`, or (unless `short_ok`) a short read."""
    assert len(tallies) == THREADS + PROCESSES
    assert sum(t.wrong for t in tallies) == 0, f"wrong bytes: {tallies}"
    assert short_ok or sum(t.short for t in tallies) == 0, f"short reads: {tallies}"
    errors = {e for t in tallies for e in t.errors}
    assert errors <= allowed_errors, tallies


@pytest.fixture(params=[1, 2], ids=lambda n: f"workers={n}")
def served(
    request: pytest.FixtureRequest, sample_archive: Path, mount: MountFactory, tmp_path: Path
) -> Iterator[Mount]:
    """Every test here runs with one process and with two serving the mount (serve/workers.py); when the
    daemon has ended, none of its workers may be left."""
    (mountpoint := tmp_path / "mnt").mkdir()
    served = mount(sample_archive, mountpoint, "-o", f"workers={request.param}")
    group = _workers_of(served.process.pid, 0 if request.param == 1 else request.param)
    yield served
    if served.process.poll() is not None:
        assert not [pid for pid in group if _is_worker(pid)], "a worker outlived the daemon"
        assert "did not stop within" not in served.stderr_text()  # each ended at its SIGTERM


def _is_worker(pid: int) -> bool:
    try:
        return b"[worker " in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def fusermount_unmount(mountpoint: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_fusermount_unmount_with_files_open_is_refused_and_serving_goes_on(
    served: Mount, sample_image: SampleImage, tmp_path: Path
) -> None:
    with busy_readers(served.mountpoint / "disk.raw", sample_image, tmp_path, reopen=False) as readers:
        refused = fusermount_unmount(served.mountpoint)
        assert refused.returncode != 0
        assert "busy" in refused.stderr
        assert is_mounted(served.mountpoint)
        readers.wait_until_each_thread_read_again()
        tallies = readers.stop()
    assert_all_bytes_right(tallies, allowed_errors=set())
    assert fusermount_unmount(served.mountpoint).returncode == 0
    assert served.process.wait(TIMEOUT) == 0, served.stderr_text()
    assert not is_mounted(served.mountpoint)


def test_fusermount_unmount_between_reads_ends_daemon_and_readers(
    served: Mount, sample_image: SampleImage, tmp_path: Path
) -> None:
    with busy_readers(served.mountpoint / "disk.raw", sample_image, tmp_path, reopen=True) as readers:
        deadline = time.monotonic() + TIMEOUT
        while (result := fusermount_unmount(served.mountpoint)).returncode != 0:
            assert "busy" in result.stderr
            assert time.monotonic() < deadline, "never a moment with no file open"
            time.sleep(0.01)
        assert served.process.wait(TIMEOUT) == 0, served.stderr_text()
        assert not is_mounted(served.mountpoint)
        # The mount point is an empty directory again: each reader's next open finds no image.
        tallies = readers.wait_until_each_ended_by_itself()
    assert_all_bytes_right(tallies, allowed_errors={"ENOENT"})
    assert all(t.errors == ["ENOENT"] for t in tallies), tallies


@pytest.mark.parametrize("command", [["fusermount3", "-u", "-z"], ["umount", "-l"]], ids=" ".join)
def test_lazy_unmount_serves_open_files_until_closed_then_exits_zero(
    command: list[str], served: Mount, sample_image: SampleImage, tmp_path: Path
) -> None:
    if command[0] == "umount" and os.getuid() != 0:
        pytest.skip("umount -l of a FUSE mount needs root")
    with busy_readers(served.mountpoint / "disk.raw", sample_image, tmp_path, reopen=False) as readers:
        subprocess.run([*command, str(served.mountpoint)], check=True, timeout=TIMEOUT)
        assert not is_mounted(served.mountpoint)
        readers.wait_until_each_thread_read_again()  # the open files are still served
        assert served.process.poll() is None
        tallies = readers.stop()
    assert_all_bytes_right(tallies, allowed_errors=set())
    assert served.process.wait(TIMEOUT) == 0, served.stderr_text()


def test_sigterm_with_readers_in_flight_unmounts_and_exits_zero(
    served: Mount, sample_image: SampleImage, tmp_path: Path
) -> None:
    with busy_readers(served.mountpoint / "disk.raw", sample_image, tmp_path, reopen=False) as readers:
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(TIMEOUT) == 0, served.stderr_text()
        assert not is_mounted(served.mountpoint)
        readers.wait_until_each_thread_read_again()  # on a connection that is gone
        tallies = readers.stop()
    # Reads of pages still in the page cache go on succeeding, the others find no daemon: a read that
    # starts in cached pages ends short, with the right bytes, where they end.
    assert_all_bytes_right(tallies, allowed_errors={"ENOTCONN"}, short_ok=True)


def fuse_connection_dir(mountpoint: Path) -> Path:
    """/sys/fs/fuse/connections/N of the mount (N is its device's minor number); mounts fusectl if need be."""
    connections = Path("/sys/fs/fuse/connections")
    if not any(line.split()[2] == "fusectl" for line in Path("/proc/self/mounts").read_text().splitlines()):
        if os.getuid() != 0:
            pytest.skip("fusectl is not mounted and only root can mount it")
        subprocess.run(["mount", "-t", "fusectl", "none", str(connections)], check=True, timeout=TIMEOUT)
    device = find_mount(str(mountpoint))
    assert device is not None
    return connections / device.split(":")[1]


def test_connection_aborted_with_readers_in_flight_ends_cleanly(
    served: Mount, sample_image: SampleImage, tmp_path: Path
) -> None:
    """An abort through fusectl (also what a lazy unmount's end can look like: a read that already took a
    request gets ECONNABORTED) ends the daemon with exit 0 and a log line, no traceback, no mount left."""
    abort = fuse_connection_dir(served.mountpoint) / "abort"
    with busy_readers(served.mountpoint / "disk.raw", sample_image, tmp_path, reopen=False) as readers:
        abort.write_text("1")
        assert served.process.wait(TIMEOUT) == 0, served.stderr_text()
        assert not is_mounted(served.mountpoint)
        readers.wait_until_each_thread_read_again()  # on a connection that is gone
        tallies = readers.stop()
    assert "Traceback" not in served.stderr_text()
    assert_all_bytes_right(tallies, allowed_errors={"ENOTCONN", "ECONNABORTED"}, short_ok=True)


def _children_of(main: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{main}/task/{main}/children").read_text().split()]


def _workers_of(main: int, expected: int) -> list[int]:
    """The children of `main`, once there are `expected` of them: the mount answers before the last fork."""
    deadline = time.monotonic() + TIMEOUT
    while len(children := _children_of(main)) != expected:
        assert time.monotonic() < deadline, f"{main} has children {children}, not {expected}"
        time.sleep(0.01)
    return children


def _has_ended(pid: int) -> bool:
    """Whether `pid` has exited: reaped (gone from /proc), or a zombie (state Z) or dying (X)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ")"
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X")


def _wait_until_ended(pid: int, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not _has_ended(pid):
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _wait_for_title(pid: int, title: bytes) -> None:
    deadline = time.monotonic() + TIMEOUT
    while title not in (command := Path(f"/proc/{pid}/cmdline").read_bytes()):
        assert time.monotonic() < deadline, f"{pid}: {command!r}, not {title!r}"
        time.sleep(0.01)


def test_a_killed_worker_is_logged_and_the_others_go_on_serving(
    sample_archive: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    (mountpoint := tmp_path / "mnt").mkdir()
    served = mount(sample_archive, mountpoint, "-o", "workers=2")
    first, second = _workers_of(served.process.pid, 2)
    # ps shows which process is which (a worker names itself just after the fork)
    assert b"[main]" in Path(f"/proc/{served.process.pid}/cmdline").read_bytes()
    _wait_for_title(first, b"[worker 1/2]")
    _wait_for_title(second, b"[worker 2/2]")
    os.kill(second, signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT
    while "died (killed by SIGKILL); 1 of 2 go on serving" not in served.stderr_text():
        assert time.monotonic() < deadline, served.stderr_text()
        time.sleep(0.05)
    for _ in range(20):  # every read now needs the one worker left (the page cache dropped in between)
        with open(mountpoint / "disk.raw", "rb") as image:
            assert image.read() == sample_image.data
            os.posix_fadvise(image.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(TIMEOUT) == 0, served.stderr_text()
    assert not is_mounted(mountpoint)
    assert _has_ended(first)  # reaped by the main process before it exited


def test_when_every_worker_dies_the_mount_is_taken_away_and_the_status_says_so(
    sample_archive: Path, mount: MountFactory, tmp_path: Path
) -> None:
    """Never a hung mount: with no worker left nothing would answer, so the main process unmounts."""
    (mountpoint := tmp_path / "mnt").mkdir()
    served = mount(sample_archive, mountpoint, "-o", "workers=2")
    for worker in _workers_of(served.process.pid, 2):
        os.kill(worker, signal.SIGKILL)
    assert served.process.wait(TIMEOUT) == 1, served.stderr_text()
    assert "the last one: unmounting" in served.stderr_text()
    assert "Traceback" not in served.stderr_text()
    assert not is_mounted(mountpoint)


def test_sigkill_of_the_main_process_ends_its_workers_and_leaves_a_stale_mount(
    sample_archive: Path, mount: MountFactory, tmp_path: Path
) -> None:
    (mountpoint := tmp_path / "mnt").mkdir()
    served = mount(sample_archive, mountpoint, "-o", "workers=2")
    group = _workers_of(served.process.pid, 2)
    served.process.kill()
    served.process.wait(TIMEOUT)
    for worker in group:
        _wait_until_ended(worker, "a worker outlived its main process")
    with pytest.raises(OSError, match="not connected") as caught:
        os.stat(mountpoint / "disk.raw")
    assert caught.value.errno == errno.ENOTCONN  # as with one process: fusermount3 -u clears it


def test_a_compressed_archive_is_served_by_one_process_whatever_workers_asks(
    sample_archive: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    """Its chunk cache and indexing pass live in one process: copies in several would each fill their own."""
    compressed = tmp_path / "vm.tar.gz"
    compressed.write_bytes(gzip.compress(sample_archive.read_bytes(), compresslevel=1))
    (mountpoint := tmp_path / "mnt").mkdir()
    served = mount(compressed, mountpoint, "-o", "workers=2")
    assert "a compressed or http(s) archive is served by one process" in served.stderr_text()
    assert (mountpoint / "disk.raw").read_bytes() == sample_image.data
    assert b"[worker" not in b" ".join(
        Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _children_of(served.process.pid)
    )
