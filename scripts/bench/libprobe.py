"""The library side of compressed.py: one decompression library measured in this process.

`python scripts/bench/libprobe.py KIND ARCHIVE` opens ARCHIVE with the library KIND, reads it all, then 300
random 4 KiB reads, and prints the figures as JSON. Run as a file, it imports the standard library and the
library measured, nothing else, so that its own peak RSS is the library's (and a bare interpreter's).
"""

import importlib
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def _library(module: str, opener: str, **options: Any) -> Callable[[str], Any]:
    """Open a path with `module.opener(path, **options)`, the module imported only then."""
    return lambda path: getattr(importlib.import_module(module), opener)(path, **options)


def _zstdframes(path: str) -> "_FileOverReadAt":
    from tarfuse.sources.zstdframes import ZstdFrames

    return _FileOverReadAt(ZstdFrames(open(path, "rb", buffering=0)))


LIBRARIES: dict[str, dict[str, Callable[[str], Any]]] = {  # compression -> library -> how to open a file
    "gzip": {
        "rapidgzip": _library("rapidgzip", "RapidgzipFile", parallelization=1),
        "rapidgzip-p2": _library("rapidgzip", "RapidgzipFile", parallelization=2),
        "indexed_gzip": _library("indexed_gzip", "IndexedGzipFile", spacing=4 << 20, readbuf_size=1 << 20),
    },
    "zstd": {
        "zstdframes": _zstdframes,
        "indexed_zstd": _library("indexed_zstd", "IndexedZstdFile"),  # if installed, to compare
        "pyzstd-seekable": _library("pyzstd", "SeekableZstdFile"),
    },
    "xz": {"python-xz": _library("xz", "open")},
    "bzip2": {
        "rapidgzip-bzip2": _library("rapidgzip", "IndexedBzip2File", parallelization=1),
        "indexed_bzip2": _library("indexed_bzip2", "open", parallelization=1),
    },
}


def library_probe(kind: str, path: str) -> dict[str, float]:
    """Open, read all sequentially, then 300 random 4 KiB reads."""
    start = time.perf_counter()
    file = next(openers[kind] for openers in LIBRARIES.values() if kind in openers)(path)
    total = 0
    while chunk := file.read(4 << 20):
        total += len(chunk)
    full = time.perf_counter() - start
    rng, latencies = random.Random(0), []
    for _ in range(300):
        offset = rng.randrange(0, max(1, total - 4096))
        t = time.perf_counter()
        file.seek(offset)
        file.read(4096)
        latencies.append(time.perf_counter() - t)
    file.close()
    latencies.sort()
    # Not getrusage's ru_maxrss: Linux carries the parent's high-water mark across fork and exec.
    with open("/proc/self/status", encoding="ascii") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return {
        "full_pass_s": full,
        "random_median_ms": statistics.median(latencies) * 1e3,
        "random_p95_ms": latencies[int(len(latencies) * 0.95)] * 1e3,
        "peak_rss_mib": peak_kib / 1024,
    }


class _FileOverReadAt:
    """seek() and read() over a tarfuse decoder's read_at, as the probe uses the libraries' file objects."""

    def __init__(self, decoder: Any) -> None:
        self._decoder, self._position = decoder, 0

    def seek(self, offset: int) -> None:
        self._position = offset

    def read(self, size: int) -> bytes:
        data: bytes = self._decoder.read_at(self._position, size)
        self._position += len(data)
        return data

    def close(self) -> None:
        self._decoder.close()


if __name__ == "__main__":
    print(json.dumps(library_probe(sys.argv[1], sys.argv[2])))
