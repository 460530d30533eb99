"""The wait for a bare compressed image's size has a bound: -o max_ratio (10,000 times, at least 256 MiB).

gzip and bzip2 do not say the size of what they hold (gzip only modulo 4 GiB), so a bare `.img.gz` or
`.img.bz2` is decompressed once before the mount is live. A few KB of bzip2 can hold gigabytes of zeros:
past max_ratio times its compressed size the stream is refused with one line, nothing mounted and nothing
kept. The streams here are made of concatenated members (gzip) or streams (bzip2), as pigz and lbzip2
write them: 272 MiB of image from a few hundred KB, in no time.
"""

import bz2
import gzip
import random
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from kit.mounts import MountFactory, is_mounted, tarfuse_command

from tarfuse import passes
from tarfuse.sources.compressed import decompressed
from tarfuse.sources.file import ArchiveFile

MiB = 1 << 20
PART = 16 * MiB
PARTS = 17  # 272 MiB of image: past the 256 MiB floor
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gz": lambda data: gzip.compress(data, 9, mtime=0),
    "bz2": lambda data: bz2.compress(data, 9),
}


def boot_sector() -> bytes:
    """An MBR's first sector: enough for a raw image to be told from an empty tar (all zeros)."""
    sector = bytearray(512)
    sector[0:3] = b"\xeb\x63\x90"
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def image_of_zeros(tmp_path: Path, suffix: str, data: bytes = b"") -> tuple[Path, int]:
    """A bare `disk.img.SUFFIX`: a boot sector, then `data`, then zeros up to PARTS * PART bytes."""
    head = boot_sector() + data
    first = head + bytes(PART - len(head))
    compress = COMPRESSORS[suffix]
    path = tmp_path / f"disk.img.{suffix}"
    path.write_bytes(compress(first) + compress(bytes(PART)) * (PARTS - 1))
    return path, PARTS * PART


def refused(command: list[str]) -> str:
    """Run a tarfuse command that must fail with one line; return that line."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.splitlines()[-1]


@pytest.mark.fuse
@pytest.mark.parametrize("suffix", ["gz", "bz2"])
def test_a_bare_image_past_the_ratio_bound_is_refused_in_one_line(tmp_path: Path, suffix: str) -> None:
    archive, _ = image_of_zeros(tmp_path, suffix)
    (served := tmp_path / "mnt").mkdir()
    line = refused(tarfuse_command("-f", archive, served, "-o", "max_ratio=100"))
    compression = {"gz": "gzip", "bz2": "bzip2"}[suffix]
    assert line.startswith(f"tarfuse: {archive}: the {compression} stream decompresses to more than 100 ")
    assert "-o max_ratio=N raises the bound" in line
    assert not is_mounted(served)
    assert [p.name for p in tmp_path.iterdir()] == [archive.name, "mnt"]  # no index, no spill kept


def test_list_past_the_ratio_bound_is_refused_the_same_way(tmp_path: Path) -> None:
    archive, _ = image_of_zeros(tmp_path, "gz")
    line = refused(tarfuse_command("--list", archive, "-o", "max_ratio=500"))
    assert "the gzip stream decompresses to more than 500 times its compressed size" in line


@pytest.mark.fuse
def test_a_bare_image_under_the_bound_is_served(mount: MountFactory, tmp_path: Path) -> None:
    archive, size = image_of_zeros(tmp_path, "gz")  # gzip: about 1,030 times at best
    (served := tmp_path / "mnt").mkdir()
    mount(archive, served, "-o", "max_ratio=2000")
    image = served / "disk.img"
    assert image.stat().st_size == size
    with image.open("rb") as file:
        assert file.read(512) == boot_sector()
        file.seek(size - MiB)
        assert file.read() == bytes(MiB)


@pytest.mark.fuse
def test_the_default_bound_lets_an_image_with_data_through(mount: MountFactory, tmp_path: Path) -> None:
    # bzip2, whose ratio on zeros is the highest: 512 KiB of data in 272 MiB, about 500 times.
    data = random.Random(20).randbytes(MiB // 2)
    archive, size = image_of_zeros(tmp_path, "bz2", data)
    (served := tmp_path / "mnt").mkdir()
    mounted = mount(archive, served)
    image = served / "disk.img"
    assert image.stat().st_size == size
    with image.open("rb") as file:
        assert file.read(512 + len(data)) == boot_sector() + data
    assert "decompressing it once" in mounted.stderr_text()


def test_the_progress_of_the_wait_says_how_much_of_the_input_was_read(tmp_path: Path) -> None:
    """What the wait prints every few seconds: compressed bytes read, with a percentage."""
    archive, _ = image_of_zeros(tmp_path, "gz")
    with decompressed(ArchiveFile(str(archive)), 16 * MiB) as source:
        assert not isinstance(source, ArchiveFile)
        waited = passes.IndexingPass(source, source.path, None, scan=False, max_ratio=100)
        waited.quiet = True
        waited.run(threading.Event())
        shown = waited.status()
    assert "compressed (" in shown
    assert "%)" in shown
    assert int(shown.split("compressed (")[1].split("%")[0]) < 100  # stopped at the bound, before the end
