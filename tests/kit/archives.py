"""Compressed archives that tests in several files build, made by the real tar and compressors.

`gce_tarball`: the sample image as GCE image tarballs are made (`tar --format=oldgnu -Sczf`).
`repeated_block_tar_zst`: a one-frame .tar.zst of one random 1.5 MiB block repeated. zstd's window spans
the block, so the archive stays ~1.5 MiB, while a spill's 1 MiB frames cannot compress random bytes and
would be as large as the tar.
"""

import random
import subprocess
import tarfile
from pathlib import Path

from kit.needs import require_tool
from kit.sample import SampleImage

MiB = 1 << 20
BLOCK = 3 * MiB // 2


def gce_tarball(sample_image: SampleImage, out: Path) -> Path:
    """`tar --format=oldgnu -Sczf image.tar.gz disk.raw`, the way GCE images are made; return `out`."""
    subprocess.run(
        ["tar", "--format=oldgnu", "-Sczf", str(out), "-C", str(sample_image.path.parent), "disk.raw"],
        check=True,
    )
    return out


def repeated_block_tar_zst(out: Path, repeats: int) -> bytes:
    """Write a one-frame .tar.zst of disk.raw, a random 1.5 MiB block `repeats` times; return disk.raw."""
    require_tool("zstd")
    data = random.Random(repeats).randbytes(BLOCK) * repeats
    with out.open("wb") as sink:
        zstd = subprocess.Popen(["zstd", "-q", "--single-thread", "-c"], stdin=subprocess.PIPE, stdout=sink)
        assert zstd.stdin is not None
        with tarfile.open(fileobj=zstd.stdin, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            info = tarfile.TarInfo("disk.raw")
            info.size = len(data)
            tar.addfile(info, _Reader(data))
        zstd.stdin.close()
        assert zstd.wait() == 0
    return data


class _Reader:
    """A file-like view of bytes for tarfile.addfile, without a copy into a BytesIO."""

    def __init__(self, data: bytes) -> None:
        self._view, self._at = memoryview(data), 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._at + size
        chunk = self._view[self._at : end]
        self._at += len(chunk)
        return bytes(chunk)
