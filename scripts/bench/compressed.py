"""Benchmark compressed archives: the decompression libraries side by side, then tarfuse mounts.

    python -m scripts.bench.compressed [--quick] [--size-mib N] [--work DIR]

1. Libraries (A/B in one run, each in its own process, rounds interleaved; libprobe.py): time of a
   full sequential pass (what building the index costs), median and p95 of random 4 KiB reads afterwards,
   peak RSS.
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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kit.mounts import tarfuse_command
from kit.sample import make_archive

from .harness import Served, drop_caches, latencies, quantile, run_main, serve_fuse, table, timed, timed_read
from .libprobe import LIBRARIES

CAP_S = 3600.0  # no step of a sound run comes near it; a daemon that hangs ends the run, not stalls it
PROBE = Path(__file__).with_name("libprobe.py")  # run as a file: the package is not imported there


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


def compare_libraries(archives: dict[str, Path], rounds: int) -> list[tuple[str, str, dict[str, float]]]:
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(rounds):  # interleaved: a noisy neighbour hurts every candidate alike
        for compression, kinds in LIBRARIES.items():
            for kind in kinds:
                path = archives[compression if kind != "pyzstd-seekable" else "zstd-seekable"]
                done = subprocess.run(
                    [sys.executable, str(PROBE), kind, str(path)],
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


def mount_case(command: list[str], mnt: Path, image: str, index: Path | None = None) -> dict[str, float]:
    """Mount twice, page cache dropped before each: time to the first sector; on the first mount, the time
    until `index` is saved and the peak RSS until then; on the second, reads and the peak RSS after them."""
    if index is not None:
        index.unlink(missing_ok=True)
    result: dict[str, float] = {}
    for phase in ("first", "second"):
        drop_caches()
        with serve_fuse(command, mnt, mnt / image, CAP_S, mnt.with_suffix(".log"), probe=512) as served:
            result[f"{phase}_mount_first_sector_s"] = served.ready_s
            if phase == "first" and index is not None:
                assert served.process is not None
                while not index.exists() and served.process.poll() is None:
                    time.sleep(0.01)
                result["full_index_s"] = time.perf_counter() - served.started
                result["first_mount_peak_rss_mib"] = _mib(served.peak_rss())  # the pass's two decoders
            elif phase == "second":
                result.update(_reads(served))
                result["daemon_peak_rss_mib"] = _mib(served.peak_rss())
    return result


def _reads(served: Served) -> dict[str, float]:
    """Random 4 KiB reads at block boundaries, then one sequential pass of the image in 1 MiB reads."""
    rng = random.Random(3)
    buffer = memoryview(bytearray(4096))
    offsets = [rng.randrange(0, served.size // 4096) * 4096 for _ in range(200)]
    times = latencies(lambda offset: served.read_into(buffer, offset), offsets)
    sequential = timed_read(served, served.size, CAP_S)
    return {
        "random_4k_median_ms": statistics.median(times) * 1e3,
        "random_4k_p95_ms": quantile(times, 0.95) * 1e3,
        "sequential_mib_s": served.size / sequential / 2**20,
    }


def _mib(size: int | None) -> float:
    return (size or 0) / 2**20


def make_archives(work: Path, size: int) -> dict[str, Path]:
    """The image as `tar --format=oldgnu -S` writes it, and that tar compressed every way compared."""
    image = work / "disk.raw"
    make_image(image, size)
    plain = make_archive("oldgnu", image, work / "image.tar")
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
    return archives


def compare_tools(archive: Path, decompress: list[str], work: Path) -> None:
    """The stream tool and `tar -xf` on `archive`, then tarfuse and ratarmount (if on PATH) mounting it."""
    with open(os.devnull, "wb") as null:
        stream_s = timed([*decompress, str(archive)], stdout=null)
    extract = work / "extract"
    extract.mkdir(exist_ok=True)
    untar_s = timed(["tar", "-xf", str(archive), "-C", str(extract)])
    shutil.rmtree(extract)
    print(f"### {archive.name} ({archive.stat().st_size >> 20} MiB)\n")
    print(f"- `{' '.join(decompress)}` > /dev/null: {stream_s:.2f} s; `tar -xf`: {untar_s:.2f} s")
    mnt, index = work / "mnt", Path(str(archive) + ".tarfuse-index")
    figures = {"tarfuse": mount_case(tarfuse_command("-f", archive, mnt), mnt, "disk.raw", index)}
    if (ratarmount := shutil.which("ratarmount")) is not None:
        rmnt = work / "rmnt"
        figures["ratarmount"] = mount_case([ratarmount, "-f", str(archive), str(rmnt)], rmnt, "disk.raw")
    for tool, found in figures.items():
        print(f"- {tool}: " + ", ".join(f"{k} {v:.3g}" for k, v in found.items()))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB image, one round")
    parser.add_argument("--size-mib", type=int, default=4096)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    size = (256 if args.quick else args.size_mib) << 20
    work = args.work or Path(tempfile.mkdtemp(prefix="tarfuse-bench-compressed-"))
    work.mkdir(parents=True, exist_ok=True)
    archives = make_archives(work, size)
    print(f"image {size >> 20} MiB, tar {archives['plain'].stat().st_size >> 20} MiB; archives in {work}\n")
    header = ("compression", "library", "full pass s", "random 4 KiB median ms", "p95 ms", "peak RSS MiB")
    rows = [
        (c, k, f"{r['full_pass_s']:.2f}", f"{r['random_median_ms']:.1f}", f"{r['random_p95_ms']:.1f}",
         f"{r['peak_rss_mib']:.0f}")
        for c, k, r in compare_libraries(archives, 1 if args.quick else 2)
    ]  # fmt: skip
    print(table(header, rows))
    print()
    for name, decompress in (("gzip", ["gzip", "-dc"]), ("zstd", ["zstd", "-dc"])):
        compare_tools(archives[name], decompress, work)


if __name__ == "__main__":
    run_main(main)
