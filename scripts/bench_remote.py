"""Benchmark a remote mount over loopback: time to first byte, sequential throughput next to curl, random
4 KiB read latency, and bytes fetched per byte read (and to boot a 1 GiB image in QEMU).

Standalone: `python scripts/bench_remote.py [--quick]`, as root or any user who can mount FUSE. The server is
the tests' range-capable one (tests/httpserver.py), serving the archive from memory on 127.0.0.1.
Prints a Markdown table (docs/remote.md keeps the figures).
"""

import argparse
import importlib.util
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tarfuse.sample import DataRun, boot_command, boot_sector, data_runs
from tarfuse.serve import mountinfo

MiB = 1 << 20
_ROOT = Path(__file__).resolve().parent.parent


def _load_server_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("httpserver", _ROOT / "tests" / "httpserver.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["httpserver"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def plain_tar(image: bytes) -> bytes:
    """A tar of one member, disk.raw, stored whole."""
    info = tarfile.TarInfo("disk.raw")
    info.size, info.mtime = len(image), 1_700_000_000
    padding = -len(image) % 512
    return info.tobuf(format=tarfile.GNU_FORMAT) + image + bytes(padding + 1024)


def is_mounted(path: Path) -> bool:
    return mountinfo.find(path) is not None


@contextmanager
def mounted(url: str, mnt: Path, *options: str) -> Iterator[float]:
    """Mount `url` on `mnt` in the foreground; yield the seconds the mount took to appear."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "tarfuse", "-f", url, str(mnt), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not is_mounted(mnt):
            if process.poll() is not None or time.monotonic() - started > 30:
                raise SystemExit(f"tarfuse did not mount {url}")
            time.sleep(0.005)
        yield time.monotonic() - started
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        process.wait(10)


def time_to_first_byte(server, url: str, mnt: Path) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    server.reset_counters()
    started = time.monotonic()
    with mounted(url, mnt):
        with open(mnt / "disk.raw", "rb") as disk:
            disk.read(4096)
        elapsed = time.monotonic() - started
    return elapsed, server.bytes_served


def sequential(server, url: str, mnt: Path, size: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    with mounted(url, mnt):
        server.reset_counters()
        started = time.monotonic()
        with open(mnt / "disk.raw", "rb", buffering=0) as disk:
            while disk.read(MiB):
                pass
        return size / (time.monotonic() - started), server.bytes_served


def curl(url: str, size: int) -> float:
    started = time.monotonic()
    subprocess.run([shutil.which("curl") or "curl", "-s", "-o", "/dev/null", url], check=True)
    return size / (time.monotonic() - started)


def random_reads(server, url: str, mnt: Path, size: int, count: int) -> tuple[list[float], int]:  # type: ignore[no-untyped-def]
    rng = random.Random(5)
    offsets = rng.sample(range(size // 4096), count)
    latencies = []
    with mounted(url, mnt):
        fd = os.open(mnt / "disk.raw", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead: one 4 KiB request each
        server.reset_counters()
        for block in offsets:
            started = time.perf_counter()
            os.pread(fd, 4096, block * 4096)
            latencies.append(time.perf_counter() - started)
        os.close(fd)
        return latencies, server.bytes_served


def boot_fetch(server, work: Path, mnt: Path) -> tuple[int, float] | None:  # type: ignore[no-untyped-def]
    """Bytes fetched, and seconds, to boot a 1 GiB image (stored whole in the tar) until it prints."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    size, message = 1 << 30, "bench booted"
    archive = work / "gib.tar"
    info = tarfile.TarInfo("disk.raw")
    info.size = size
    with archive.open("wb") as file:
        file.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        for run in [DataRun(0, boot_sector(message + "\r\n")), *data_runs(size)]:
            os.pwrite(file.fileno(), run.data, 512 + run.offset)
        file.truncate(512 + size + 1024)
    url = server.put("gib.tar", archive)
    server.reset_counters()
    started = time.monotonic()
    with mounted(url, mnt):
        serial = work / "com1.log"
        process = subprocess.Popen(boot_command(str(mnt / "disk.raw"), str(serial), qemu))
        try:
            while not (serial.exists() and message in serial.read_text(errors="replace")):
                if time.monotonic() - started > 120:
                    raise SystemExit("QEMU did not boot")
                time.sleep(0.05)
        finally:
            process.kill()
            process.wait()
    return server.bytes_served, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 64 MiB image instead of 512 MiB; no QEMU")
    args = parser.parse_args()
    size = (64 if args.quick else 512) * MiB
    httpserver = _load_server_module()
    with tempfile.TemporaryDirectory(prefix="tarfuse-bench-") as tmp, httpserver.serve() as server:
        work = Path(tmp)
        (mnt := work / "mnt").mkdir()
        url = server.put("vm.tar", plain_tar(os.urandom(size)))
        ttfb, ttfb_bytes = time_to_first_byte(server, url, mnt)
        seq, seq_bytes = sequential(server, url, mnt, size)
        curl_rate = curl(url, size)
        latencies, random_bytes = random_reads(server, url, mnt, size, 200 if args.quick else 1000)
        boot = None if args.quick else boot_fetch(server, work, mnt)
    latencies_ms = sorted(x * 1000 for x in latencies)
    rows = [
        ("image", f"{size // MiB} MiB of random bytes, plain tar, served from memory on 127.0.0.1"),
        (
            "time to first byte (mount + open + 4 KiB read)",
            f"{ttfb * 1000:.0f} ms, {ttfb_bytes / MiB:.2f} MiB fetched",
        ),
        ("sequential read, 1 MiB reads, cold", f"{seq / MiB:.0f} MiB/s"),
        ("curl -o /dev/null, same URL", f"{curl_rate / MiB:.0f} MiB/s"),
        ("bytes fetched per byte read, sequential", f"{seq_bytes / size:.2f}"),
        (
            f"random 4 KiB reads ({len(latencies)}), latency",
            f"median {statistics.median(latencies_ms):.2f} ms, "
            f"p99 {latencies_ms[int(len(latencies_ms) * 0.99)]:.2f} ms",
        ),
        ("bytes fetched per byte read, random 4 KiB", f"{random_bytes / (4096 * len(latencies)):.1f}"),
    ]
    if boot is not None:
        rows.append(
            ("QEMU boot of a 1 GiB image stored whole", f"{boot[0] / MiB:.2f} MiB fetched, {boot[1]:.1f} s")
        )
    print("| measure | result |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
