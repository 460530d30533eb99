"""Benchmark a fleet booting from object storage: moto's S3 server (the tests' kit.objectstores, behind its
recording proxy) on 127.0.0.1.

- A cold mount of an s3:// .tar.gz with and without its published index: requests, bytes and seconds from
  starting tarfuse to the first sector read, for data that gzip cannot shrink and for data it halves; and
  ratarmount's own s3:// (fsspec, s3fs) on the same object (ratarmount_s3.py).
- HOSTS cold mounts (each its own cache), each reading what a boot reads: their bytes together.
- A boot's reads replayed on a plain s3:// tar at 20 ms per request, with and without a published read list,
  next to the same reads from the local file.

`python -m scripts.bench.fleet [--quick]`, as root (FUSE). Prints Markdown tables (docs/benchmarks.md keeps
the figures).
"""

import argparse
import os
import random
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kit.httpserver import serve
from kit.mounts import tarfuse_command
from kit.objectstores import ObjectStore, running_store

from . import ratarmount_s3
from .harness import run_main, scratch
from .report import table

MiB = 1 << 20
LATENCY_S = 0.02  # before every answer, in the boot replay: a store some way off
BOOT_SEED = 7
# What the sample image's boot reads (tests/kit/sample.py: a boot sector that prints and halts), as QEMU
# asks for it: the first sector, and the first 64 KiB when it probes the format.
SAMPLE_BOOT = [(0, 512), (0, 65536)]


def boot_reads(size: int) -> list[tuple[int, int]]:
    """What a boot reads, roughly: the first sectors, a kernel and an initrd (a few MiB each, in 128 KiB
    reads), then scattered 4-64 KiB reads (directories, libraries)."""
    rng = random.Random(BOOT_SEED)
    reads = [(0, 4096), (4096, 65536)]
    for start in (size // 8, size // 3):
        reads += [(start + i * 131072, 131072) for i in range(32)]
    reads += [
        (rng.randrange(0, size - 65536) // 4096 * 4096, rng.choice((4096, 16384, 65536))) for _ in range(200)
    ]
    return reads


def make_image(path: Path, size: int, compressible: bool) -> None:
    """`size` bytes: random (gzip cannot shrink it), or words from a small vocabulary (gzip halves it)."""
    rng = random.Random(1)
    words = [
        bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]
    with path.open("wb") as out:
        for _ in range(size // MiB):
            if compressible:
                out.write(b" ".join(rng.choices(words, k=190_000))[:MiB].ljust(MiB, b"x"))
            else:
                out.write(rng.randbytes(MiB))


def tar_gz(work: Path, name: str, size: int, compressible: bool) -> Path:
    image = work / "disk.raw"
    make_image(image, size, compressible)
    archive = work / f"{name}.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(image, arcname="disk.raw")
    image.unlink()
    subprocess.run(["pigz", "-f", "-6", archive], check=True)
    return work / f"{name}.tar.gz"


@contextmanager
def mounted(store: ObjectStore, key: str, mnt: Path, env: dict[str, str], *options: str) -> Iterator[float]:
    """Mount the object detached (live once tarfuse returns); yield the seconds that took; unmount."""
    mnt.mkdir(exist_ok=True)
    start = time.monotonic()
    subprocess.run(
        tarfuse_command(store.url(key), mnt, "-o", ",".join([f"endpoint={store.endpoint}", *options])),
        env=env,
        check=True,
    )
    try:
        yield time.monotonic() - start
    finally:
        subprocess.run(["fusermount3", "-u", mnt], check=True)


def replay(disk: Path, reads: list[tuple[int, int]]) -> None:
    fd = os.open(disk, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # the reads as asked, not the kernel's readahead
        for offset, size in reads:
            os.pread(fd, size, offset)
    finally:
        os.close(fd)


def cold_mounts(
    store: ObjectStore, work: Path, env: dict[str, str], archive: Path, hosts: int
) -> list[tuple[str, str]]:
    key = archive.name
    store.put(key, archive)
    index = work / f"{key}.tarfuse-index"
    subprocess.run(
        tarfuse_command("--index-only", store.url(key), "-o", f"index={index},endpoint={store.endpoint}"),
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    size = archive.stat().st_size
    rows = [(f"{key}", f"{size / MiB:.0f} MiB compressed, its index {index.stat().st_size / MiB:.2f} MiB")]
    for published in (False, True):
        if published:
            store.put(f"{key}.tarfuse-index", index)
        total = 0
        for host in range(hosts if published else 1):  # without: each host's pass fetches it all
            host_env = {**env, "XDG_CACHE_HOME": str(work / f"cache-{key}-{published}-{host}")}
            store.proxy.reset()
            start = time.monotonic()
            with mounted(store, key, work / "mnt", host_env):
                replay(work / "mnt" / "disk.raw", SAMPLE_BOOT[:1])  # the boot sector
                first = time.monotonic() - start
                asked = [r for r in store.proxy.requests if not r.path.endswith(".tarfuse-reads")]
                first_requests, first_bytes = len(asked), sum(r.sent for r in asked)
                if published:
                    replay(work / "mnt" / "disk.raw", SAMPLE_BOOT)
            total += store.proxy.bytes_served
            if host == 0:
                what = (
                    "with its published index" if published else "without an index (the pass fetches it all)"
                )
                figures = f"{first_requests} requests, {first_bytes / MiB:.2f} MiB, {first:.2f} s"
                rows.append((f"cold mount {what}: to the first sector", figures))
        if not published and ratarmount_s3.install() is None:
            requests, fetched, seconds, _ = ratarmount_s3.cold_mount(store, key, work, env)
            figures = f"{requests} requests, {fetched / MiB:.2f} MiB, {seconds:.2f} s"
            rows.append(("ratarmount s3:// (fsspec, s3fs), cold: to the first sector", figures))
        if published:
            rows.append((f"{hosts} cold mounts with it, each reading what the sample boots: fetched in all",
                         f"{total / MiB:.1f} MiB, {total / size:.2f}x the object"))  # fmt: skip
    return rows


def cold_mount_over_http(work: Path, size: int, hosts: int) -> list[tuple[str, str]]:
    """The issue's case at full size: a .tar.gz of `size` bytes of words behind the tests' http range
    server (kit.httpserver, which reads the file for each request: moto rereads a large object for each
    ranged GET, which would set the seconds), its index published beside it; `hosts` cold mounts."""
    archive = tar_gz(work, "big", size, compressible=True)
    rows = []
    with serve() as server:
        url = server.put(archive.name, archive)
        index = work / f"{archive.name}.tarfuse-index"
        subprocess.run(
            tarfuse_command("--index-only", url, "-o", f"index={index}"), check=True, capture_output=True
        )
        server.put(f"{archive.name}.tarfuse-index", index)
        total, firsts = 0, list[tuple[float, int, int]]()
        for host in range(hosts):
            server.reset_counters()
            env = {**os.environ, "XDG_CACHE_HOME": str(work / f"cache-http-{host}")}
            (mnt := work / "mnt").mkdir(exist_ok=True)
            start = time.monotonic()
            subprocess.run(tarfuse_command(url, mnt), env=env, check=True)
            try:
                replay(mnt / "disk.raw", SAMPLE_BOOT[:1])
                firsts.append((time.monotonic() - start, len(server.requests), server.bytes_served))
                replay(mnt / "disk.raw", SAMPLE_BOOT)
            finally:
                subprocess.run(["fusermount3", "-u", mnt], check=True)
            total += server.bytes_served
    seconds = sorted(first[0] for first in firsts)
    compressed, published = archive.stat().st_size, index.stat().st_size
    rows.append((f"http: {archive.name}, {size // MiB} MiB of words",
                 f"{compressed / MiB:.0f} MiB compressed, its index {published / MiB:.2f} MiB"))  # fmt: skip
    rows.append(("cold mount with its published index: to the first sector (median of the hosts)",
                 f"{firsts[0][1]} requests, {firsts[0][2] / MiB:.2f} MiB, {seconds[len(seconds) // 2]:.2f} s "
                 f"({seconds[0]:.2f}-{seconds[-1]:.2f} s)"))  # fmt: skip
    rows.append((f"{hosts} cold mounts with it, each reading what the sample boots: fetched in all",
                 f"{total / MiB:.1f} MiB, {total / compressed:.3f}x the object"))  # fmt: skip
    return rows


def boot_with_read_list(
    store: ObjectStore, work: Path, env: dict[str, str], size: int
) -> list[tuple[str, str]]:
    image = work / "boot.raw"
    make_image(image, size, compressible=False)
    archive = work / "boot.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(image, arcname="disk.raw")
    store.put("boot.tar", archive)
    reads = boot_reads(size)
    start = time.monotonic()
    replay(image, reads)  # the page cache holds it: what a local file gives at best
    local = time.monotonic() - start
    listed = work / "boot.tar.tarfuse-reads"
    with mounted(store, "boot.tar", work / "mnt", {**env, "XDG_CACHE_HOME": str(work / "rec")},
                 f"record_reads={listed}"):  # fmt: skip
        replay(work / "mnt" / "disk.raw", reads)
    rows = [("boot's reads (first sectors, 2 x 4 MiB, 200 scattered)", f"{size // MiB} MiB image, plain tar"),
            ("from the local file (page cache)", f"{local:.2f} s")]  # fmt: skip
    for published in (False, True):
        if published:
            store.put("boot.tar.tarfuse-reads", listed)
        store.proxy.reset()
        store.proxy.fault(times=-1, latency=LATENCY_S)
        start = time.monotonic()
        with mounted(store, "boot.tar", work / "mnt", {**env, "XDG_CACHE_HOME": str(work / f"b{published}")}):
            replay(work / "mnt" / "disk.raw", reads)
            elapsed = time.monotonic() - start
        requests = len(store.proxy.requests)
        what = "with the published read list" if published else "without a read list"
        rows.append((f"cold mount + reads, {LATENCY_S * 1000:.0f} ms a request, {what}",
                     f"{elapsed:.2f} s, {requests} requests"))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB images and 3 hosts, for a smoke run")
    parser.add_argument("--big", type=int, default=4096, help="MiB of the http case's image (default 4096)")
    args = parser.parse_args()
    size, hosts = (64 * MiB, 3) if args.quick else (1024 * MiB, 20)
    big = 256 * MiB if args.quick else args.big * MiB
    with scratch("tarfuse-fleet-") as work, running_store("s3", work) as store:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "AZURE_"))}
        env |= store.env
        rows = []
        for name, compressible in (("random", False), ("words", True)):
            rows += cold_mounts(store, work, env, tar_gz(work, name, size, compressible), hosts)
        rows += boot_with_read_list(store, work, env, size)
        rows += cold_mount_over_http(work, big, hosts)
    print("\n".join(table(("measure", "result"), rows)))


if __name__ == "__main__":
    run_main(main)
