"""Benchmark a remote mount over loopback: time to first byte, sequential throughput next to curl (also with
a latency on every request, next to curl fetching 4 ranges at once), random 4 KiB read latency, and bytes
fetched per byte read (and to boot a 1 GiB image in QEMU).

`python -m scripts.bench.remote [--quick]`, as root or any user who can mount FUSE; the server is the tests'
range-capable one (kit.httpserver) on 127.0.0.1. Prints a Markdown table (docs/remote.md keeps the figures).
"""

import argparse
import itertools
import os
import random
import shutil
import statistics
import subprocess
import time
from contextlib import AbstractContextManager
from pathlib import Path

from kit.httpserver import RangeServer, serve
from kit.mounts import tarfuse_command
from kit.qemu import boot
from kit.sample import DataRun, boot_sector, data_runs
from kit.tarbuilder import END, archive, file_member, header

from .harness import (
    Served,
    latencies,
    quantile,
    read_some,
    run_main,
    run_timed,
    scratch,
    serve_fuse,
    timed_read,
)
from .report import table

MiB = 1 << 20
CAP_S = 300.0  # no step of a sound run comes near it; a daemon that hangs ends the run instead of stalling it
LATENCY_S = 0.02  # added to every request by the server in the latency case: a distant server
CURL_RANGES = 4  # the reference of the latency case: curl fetching the object as that many ranges at once


def mounted(url: str, mnt: Path, probe: int = 1) -> AbstractContextManager[Served]:
    """Mount `url` on `mnt` with `tarfuse -f`; ready when the first `probe` bytes of disk.raw read."""
    return serve_fuse(tarfuse_command("-f", url, mnt), mnt, mnt / "disk.raw", CAP_S, probe)


def sequential_with_latency(
    server: RangeServer, url: str, mnt: Path, image: bytes, object_size: int
) -> tuple[float, float]:
    """Bytes per second of a cold sequential read of the image through tarfuse, and of curl fetching the
    whole object as `CURL_RANGES` ranges at once, while the server waits `LATENCY_S` before each answer.
    SystemExit if tarfuse served other bytes than `image` (checked after the timed read: comparing
    during it would take the server's share of this process's GIL)."""
    server.faults.slow, server.faults.delay = -1, LATENCY_S
    try:
        with mounted(url, mnt) as served:
            seq = len(image) / timed_read(served, len(image), CAP_S)
            if (wrong := first_difference(served, image)) is not None:
                raise SystemExit(f"tarfuse served other bytes than the image's at offset {wrong}")
        return seq, parallel_curl(url, object_size, CURL_RANGES)
    finally:
        server.faults.slow, server.faults.delay = 0, 0.0


def first_difference(served: Served, image: bytes) -> int | None:
    """The offset of the first 1 MiB read of the served image that differs from `image`, if one does."""
    buffer = memoryview(bytearray(MiB))
    for offset in range(0, len(image), MiB):
        n = read_some(served, buffer, offset, CAP_S)
        if buffer[:n] != image[offset : offset + MiB]:
            return offset
    return None


def parallel_curl(url: str, size: int, ranges: int) -> float:
    """Bytes per second of `ranges` curl processes at once, each fetching its share of the `size` bytes."""
    bounds = [size * index // ranges for index in range(ranges + 1)]
    curl = shutil.which("curl") or "curl"
    start = time.perf_counter()
    processes = [
        subprocess.Popen([curl, "-sf", "-o", "/dev/null", "-r", f"{first}-{end - 1}", url])
        for first, end in itertools.pairwise(bounds)
    ]
    for process in processes:
        if process.wait(CAP_S) != 0:
            raise SystemExit(f"curl failed with status {process.returncode}")
    return size / (time.perf_counter() - start)


def random_reads(server: RangeServer, url: str, mnt: Path, size: int, count: int) -> tuple[list[float], int]:
    offsets = [block * 4096 for block in random.Random(5).sample(range(size // 4096), count)]
    with mounted(url, mnt), open(mnt / "disk.raw", "rb", buffering=0) as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: one 4 KiB request each
        server.reset_counters()
        return latencies(lambda offset: os.pread(file.fileno(), 4096, offset), offsets), server.bytes_served


def boot_fetch(server: RangeServer, work: Path, mnt: Path) -> tuple[int, float] | None:
    """Bytes fetched, and seconds, to boot a 1 GiB image (stored whole in the tar) until it prints."""
    if (qemu := shutil.which("qemu-system-x86_64")) is None:
        return None
    size, message = 1 << 30, "bench booted"
    path = work / "gib.tar"
    with path.open("wb") as file:
        file.write(header("disk.raw", size=size))
        for run in [DataRun(0, boot_sector(message + "\r\n")), *data_runs(size)]:
            os.pwrite(file.fileno(), run.data, 512 + run.offset)
        file.truncate(512 + size + len(END))
    url = server.put("gib.tar", path)
    server.reset_counters()
    started = time.monotonic()
    with mounted(url, mnt):
        if boot(mnt / "disk.raw", message, 120, qemu).seconds is None:
            raise SystemExit("QEMU did not boot")
    return server.bytes_served, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 64 MiB image instead of 512 MiB; no QEMU")
    quick = parser.parse_args().quick
    size = (64 if quick else 512) * MiB
    with scratch("tarfuse-bench-") as work, serve() as server:
        mnt = work / "mnt"
        image = os.urandom(size)
        tar = archive(file_member("disk.raw", image))
        url = server.put("vm.tar", tar)
        server.reset_counters()
        with mounted(url, mnt, probe=4096) as served:
            ttfb, ttfb_bytes = served.ready_s, server.bytes_served
        with mounted(url, mnt) as served:
            server.reset_counters()
            seq, seq_bytes = size / timed_read(served, size, CAP_S), server.bytes_served
        curl = size / run_timed([shutil.which("curl") or "curl", "-s", "-o", "/dev/null", url], CAP_S)[0]
        seq_latency, curl_ranges = sequential_with_latency(server, url, mnt, image, len(tar))
        times, random_bytes = random_reads(server, url, mnt, size, 200 if quick else 1000)
        booted = None if quick else boot_fetch(server, work, mnt)
    times_ms = [x * 1000 for x in times]
    rows = [
        ("image", f"{size // MiB} MiB of random bytes, plain tar, served from memory on 127.0.0.1"),
        ("time to first byte (mount + open + 4 KiB read)",
         f"{ttfb * 1000:.0f} ms, {ttfb_bytes / MiB:.2f} MiB fetched"),
        ("sequential read, 1 MiB reads, cold", f"{seq / MiB:.0f} MiB/s"),
        ("curl -o /dev/null, same URL", f"{curl / MiB:.0f} MiB/s"),
        (f"sequential read, {LATENCY_S * 1000:.0f} ms before every answer",
         f"{seq_latency / MiB:.0f} MiB/s"),
        (f"curl, {CURL_RANGES} ranges at once, same latency", f"{curl_ranges / MiB:.0f} MiB/s"),
        ("bytes fetched per byte read, sequential", f"{seq_bytes / size:.2f}"),
        (f"random 4 KiB reads ({len(times)}), latency",
         f"median {statistics.median(times_ms):.2f} ms, p99 {quantile(times_ms, 0.99):.2f} ms"),
        ("bytes fetched per byte read, random 4 KiB", f"{random_bytes / (4096 * len(times)):.1f}"),
    ]  # fmt: skip
    if booted is not None:
        rows.append(
            (
                "QEMU boot of a 1 GiB image stored whole",
                f"{booted[0] / MiB:.2f} MiB fetched, {booted[1]:.1f} s",
            )
        )
    print("\n".join(table(("measure", "result"), rows)))


if __name__ == "__main__":
    run_main(main)
