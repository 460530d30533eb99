"""The servers every run measures: the limits, the C ceiling and tarfuse (the peers are in peers.py).

Every tool turns a `Dataset` into a `Served` image (harness). What each one is, and why it is there:
docs/benchmarks.md, "How it is measured".
"""

import bisect
import json
import os
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Literal

from .data import MEMBER, Dataset, Segment
from .harness import ReadInto, Served, ToolFailed, serve_fuse, served_path, wait_readable
from .host import ensure_commands
from .results import C_CEILING, C_CEILING_MT

REPO = Path(__file__).resolve().parents[2]
CEILING_SOURCE = Path(__file__).with_name("fuse_ceiling.c")
CEILING_PROGRAM = REPO / "build" / "fuse_ceiling"  # `make bench` builds it there too; git ignores build/


class Tool(ABC):
    """One way to serve the image; `problem` says why it cannot run here, if so."""

    name: str
    role: Literal["limit", "tarfuse", "peer"]
    problem: str | None = None

    def setup(self) -> None:
        """Install what is missing; on failure remember why, in `problem`."""
        try:
            self._setup()
        except (OSError, subprocess.CalledProcessError, ToolFailed) as exc:
            self.problem = f"not installed: {exc}"

    def _setup(self) -> None:
        return None

    def unsupported(self, dataset: Dataset) -> str | None:
        """Why this tool has no figures for `dataset` (n/a), or None."""
        return None

    def version(self) -> str:
        return ""

    def measures(self, case: str, metric: str) -> bool:
        """Whether this tool takes part in `metric` of `case` at all (the workers variants: a few)."""
        return True

    @abstractmethod
    def serve(self, dataset: Dataset, scratch: Path, cap: float) -> AbstractContextManager[Served]:
        """Serve the image of `dataset`; the timer starts when the tool's command starts."""


def first_line(command: list[str]) -> str:
    """The line of `command`'s output that names the program (archivemount prints libfuse's first)."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    name = os.path.basename(command[0])
    return next((line for line in lines if name in line), lines[0] if lines else "?")


class PreadLimit(Tool):
    """The member's bytes straight out of the tar with pread in this Python; ready: `dd` of its first byte."""

    name, role = "pread", "limit"

    @contextmanager
    def serve(self, dataset: Dataset, scratch: Path, cap: float) -> Iterator[Served]:
        start = time.perf_counter()
        first = f"if={dataset.archive} of=/dev/null bs=1 count=1 skip={dataset.first_data}"
        subprocess.run(["dd", *first.split()], check=True, stderr=subprocess.DEVNULL)
        ready = time.perf_counter() - start
        plain, last = None if dataset.sparse else dataset.segments[0], dataset.segments[-1]
        with open(dataset.archive, "rb", buffering=0) as archive:
            yield Served(
                ready_s=ready,
                size=last.logical + last.length,
                read_into=_segment_reader(archive.fileno(), dataset.segments),
                # buffered reads of the tar's byte range: the page cache is the point of this limit
                fio_target=None if plain is None else [
                    f"--filename={dataset.archive}", f"--offset={plain.physical}", f"--size={plain.length}",
                    "--direct=0",
                ],
                qemu_source=None if plain is None else "json:" + json.dumps({
                    "driver": "raw", "offset": plain.physical, "size": plain.length,
                    "file": {"driver": "file", "filename": str(dataset.archive)},
                }),
            )  # fmt: skip


def _segment_reader(fd: int, segments: tuple[Segment, ...]) -> ReadInto:
    """Read image bytes by following the member's segments: preadv for data, a zero copy for holes."""
    starts = [s.logical for s in segments]
    zeros = memoryview(bytearray(1 << 20))

    def read_into(buffer: memoryview, offset: int) -> int:
        done, i = 0, bisect.bisect_right(starts, offset) - 1
        while done < len(buffer) and i < len(segments):
            segment = segments[i]
            skip = offset + done - segment.logical
            n = min(len(buffer) - done, segment.length - skip)
            if segment.physical is None:
                for at in range(done, done + n, len(zeros)):
                    step = min(len(zeros), done + n - at)
                    buffer[at : at + step] = zeros[:step]
            elif os.preadv(fd, [buffer[done : done + n]], segment.physical + skip) != n:
                raise ToolFailed(f"short read of the archive at {segment.physical + skip}")
            done, i = done + n, i + 1
        return done

    return read_into


class LoopLimit(Tool):
    """`losetup -r --offset --sizelimit` on the tar: the kernel's own loop path (non-sparse members)."""

    name, role = "losetup", "limit"

    def _setup(self) -> None:
        if os.geteuid() != 0:
            raise ToolFailed("losetup needs root")

    def unsupported(self, dataset: Dataset) -> str | None:
        return "sparse member: a loop device can only map one byte range" if dataset.sparse else None

    @contextmanager
    def serve(self, dataset: Dataset, scratch: Path, cap: float) -> Iterator[Served]:
        segment = dataset.segments[0]
        start = time.perf_counter()
        command = ["losetup", "-r", "--find", "--show", f"--offset={segment.physical}"]
        command += [f"--sizelimit={segment.length}", str(dataset.archive)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ToolFailed(f"losetup: {result.stderr.strip()}")
        device = result.stdout.strip()
        try:
            with served_path(device, wait_readable(device, start, cap, lambda: None)) as served:
                yield served
        finally:
            subprocess.run(["losetup", "-d", device], check=False)


class FuseTool(Tool):
    """A FUSE daemon run in the foreground (so its PID is ours), unmounted and stopped afterwards."""

    needs: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (command, Debian packages that may provide it)

    def _setup(self) -> None:
        ensure_commands(*self.needs)

    @abstractmethod
    def argv(self, dataset: Dataset, mountpoint: Path) -> tuple[list[str], Path]:
        """The command that serves `dataset` at `mountpoint`, and the path of the image it shows."""

    def serve(self, dataset: Dataset, scratch: Path, cap: float) -> AbstractContextManager[Served]:
        mountpoint = Path(os.path.realpath(scratch)) / f"mnt-{self.name}"
        argv, image = self.argv(dataset, mountpoint)
        return serve_fuse(argv, mountpoint, image, cap)


class Tarfuse(FuseTool):
    name, role = "tarfuse", "tarfuse"
    options: tuple[str, ...] = ()  # before the ones every run passes

    def command(self) -> list[str]:
        return [str(Path(sys.executable).with_name("tarfuse"))]

    def _setup(self) -> None:
        if not os.access(self.command()[0], os.X_OK):
            raise ToolFailed(f"{self.command()[0]} is missing (run make dev)")

    def version(self) -> str:
        return first_line([*self.command(), "--version"])

    def argv(self, dataset: Dataset, mountpoint: Path) -> tuple[list[str], Path]:
        command = [*self.command(), *self.options, "-f", "-o", f"member={MEMBER}"]
        return [*command, str(dataset.archive), str(mountpoint)], mountpoint / MEMBER


class TarfuseWorkers(Tarfuse):
    """tarfuse with `-o workers=N`: the workers dimension, on the plain case's cheap metrics."""

    METRICS = ("ready", "seq", "rand1-same", "rand1-apart", "rand4", "rss")

    def __init__(self, workers: int) -> None:
        self.name, self.options = f"tarfuse workers={workers}", ("-o", f"workers={workers}")

    def measures(self, case: str, metric: str) -> bool:
        return case == "plain" and metric in self.METRICS


def worker_counts() -> list[int]:
    """1, 2, and on bigger machines powers of two and the CPU count itself, up to tarfuse's default cap."""
    top = min(len(os.sched_getaffinity(0)), 8)  # tarfuse's default cap (tarfuse.mount)
    return sorted({1, 2, top} | {n for n in (4, 8) if n <= top})


class CCeiling(FuseTool):
    """fuse_ceiling.c: tarfuse's read path (segment map, reads from the tar's fd) in C on libfuse's
    low-level API, with tarfuse's readahead and request size: what FUSE allows here."""

    role = "limit"

    def __init__(self, multithreaded: bool) -> None:
        self.multithreaded, self.name = multithreaded, C_CEILING_MT if multithreaded else C_CEILING

    def _setup(self) -> None:
        build_ceiling()

    def version(self) -> str:
        loop = "fuse_session_loop_mt" if self.multithreaded else "fuse_session_loop"
        return f"scripts/bench/fuse_ceiling.c, {loop}, libfuse {_pkg_config('--modversion')}"

    def argv(self, dataset: Dataset, mountpoint: Path) -> tuple[list[str], Path]:
        segment_map = mountpoint.parent / f"{dataset.name}.segments"
        if not segment_map.exists():
            rows = (
                f"{s.logical} {s.length} {-1 if s.physical is None else s.physical}\n"
                for s in dataset.segments
            )
            segment_map.write_text("".join(rows))
        flags = ["-m"] if self.multithreaded else []
        argv = [str(CEILING_PROGRAM), *flags, str(dataset.archive), str(segment_map), MEMBER, str(mountpoint)]
        return argv, mountpoint / MEMBER


def build_ceiling() -> Path:
    """Compile fuse_ceiling.c into build/ if it is missing or older than its source."""
    if CEILING_PROGRAM.exists() and CEILING_PROGRAM.stat().st_mtime >= CEILING_SOURCE.stat().st_mtime:
        return CEILING_PROGRAM
    if shutil.which("cc") is None:
        raise ToolFailed("no C compiler (cc): apt-get install gcc")
    flags = _pkg_config("--cflags", "--libs").split()
    CEILING_PROGRAM.parent.mkdir(parents=True, exist_ok=True)
    command = ["cc", "-O2", "-Wall", "-o", str(CEILING_PROGRAM), str(CEILING_SOURCE), *flags]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ToolFailed(f"cc failed: {result.stderr.strip()[-300:]}")
    return CEILING_PROGRAM


def _pkg_config(*args: str) -> str:
    try:
        result = subprocess.run(["pkg-config", *args, "fuse3"], capture_output=True, text=True, check=False)
    except OSError:
        raise ToolFailed("pkg-config is missing: apt-get install pkg-config libfuse3-dev") from None
    if result.returncode != 0:
        raise ToolFailed("libfuse3-dev is missing: apt-get install libfuse3-dev")
    return result.stdout.strip()


def measured_tools() -> list[Tool]:
    """The tools of every run: the limits, the C ceilings, tarfuse and its workers variants."""
    limits = [PreadLimit(), LoopLimit(), CCeiling(multithreaded=False), CCeiling(multithreaded=True)]
    return [*limits, Tarfuse(), *(TarfuseWorkers(n) for n in worker_counts())]
