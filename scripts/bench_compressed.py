"""Benchmark compressed archives: the decompression libraries side by side, then tarfuse mounts.

    python scripts/bench_compressed.py [--quick] [--size-mib N] [--work DIR]

1. Libraries (A/B in one run, each in its own process, rounds interleaved): time of a full sequential pass
   (what building the index costs), median and p95 of random 4 KiB reads afterwards, peak RSS.
2. tarfuse on a GCE-style image (`tar --format=oldgnu -Sc`, then gzip / zstd): time from the mount command to
   the first sector, to the saved index (full pass), the second mount's time to the first sector, sequential
   read throughput of the image and random 4 KiB read latency (page cache dropped first, when root), the
   daemon's peak RSS (first mount: until the index is saved; second: after those reads); next to
   `gzip -dc`/`zstd -dc` and `tar -xf` of the whole archive, and `ratarmount` when it is on PATH.
Prints a Markdown table per part (docs/compressed.md keeps a run's output).
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tarfuse.sources.zstdframes import ZstdFrames

LIBRARIES = {
    "gzip": ["rapidgzip", "rapidgzip-p2", "indexed_gzip"],
    "zstd": ["zstdframes", "indexed_zstd", "pyzstd-seekable"],  # indexed_zstd: if installed, to compare
    "xz": ["python-xz"],
    "bzip2": ["rapidgzip-bzip2", "indexed_bzip2"],
}


def make_image(path: Path, size: int, data_fraction: float = 0.3) -> None:
    """A sparse raw disk: 1 MiB runs of random and of text-like data covering `data_fraction`, holes else."""
    rng = random.Random(1)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    text = b" ".join(rng.choices(words, k=800_000))[: 4 << 20]
    noise = rng.randbytes(4 << 20)
    with path.open("wb") as out:
        out.truncate(size)
        for mib in range(size >> 20):
            kind = rng.random()
            if kind >= data_fraction and mib:
                continue
            source = noise if kind < data_fraction / 3 else text
            start = rng.randrange(0, 3 << 20)
            out.seek(mib << 20)
            out.write(source[start : start + (1 << 20)])


def library_probe(kind: str, path: str) -> dict[str, float]:
    """Run in a child process: open, read all sequentially, then 300 random 4 KiB reads."""
    start = time.perf_counter()
    file = _open_library(kind, path)
    total = 0
    while chunk := file.read(4 << 20):
        total += len(chunk)
    full = time.perf_counter() - start
    rng = random.Random(0)
    latencies = []
    for _ in range(300):
        offset = rng.randrange(0, max(1, total - 4096))
        t = time.perf_counter()
        file.seek(offset)
        file.read(4096)
        latencies.append(time.perf_counter() - t)
    file.close()
    latencies.sort()
    return {
        "full_pass_s": full,
        "random_median_ms": statistics.median(latencies) * 1e3,
        "random_p95_ms": latencies[int(len(latencies) * 0.95)] * 1e3,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _open_library(kind: str, path: str):  # type: ignore[no-untyped-def]  # library objects are untyped
    if kind.startswith("rapidgzip"):
        import rapidgzip

        cls = rapidgzip.IndexedBzip2File if kind == "rapidgzip-bzip2" else rapidgzip.RapidgzipFile
        return cls(path, parallelization=2 if kind == "rapidgzip-p2" else 1)
    if kind == "indexed_gzip":
        import indexed_gzip

        return indexed_gzip.IndexedGzipFile(path, spacing=4 << 20, readbuf_size=1 << 20)
    if kind == "indexed_bzip2":
        import indexed_bzip2

        return indexed_bzip2.open(path, parallelization=1)
    if kind == "zstdframes":
        from tarfuse.sources.zstdframes import ZstdFrames

        return _FileOverReadAt(ZstdFrames(open(path, "rb", buffering=0)))
    if kind == "indexed_zstd":
        import indexed_zstd

        return indexed_zstd.IndexedZstdFile(path)
    if kind == "pyzstd-seekable":
        import pyzstd

        return pyzstd.SeekableZstdFile(path)
    import xz

    return xz.open(path)


class _FileOverReadAt:
    """seek() and read() over a tarfuse decoder's read_at, as the probe uses the libraries' file objects."""

    def __init__(self, decoder: "ZstdFrames") -> None:
        self._decoder, self._position = decoder, 0

    def seek(self, offset: int) -> None:
        self._position = offset

    def read(self, size: int) -> bytes:
        data = self._decoder.read_at(self._position, size)
        self._position += len(data)
        return data

    def close(self) -> None:
        self._decoder.close()


def compare_libraries(archives: dict[str, Path], rounds: int) -> list[tuple[str, str, dict[str, float]]]:
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(rounds):  # interleaved: a noisy neighbour hurts every candidate alike
        for compression, kinds in LIBRARIES.items():
            for kind in kinds:
                path = archives[compression if kind != "pyzstd-seekable" else "zstd-seekable"]
                done = subprocess.run(
                    [sys.executable, __file__, "--probe", kind, str(path)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    print(f"  {kind}: failed: {done.stderr.strip()[-200:]}", file=sys.stderr)
                    continue
                results.setdefault((compression, kind), []).append(json.loads(done.stdout))
    return [
        (c, k, {key: statistics.median(r[key] for r in runs) for key in runs[0]})
        for (c, k), runs in results.items()
    ]


def timed(command: list[str], **kwargs: object) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - start


def _drop_caches() -> None:
    if os.geteuid() == 0:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mount_case(archive: Path, image_name: str, work: Path, options: list[str]) -> dict[str, float]:
    """Mount with tarfuse: first byte, full index, second mount, sequential and random reads, RSS."""
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    index = Path(str(archive) + ".tarfuse-index")
    index.unlink(missing_ok=True)
    result: dict[str, float] = {}
    command = [sys.executable, "-m", "tarfuse", "-f", str(archive), str(mnt), *options]
    for phase in ("first", "second"):
        _drop_caches()
        start = time.perf_counter()
        daemon = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            result[f"{phase}_mount_first_sector_s"] = _first_sector(mnt / image_name, start, daemon)
            if phase == "first":
                while not index.exists() and daemon.poll() is None:
                    time.sleep(0.01)
                result["full_index_s"] = time.perf_counter() - start
                result["first_mount_peak_rss_mib"] = _peak_rss(daemon.pid)  # the pass's two decoders
            else:
                result.update(_reads(mnt / image_name))
                result["daemon_peak_rss_mib"] = _peak_rss(daemon.pid)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            daemon.wait(30)
    return result


def _first_sector(image: Path, start: float, daemon: subprocess.Popen[bytes]) -> float:
    while True:
        if daemon.poll() is not None:
            raise RuntimeError("tarfuse exited before serving")
        try:
            with image.open("rb") as file:
                if len(file.read(512)) == 512:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.002)


def _reads(image: Path) -> dict[str, float]:
    size = image.stat().st_size
    rng = random.Random(3)
    fd = os.open(image, os.O_RDONLY)
    try:
        latencies = []
        for _ in range(200):
            offset = rng.randrange(0, size // 4096) * 4096
            t = time.perf_counter()
            os.pread(fd, 4096, offset)
            latencies.append(time.perf_counter() - t)
        start = time.perf_counter()
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            offset += len(chunk)
        sequential = time.perf_counter() - start
    finally:
        os.close(fd)
    latencies.sort()
    return {
        "random_4k_median_ms": statistics.median(latencies) * 1e3,
        "random_4k_p95_ms": latencies[int(len(latencies) * 0.95)] * 1e3,
        "sequential_mib_s": size / sequential / 2**20,
    }


def _peak_rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ratarmount_case(archive: Path, image_name: str, work: Path) -> dict[str, float] | None:
    tool = shutil.which("ratarmount")
    if tool is None:
        return None
    mnt = work / "rmnt"
    mnt.mkdir(exist_ok=True)
    result: dict[str, float] = {}
    for phase in ("first", "second"):
        _drop_caches()
        start = time.perf_counter()
        daemon = subprocess.Popen([tool, "-f", str(archive), str(mnt)], stdout=subprocess.DEVNULL)
        try:
            result[f"{phase}_mount_first_sector_s"] = _first_sector(mnt / image_name, start, daemon)
            if phase == "second":
                result.update(_reads(mnt / image_name))
                result["daemon_peak_rss_mib"] = _peak_rss(daemon.pid)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            daemon.wait(30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB image, one round")
    parser.add_argument("--size-mib", type=int, default=4096)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(library_probe(*args.probe)))
        return
    size = (256 if args.quick else args.size_mib) << 20
    work = args.work or Path(tempfile.mkdtemp(prefix="tarfuse-bench-compressed-"))
    work.mkdir(parents=True, exist_ok=True)
    image = work / "disk.raw"
    make_image(image, size)
    plain = work / "image.tar"
    subprocess.run(["tar", "--format=oldgnu", "-Scf", str(plain), "-C", str(work), "disk.raw"], check=True)
    archives = {"plain": plain}
    for name, command in {
        "gzip": ["gzip", "-6", "-c"],
        "zstd": ["zstd", "-q", "-T2", "-c"],
        "xz": ["xz", "-T2", "-1", "--block-size=8MiB", "-c"],
        "bzip2": ["bzip2", "-1", "-c"],
    }.items():
        archives[name] = work / f"image.tar.{name}"
        with plain.open("rb") as source, archives[name].open("wb") as sink:
            subprocess.run(command, stdin=source, stdout=sink, check=True)
    archives["zstd-seekable"] = work / "image.tar.szst"
    import pyzstd

    with plain.open("rb") as source, pyzstd.SeekableZstdFile(archives["zstd-seekable"], "w") as sink:
        shutil.copyfileobj(source, sink, 8 << 20)
    print(f"image {size >> 20} MiB, tar {plain.stat().st_size >> 20} MiB; archives in {work}\n")
    print("| compression | library | full pass s | random 4 KiB median ms | p95 ms | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for compression, kind, r in compare_libraries(archives, 1 if args.quick else 2):
        print(
            f"| {compression} | {kind} | {r['full_pass_s']:.2f} | {r['random_median_ms']:.1f} | "
            f"{r['random_p95_ms']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    print()
    for name, decompress in (("gzip", ["gzip", "-dc"]), ("zstd", ["zstd", "-dc"])):
        archive = archives[name]
        with open(os.devnull, "wb") as null:
            stream_s = timed([*decompress, str(archive)], stdout=null)
        extract = work / "extract"
        extract.mkdir(exist_ok=True)
        untar_s = timed(["tar", "-xf", str(archive), "-C", str(extract)])
        shutil.rmtree(extract)
        print(f"### {archive.name} ({archive.stat().st_size >> 20} MiB)\n")
        print(f"- `{' '.join(decompress)}` > /dev/null: {stream_s:.2f} s; `tar -xf`: {untar_s:.2f} s")
        for tool, figures in (
            ("tarfuse", mount_case(archive, "disk.raw", work, [])),
            ("ratarmount", ratarmount_case(archive, "disk.raw", work)),
        ):
            if figures is not None:
                print(f"- {tool}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
        print()


if __name__ == "__main__":
    main()
