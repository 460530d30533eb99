"""Benchmark compressed archives: the decompression libraries side by side, then tarfuse mounts.

`python -m scripts.bench.compressed [--quick] [--size-mib N] [--work DIR]`: each library in a process of its
own (libprobe.py), then tarfuse (and ratarmount, if on PATH) mounting a GCE-style image (`tar --format=oldgnu
-Sc`, then gzip / zstd) twice, next to `gzip -dc`/`zstd -dc` and `tar -xf`. docs/compressed.md keeps a run.
"""

import argparse
import json
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

from .harness import (
    Served,
    ToolFailed,
    drop_caches,
    latencies,
    quantile,
    run_main,
    run_timed,
    serve_fuse,
    timed_read,
)
from .libprobe import LIBRARIES
from .report import table

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
            if (kind := rng.random()) >= data_fraction and mib:
                continue
            source, start = noise if kind < data_fraction / 3 else text, rng.randrange(0, 3 << 20)
            out.seek(mib << 20)
            out.write(source[start : start + (1 << 20)])


def compare_libraries(archives: dict[str, Path], rounds: int) -> list[tuple[str, str, dict[str, float]]]:
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(rounds):  # interleaved: a noisy neighbour hurts every candidate alike
        for compression, kind in ((c, k) for c, kinds in LIBRARIES.items() for k in kinds):
            path = archives[compression if kind != "pyzstd-seekable" else "zstd-seekable"]
            try:
                _, output = run_timed([sys.executable, str(PROBE), kind, str(path)], CAP_S)
            except ToolFailed as exc:
                print(f"  {kind}: failed: {str(exc).splitlines()[-1]}", file=sys.stderr)  # the exception
                continue
            results.setdefault((compression, kind), []).append(json.loads(output))
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
        with serve_fuse(command, mnt, mnt / image, CAP_S, probe=512) as served:
            result[f"{phase}_mount_first_sector_s"] = served.ready_s
            if phase == "first" and index is not None and served.process is not None:
                while not index.exists() and served.process.poll() is None:
                    time.sleep(0.01)
                result["full_index_s"] = time.perf_counter() - served.started
                result["first_mount_peak_rss_mib"] = served.peak_rss() / 2**20  # the pass's two decoders
            elif phase == "second":
                result.update(_reads(served))
                result["daemon_peak_rss_mib"] = served.peak_rss() / 2**20
    return result


def _reads(served: Served) -> dict[str, float]:
    """Random 4 KiB reads at block boundaries, then one sequential pass of the image in 1 MiB reads."""
    rng, buffer = random.Random(3), memoryview(bytearray(4096))
    offsets = [rng.randrange(0, served.size // 4096) * 4096 for _ in range(200)]
    times = latencies(lambda offset: served.read_into(buffer, offset), offsets)
    return {
        "random_4k_median_ms": statistics.median(times) * 1e3,
        "random_4k_p95_ms": quantile(times, 0.95) * 1e3,
        "sequential_mib_s": served.size / timed_read(served, served.size, CAP_S) / 2**20,
    }


def make_archives(work: Path, size: int) -> dict[str, Path]:
    """The image as `tar --format=oldgnu -S` writes it, and that tar compressed every way compared."""
    make_image(work / "disk.raw", size)
    archives = {"plain": make_archive("oldgnu", work / "disk.raw", work / "image.tar")}
    for command in ("gzip -6 -c", "zstd -q -T2 -c", "xz -T2 -1 --block-size=8MiB -c", "bzip2 -1 -c"):
        name = command.split()[0]
        archives[name] = work / f"image.tar.{name}"
        with archives["plain"].open("rb") as source, archives[name].open("wb") as sink:
            subprocess.run(command.split(), stdin=source, stdout=sink, check=True)
    archives["zstd-seekable"] = work / "image.tar.szst"
    import pyzstd

    with (
        archives["plain"].open("rb") as source,
        pyzstd.SeekableZstdFile(archives["zstd-seekable"], "w") as sink,
    ):
        shutil.copyfileobj(source, sink, 8 << 20)
    return archives


def compare_tools(archive: Path, decompress: list[str], work: Path) -> None:
    """The stream tool and `tar -xf` on `archive`, then tarfuse and ratarmount (if on PATH) mounting it."""
    stream_s, _ = run_timed([*decompress, str(archive)], CAP_S, stdout=subprocess.DEVNULL)
    (work / "extract").mkdir(exist_ok=True)
    untar_s, _ = run_timed(["tar", "-xf", str(archive), "-C", str(work / "extract")], CAP_S)
    shutil.rmtree(work / "extract")
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
    print("\n".join(table(header, rows)))
    print()
    for name, decompress in (("gzip", ["gzip", "-dc"]), ("zstd", ["zstd", "-dc"])):
        compare_tools(archives[name], decompress, work)


if __name__ == "__main__":
    run_main(main)
