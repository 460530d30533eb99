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
from kit.readers import Job, Readers, Tally, total

MIB = 1 << 20
MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0
TAR_FORMATS = ("gnu", "pax0.0", "pax0.1", "pax1.0")  # GNU tar -S, as kit.sample.make_archive runs it


class StressFailed(Exception):
    """Setting up or tearing down the run failed; the message says what."""


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


# --- readers (kit.readers) --------------------------------------------------------------------


def reader_job(path: str, image: Path, edges: list[int], deadline: float, seed: int) -> Job:
    """Random reads of `path` until `deadline` (time.time()), half of them across a data/hole edge, each
    checked against `image`; now and then the reader drops its cached pages or reopens the file, so that
    reads keep reaching the daemon, and after a failed read it opens the file again and goes on."""
    return Job(
        path,
        str(image),
        seed,
        deadline=deadline,
        edges=tuple(edges),
        log_sizes=True,
        churn=True,
        keep_going=True,
    )


def failed(tally: Tally) -> bool:
    """Whether a read failed or returned other bytes than the image's (a short read included)."""
    return bool(tally.errors) or tally.wrong > 0 or tally.short > 0


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
        if any(failed(tally) for tally in (self.reader, self.loop) if tally is not None):
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
            job = reader_job(str(served), image, edges, deadline, args.seed * 1000 + n)
            (readers.start_thread if n % 2 else readers.start_process)(job)
        loop_readers = Readers()
        if device is not None:
            loop_readers.start_thread(reader_job(device, image, edges, deadline, args.seed * 1000 - 1))
        samples: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(daemon.pid, stop, samples), daemon=True)
        sampler.start()
        print(
            f"{args.readers} readers{' and the loop device ' + device if device else ''}: {args.duration} s"
        )
        tallies, lost = readers.join(args.duration + EXIT_TIMEOUT)
        loop_tallies, loop_lost = loop_readers.join(EXIT_TIMEOUT)
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
        reader=total(tallies),
        loop=total(loop_tallies) if device else None,
        lost_readers=len(lost) + len(loop_lost),
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
            f"{len(tally.errors)} errors, {tally.wrong} wrong, {tally.short} short"
        )

    print(f"image: {report.image_bytes / MIB:.0f} MiB sparse, {report.data_bytes / MIB:.1f} MiB of data")
    print(f"archive: {report.archive_bytes / MIB:.1f} MiB ({report.tar_format}, tar -S)")
    print(f"duration: {report.duration_s:.0f} s, {report.reader.reads / report.duration_s:,.0f} reads/s")
    print(f"readers ({report.readers}, threads and processes): {amount(report.reader)}")
    print(f"loop device: {amount(report.loop) if report.loop else 'not used (needs root)'}")
    print(
        f"daemon: read {report.daemon_read_bytes / MIB:,.0f} MiB (archive and /dev/fuse; the rest was cached)"
    )
    for message in report.reader.notes + (report.loop.notes if report.loop else []):
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
