"""Serving and timing, for every bench of this package.

Serving: a FUSE daemon run in the foreground, in a session of its own (its children go with it), timed from
its command's start until the image it shows reads, and stopped at the end, also when a read hangs (a
watchdog kills the daemon, so blocked reads fail); its process tree's PSS, sampled during a step; its
threads pinned to a CPU. Reading: timed passes in 1 MiB requests and per-read latencies. Running: a scratch
directory where nothing stays mounted, and SIGTERM handled as Ctrl-C; both unmount on the way out.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from kit.mounts import MountError, finish, kill_group, start_daemon, status_kib, unmount

from tarfuse.serve import mountinfo

CHUNK = 1 << 20  # the request size of sequential reads
GRACE_S = 10.0  # past the cap, the watchdog kills a daemon whose read never returns
_POLL_S = 0.001

ReadInto = Callable[[memoryview, int], int]  # fill the buffer from an image offset; return bytes read


class ToolFailed(Exception):
    """The tool did not serve the image (exited, refused, unreadable); the message says how."""


class TimedOut(Exception):
    """A step did not finish within the time cap."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"timed out after {seconds:g} s")


@dataclass
class Served:
    """A served image, valid inside the `with` block that serves it."""

    ready_s: float
    size: int  # the size the tool shows for the image
    read_into: ReadInto
    fio_target: list[str] | None  # fio options naming the bytes to read; None: not applicable
    qemu_source: str | None  # what qemu-img convert reads; None: not applicable
    process: subprocess.Popen[bytes] | None = None  # the daemon, if there is one
    started: float = 0.0  # time.perf_counter() when its command started
    abort: Callable[[], None] = lambda: None  # from another thread: make blocked reads fail now
    aborted: threading.Event = field(default_factory=threading.Event)

    def peak_rss(self) -> int | None:
        """Peak resident memory (VmHWM) of the daemon and its children, in bytes; None without one."""
        if self.process is None:
            return None
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, LookupError):  # gone, or a zombie
                total += status_kib(pid, "VmHWM") * 1024
        return total

    def pids(self) -> list[int]:
        """The daemon and all its descendants (workers, helpers such as nbdkit); empty without a daemon."""
        return [] if self.process is None else _with_descendants(self.process.pid)

    def pin(self, cpu: int) -> None:
        """Pin every thread of the daemon and of all its descendants to `cpu` (`taskset -a -p -c`).

        Threads and processes they start later inherit the affinity.
        """
        for pid in self.pids():
            subprocess.run(
                ["taskset", "-a", "-p", "-c", str(cpu), str(pid)],
                check=False,  # a helper that has just exited
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )


# ---- Serving ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_fuse(
    argv: Sequence[str], mountpoint: Path, image: Path, cap: float, log: Path, probe: int = 1
) -> Iterator[Served]:
    """Run the FUSE daemon `argv`, which shows `image` under `mountpoint`, until the block ends.

    `ready_s` is the time from the command's start until the first `probe` bytes of `image` read, polled
    every millisecond. The daemon's output is appended to `log`.

    Raises:
        ToolFailed: the daemon exited before the image read.
        TimedOut: it did not read within `cap` seconds.
    """
    mountpoint.mkdir(exist_ok=True)
    start = time.perf_counter()
    process = start_daemon(argv, log, append=True, new_session=True)
    try:

        def exited() -> None:
            if process.poll() is not None:
                raise ToolFailed(f"exited with status {process.returncode}: {_tail(log)}")

        ready = wait_readable(str(image), start, cap, exited, probe)
        fd = os.open(image, os.O_RDONLY)
        try:
            served = Served(
                ready_s=ready,
                size=os.fstat(fd).st_size,
                read_into=lambda buffer, offset: os.preadv(fd, [buffer], offset),
                fio_target=[f"--filename={image}", "--direct=1"],
                qemu_source=str(image),
                process=process,
                started=start,
            )
            served.abort = lambda: _abort(process, mountpoint, served.aborted)
            yield served
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(MountError):  # scratch() warns about what stays mounted
            finish(mountpoint, process, grace=10, group=True)


def wait_readable(path: str, start: float, cap: float, check: Callable[[], None], size: int = 1) -> float:
    """Poll until the first `size` bytes of `path` read; return the seconds since `start`."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if os.pread(fd, size, 0):
                    return time.perf_counter() - start
            finally:
                os.close(fd)
        except OSError:
            pass
        check()
        if time.perf_counter() - start > cap:
            raise TimedOut(cap)
        time.sleep(_POLL_S)


def _abort(process: subprocess.Popen[bytes], mountpoint: Path, aborted: threading.Event) -> None:
    """Called by the watchdog: kill the daemon, so reads blocked on it fail at once."""
    aborted.set()
    kill_group(process)
    with contextlib.suppress(MountError):
        unmount(mountpoint)


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):  # gone, or a zombie (an empty rollup)
        pass
    return 0


class PssSampler:
    """Sample the PSS of a served daemon's process tree every `interval` seconds in a thread; `peak` is the
    largest sample, the last one taken when the block ends included. PSS is the sum of `Pss` of
    /proc/PID/smaps_rollup, so pages the processes share (a forked worker's) count once.

    Finding the process tree walks all of /proc, many times the cost of a sample: it is done once a second,
    not at every sample, so that the sampler takes little CPU from the step it watches.
    """

    TREE_EVERY_S = 1.0

    def __init__(self, served: Served, interval: float = 0.05) -> None:
        self._served, self._interval = served, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)
        self._pids: list[int] = []
        self._pids_at = -self.TREE_EVERY_S
        self.peak: int | None = None

    def _sample(self) -> None:
        if self._served.process is None:
            return
        if time.monotonic() - self._pids_at >= self.TREE_EVERY_S:
            self._pids, self._pids_at = self._served.pids(), time.monotonic()
        value = sum(_pss_kib(pid) for pid in self._pids) * 1024
        if self.peak is None or value > self.peak:
            self.peak = value

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> "PssSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if not self._served.aborted.is_set():
            self._pids_at = -self.TREE_EVERY_S  # the last sample looks for new processes too
            self._sample()


def _with_descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " / ".join(line.strip() for line in text[-lines:]) or "(no output)"


# ---- Reading ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def watchdog(served: Served, seconds: float) -> Iterator[None]:
    """Kill the daemon if the block takes far too long: a read stuck in FUSE then fails."""
    timer = threading.Timer(seconds, served.abort)
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
    with watchdog(served, cap + GRACE_S):
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


def drop_caches() -> bool:
    """As root: write back, then drop the page cache (the tar's and any mount's); say whether it was."""
    if os.geteuid() != 0:
        return False
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def timed(command: Sequence[str], **kwargs: object) -> float:
    """Run `command` (it must succeed); return the seconds it took."""
    start = time.perf_counter()
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - start


# ---- Running ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch(prefix: str, parent: str | Path | None = None, keep: bool = False) -> Iterator[Path]:
    """A new temporary directory for a run's data and mount points, removed at the end (unless `keep`).

    Whatever is still mounted under it then is unmounted first; if a mount stays, the directory stays too.
    """
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
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; everything mounted was unmounted", file=sys.stderr)
        sys.exit(130)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)
