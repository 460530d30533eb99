"""The library side of compressed.py: one decompression library measured in this process.

    python scripts/bench/libprobe.py KIND ARCHIVE

opens ARCHIVE with the library KIND (one of LIBRARIES' values), reads it all, then 300 random 4 KiB reads,
and prints the figures as JSON. compressed.py runs one process per measurement, so the peak RSS is the
library's (and a bare interpreter's): run as a file, this module imports the standard library and the
library measured, nothing else (not the harness, which loads pyfuse3 and trio), and reads its own VmHWM.
"""

import json
import random
import statistics
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tarfuse.sources.zstdframes import ZstdFrames

LIBRARIES = {
    "gzip": ["rapidgzip", "rapidgzip-p2", "indexed_gzip"],
    "zstd": ["zstdframes", "indexed_zstd", "pyzstd-seekable"],  # indexed_zstd: if installed, to compare
    "xz": ["python-xz"],
    "bzip2": ["rapidgzip-bzip2", "indexed_bzip2"],
}


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
        "peak_rss_mib": _peak_rss_kib() / 1024,
    }


def _peak_rss_kib() -> int:
    """This process's own peak RSS. Not getrusage's ru_maxrss: Linux carries the parent's high-water mark
    across fork and exec, so that is never below the RSS of the benchmark process that started this one."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


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


if __name__ == "__main__":
    print(json.dumps(library_probe(sys.argv[1], sys.argv[2])))
