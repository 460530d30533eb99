"""Load test (`make stress`): many verified readers and a loop device on one tarfuse mount, for a set time.

Builds a sparse image (scattered data runs of random lengths, holes everywhere else), archives it with
GNU tar -S, mounts it with `tarfuse -f`, and for --duration seconds runs:

- --readers readers (default 8), half threads of this process and half separate processes, each doing
  random reads of 512 B to 4 MiB (log-uniform sizes) at data/hole edges or anywhere, every one compared
  with the original image file (the oracle). Now and then a reader closes and reopens the image, or drops
  its pages from the page cache (posix_fadvise DONTNEED), so that reads keep reaching the daemon;
- a read-only loop device (losetup -r) over the mounted image, read the same way by one more thread
  (root only; skipped otherwise).

It reports reads, bytes, opens and errors, and the daemon's resident memory (VmRSS) at the start and the
end, then unmounts with fusermount3 -u. Exit status 1 if any read failed or returned wrong bytes, the
daemon died or exited non-zero, or its RSS grew by more than --rss-growth-mib; 0 otherwise.
"""

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kit import mounts, sample

MIB = 1 << 20
MIN_READ, MAX_READ = 512, 4 * MIB
MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0
TAR_FORMATS = ("gnu", "pax0.0", "pax0.1", "pax1.0")  # GNU tar -S, as kit.sample.make_archive runs it


class StressFailed(Exception):
    """Setting up or tearing down the run failed; the message says what."""


@dataclass
class Tally:
    """What one reader did. `errors` counts failed reads and reads that returned wrong bytes."""

    reads: int = 0
    bytes: int = 0
    opens: int = 0
    errors: int = 0
    messages: list[str] = field(default_factory=list)  # the first few errors, for the report

    def add(self, other: "Tally") -> None:
        self.reads += other.reads
        self.bytes += other.bytes
        self.opens += other.opens
        self.errors += other.errors
        self.messages += other.messages[: max(0, 5 - len(self.messages))]

    def fail(self, message: str) -> None:
        self.errors += 1
        if len(self.messages) < 5:
            self.messages.append(message)


@dataclass(frozen=True)
class Job:
    """What a reader reads, against what, until when. Sent to reader processes as JSON."""

    path: str
    oracle: str
    size: int
    edges: list[int]
    deadline: float  # time.time() based, so that processes agree on it
    seed: int


# --- the image ---------------------------------------------------------------------------------


def write_sparse_image(path: Path, size: int, runs: int, rng: random.Random) -> list[tuple[int, int]]:
    """Write `runs` runs of random data at random, unaligned places of a sparse file; return them."""
    extents: list[tuple[int, int]] = []
    with path.open("wb") as image:
        image.truncate(size)
        while len(extents) < runs:
            length = int(2 ** rng.uniform(10, 23))  # 1 KiB to 8 MiB
            offset = rng.randrange(0, size - length)
            if any(offset < o + n + 4096 and o < offset + length + 4096 for o, n in extents):
                continue  # keep a hole between runs
            image.seek(offset)
            image.write(rng.randbytes(length))
            extents.append((offset, length))
    return sorted(extents)


# --- readers -----------------------------------------------------------------------------------


def read_size(rng: random.Random) -> int:
    return int(2 ** rng.uniform(9, 22))  # 512 B .. 4 MiB, as many small reads as large ones


def read_offset(rng: random.Random, job: Job, size: int) -> int:
    if job.edges and rng.random() < 0.5:  # across a data/hole edge
        return max(0, min(job.size - 1, rng.choice(job.edges) - rng.randrange(size)))
    return rng.randrange(job.size)


def read_loop(job: Job) -> Tally:
    """Read random ranges of `job.path` until the deadline, each checked against the oracle file."""
    rng, tally = random.Random(job.seed), Tally()
    oracle = os.open(job.oracle, os.O_RDONLY)
    fd = -1
    try:
        while time.time() < job.deadline:
            if fd < 0:
                try:
                    fd = os.open(job.path, os.O_RDONLY)
                except OSError as exc:
                    tally.fail(f"open of {job.path}: {exc}")
                    time.sleep(0.1)
                    continue
                tally.opens += 1
            size = read_size(rng)
            offset = read_offset(rng, job, size)
            try:
                got = os.pread(fd, size, offset)
            except OSError as exc:
                tally.fail(f"pread({size}, {offset}) of {job.path}: {exc}")
                os.close(fd)
                fd = -1
                continue
            tally.reads += 1
            tally.bytes += len(got)
            if got != os.pread(oracle, size, offset):
                tally.fail(f"pread({size}, {offset}) of {job.path}: {len(got)} bytes, not the image's")
            fd = churn(rng, fd)
    finally:
        os.close(oracle)
        if fd >= 0:
            os.close(fd)
    return tally


def churn(rng: random.Random, fd: int) -> int:
    """Sometimes drop the file's cached pages, sometimes close it (the caller reopens); return the fd."""
    draw = rng.random()
    if draw < 0.05:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    elif draw < 0.10:
        os.close(fd)
        return -1
    return fd


def run_worker(job_json: str) -> None:
    """The body of a reader process: print its tally as JSON."""
    print(json.dumps(asdict(read_loop(Job(**json.loads(job_json))))), flush=True)


class Readers:
    """Reader threads and processes, started together, joined together."""

    def __init__(self) -> None:
        self._threads: list[tuple[threading.Thread, list[Tally]]] = []
        self._processes: list[subprocess.Popen[str]] = []

    def start_thread(self, job: Job) -> None:
        result: list[Tally] = []
        thread = threading.Thread(target=lambda: result.append(read_loop(job)), daemon=True)
        thread.start()
        self._threads.append((thread, result))

    def start_process(self, job: Job) -> None:
        command = [sys.executable, __file__, "--worker", json.dumps(asdict(job))]
        self._processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))

    def join(self, timeout: float) -> tuple[Tally, int]:
        """Wait for every reader; return the sum of their tallies and how many hung or crashed."""
        total, lost = Tally(), 0
        for thread, result in self._threads:
            thread.join(timeout)
            lost += thread.is_alive()
            for tally in result:
                total.add(tally)
        for process in self._processes:
            try:
                out, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                lost += 1
                continue
            if process.returncode != 0:
                lost += 1
                continue
            total.add(Tally(**json.loads(out)))
        return total, lost

    def kill(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.kill()
                process.wait()


# --- the mount, the loop device, the daemon's memory -------------------------------------------


@contextlib.contextmanager
def tarfuse_mount(archive: Path, mountpoint: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `tarfuse -f ARCHIVE MOUNTPOINT`; in the end make sure nothing is mounted and the daemon is gone."""
    try:
        with mounts.foreground_mount(archive, mountpoint, log=log, timeout=MOUNT_TIMEOUT) as mounted:
            yield mounted.process
    except mounts.MountError as exc:
        raise StressFailed(f"tarfuse: {exc}") from None


@contextlib.contextmanager
def loop_device(image: Path, wanted: bool) -> Iterator[str | None]:
    """Attach `image` to a read-only loop device, if `wanted` and possible; always detach it."""
    if not wanted or os.getuid() != 0 or not os.path.exists("/dev/loop-control"):
        yield None
        return
    with mounts.loop_device(image) as device:
        yield device


def read_chars(pid: int) -> int:
    """Bytes the process has read with read(2)-like calls: its archive reads, mostly (/proc/PID/io)."""
    with open(f"/proc/{pid}/io", encoding="ascii") as io:
        for line in io:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise StressFailed(f"no rchar for process {pid}")


def sample_rss(pid: int, stop: threading.Event, samples: list[int]) -> None:
    while not stop.wait(1.0):
        with contextlib.suppress(OSError):
            samples.append(mounts.status_kib(pid, "VmRSS"))


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Report:
    """The figures of one run; `passed` says whether they are all within bounds."""

    duration_s: float
    readers: int
    image_bytes: int
    data_bytes: int
    archive_bytes: int
    tar_format: str
    reader: Tally
    loop: Tally | None
    lost_readers: int
    rss_start_kib: int
    rss_end_kib: int
    rss_max_kib: int
    rss_growth_bound_kib: int
    daemon_read_bytes: int
    daemon_exit_status: int | None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def judge(self) -> None:
        if self.reader.errors or (self.loop is not None and self.loop.errors):
            self.failures.append("reads failed or returned wrong bytes")
        if self.reader.reads == 0:
            self.failures.append("no reads were done")
        if self.lost_readers:
            self.failures.append(f"{self.lost_readers} readers hung or crashed")
        if self.rss_end_kib - self.rss_start_kib > self.rss_growth_bound_kib:
            self.failures.append("the daemon's RSS grew beyond the bound")
        if self.daemon_exit_status != 0:
            self.failures.append(f"the daemon exited with {self.daemon_exit_status} after fusermount3 -u")


def run(args: argparse.Namespace, workdir: Path) -> Report:
    rng = random.Random(args.seed)
    image, archive, mountpoint = workdir / "disk.raw", workdir / "disk.tar", workdir / "mnt"
    print(f"building a {args.image_mib} MiB sparse image with {args.runs} data runs in {workdir}", flush=True)
    runs = write_sparse_image(image, args.image_mib * MIB, args.runs, rng)
    if shutil.which("tar") is None:
        raise StressFailed("GNU tar is not installed")
    sample.make_archive(args.format, image, archive)
    mountpoint.mkdir()
    readers = Readers()
    with tarfuse_mount(archive, mountpoint, workdir / "tarfuse.log") as daemon:
        served = mountpoint / image.name
        with loop_device(served, not args.no_loop) as device:
            report = load(args, daemon, readers, runs, image, served, device)
            report.archive_bytes = archive.stat().st_size
        result = subprocess.run(
            ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            report.failures.append(f"fusermount3 -u failed: {result.stderr.strip()}")
        try:
            report.daemon_exit_status = daemon.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            report.failures.append(f"the daemon did not exit within {EXIT_TIMEOUT} s of the unmount")
    report.judge()
    return report


def load(
    args: argparse.Namespace,
    daemon: subprocess.Popen[bytes],
    readers: Readers,
    runs: list[tuple[int, int]],
    image: Path,
    served: Path,
    device: str | None,
) -> Report:
    """Run the readers (and the loop device reader) until the deadline; measure the daemon meanwhile."""
    edges = sorted({e for offset, length in runs for e in (offset, offset + length)})
    rss_start, read_start = mounts.status_kib(daemon.pid, "VmRSS"), read_chars(daemon.pid)
    deadline = time.time() + args.duration
    size = args.image_mib * MIB
    try:
        for n in range(args.readers):
            job = Job(str(served), str(image), size, edges, deadline, args.seed * 1000 + n)
            (readers.start_thread if n % 2 else readers.start_process)(job)
        loop_readers = Readers()
        if device is not None:
            loop_readers.start_thread(Job(device, str(image), size, edges, deadline, args.seed * 1000 - 1))
        samples: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(daemon.pid, stop, samples), daemon=True)
        sampler.start()
        print(
            f"{args.readers} readers{' and the loop device ' + device if device else ''}: {args.duration} s"
        )
        total, lost = readers.join(args.duration + EXIT_TIMEOUT)
        loop_total, loop_lost = loop_readers.join(EXIT_TIMEOUT) if device else (None, 0)
        stop.set()
        sampler.join()
    finally:
        readers.kill()
    if daemon.poll() is not None:
        raise StressFailed(f"the daemon died during the run (exit status {daemon.returncode})")
    rss_end, read_end = mounts.status_kib(daemon.pid, "VmRSS"), read_chars(daemon.pid)
    return Report(
        duration_s=args.duration,
        readers=args.readers,
        image_bytes=size,
        data_bytes=sum(length for _, length in runs),
        archive_bytes=0,
        tar_format=args.format,
        reader=total,
        loop=loop_total,
        lost_readers=lost + loop_lost,
        rss_start_kib=rss_start,
        rss_end_kib=rss_end,
        rss_max_kib=max([rss_start, rss_end, *samples]),
        rss_growth_bound_kib=args.rss_growth_mib * 1024,
        daemon_read_bytes=read_end - read_start,
        daemon_exit_status=None,
    )


def print_report(report: Report) -> None:
    def amount(tally: Tally) -> str:
        return (
            f"{tally.reads:,} reads, {tally.bytes / MIB:,.0f} MiB, {tally.opens:,} opens, "
            f"{tally.errors} errors"
        )

    print(f"image: {report.image_bytes / MIB:.0f} MiB sparse, {report.data_bytes / MIB:.1f} MiB of data")
    print(f"archive: {report.archive_bytes / MIB:.1f} MiB ({report.tar_format}, tar -S)")
    print(f"duration: {report.duration_s:.0f} s, {report.reader.reads / report.duration_s:,.0f} reads/s")
    print(f"readers ({report.readers}, threads and processes): {amount(report.reader)}")
    print(f"loop device: {amount(report.loop) if report.loop else 'not used (needs root)'}")
    print(
        f"daemon: read {report.daemon_read_bytes / MIB:,.0f} MiB (archive and /dev/fuse; the rest was cached)"
    )
    for message in report.reader.messages + (report.loop.messages if report.loop else []):
        print(f"  error: {message}")
    growth = report.rss_end_kib - report.rss_start_kib
    print(
        f"daemon RSS: start {report.rss_start_kib / 1024:.1f} MiB, end {report.rss_end_kib / 1024:.1f} MiB, "
        f"max {report.rss_max_kib / 1024:.1f} MiB (growth {growth / 1024:+.1f} MiB, "
        f"bound {report.rss_growth_bound_kib / 1024:.0f} MiB)"
    )
    print(f"daemon exit status after fusermount3 -u: {report.daemon_exit_status}")
    print("PASS" if report.passed else "FAIL: " + "; ".join(report.failures), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--readers", type=int, default=8, help="reader threads + processes (default 8)")
    parser.add_argument("--image-mib", type=int, default=384, help="image size in MiB (default 384)")
    parser.add_argument("--runs", type=int, default=64, help="data runs in the image (default 64)")
    parser.add_argument("--format", choices=TAR_FORMATS, default="gnu", help="sparse tar format")
    parser.add_argument("--rss-growth-mib", type=int, default=20, help="allowed RSS growth (default 20)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-loop", action="store_true", help="do not read through a loop device")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="tarfuse-stress-"))
    try:
        report = run(args, workdir)
    except (StressFailed, subprocess.CalledProcessError) as exc:
        print(f"stress: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "passed": report.passed}, indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
