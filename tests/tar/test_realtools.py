"""Archives written by real tar programs from random sparse files, served byte for byte.

The oracle is the sparse file's own content, so it does not matter how the filesystem or the tar program
finds holes. What each program writes for a sparse file (GNU tar 1.34, bsdtar 3.6, BusyBox 1.35):
GNU tar -S: old GNU 'S' headers (gnu, oldgnu) or PAX 0.0/0.1/1.0 (posix); bsdtar: PAX 1.0 in the pax
format, plain members full of zeros in the gnutar, ustar and v7 formats; BusyBox and tarfile: plain members.
"""

import contextlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit import sparsegen

from tarfuse.image.open import Image, open_image
from tarfuse.sources.file import ArchiveFile

GIB = 1 << 30

# name -> (command before "-cf ARCHIVE -C DIR vm", the sparse dialect written for a file with holes)
TOOLS: dict[str, tuple[list[str], str | None]] = {
    "gnutar-gnu": (["tar", "--format=gnu", "-S"], "oldgnu"),
    "gnutar-oldgnu": (["tar", "--format=oldgnu", "-S"], "oldgnu"),
    "gnutar-pax0.0": (["tar", "--format=posix", "-S", "--sparse-version=0.0"], "pax0.0"),
    "gnutar-pax0.1": (["tar", "--format=posix", "-S", "--sparse-version=0.1"], "pax0.1"),
    "gnutar-pax1.0": (["tar", "--format=posix", "-S", "--sparse-version=1.0"], "pax1.0"),
    "bsdtar-pax": (["bsdtar", "--format=pax"], "pax1.0"),
    "bsdtar-gnutar": (["bsdtar", "--format=gnutar"], None),
    "bsdtar-ustar": (["bsdtar", "--format=ustar"], None),
    "bsdtar-v7": (["bsdtar", "--format=v7"], None),
    "busybox": (["busybox", "tar"], None),
}
TARFILE_FORMATS = {
    "tarfile-ustar": tarfile.USTAR_FORMAT,
    "tarfile-gnu": tarfile.GNU_FORMAT,
    "tarfile-pax": tarfile.PAX_FORMAT,
}
WRITERS = [*TOOLS, *TARFILE_FORMATS]


def _require(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed (make deps installs it)")


def make_tree(top: Path, layout: sparsegen.Layout, seed: int = 0) -> bytes:
    """vm/disk.img (sparse) beside a text file, a symlink and a hard link; return the image bytes."""
    vm = top / "vm"
    vm.mkdir()
    image = sparsegen.write_sparse_file(vm / "disk.img", layout, seed)
    (vm / "notes.txt").write_text("not the image\n")
    (vm / "current.img").symlink_to("disk.img")  # a symlink is never the image, whatever its name
    os.link(vm / "disk.img", vm / "disk.hardlink")
    return image


def write_archive(writer: str, top: Path, archive: Path) -> None:
    if writer in TARFILE_FORMATS:
        with tarfile.open(archive, "w", format=TARFILE_FORMATS[writer]) as tar:
            tar.add(top / "vm", arcname="vm")
        return
    command = TOOLS[writer][0]
    subprocess.run([*command, "-cf", archive, "-C", top, "vm"], check=True, capture_output=True)


@contextlib.contextmanager
def served(archive: Path) -> Iterator[Image]:
    """The image in `archive`, read through a real file descriptor as the daemon reads it."""
    with ArchiveFile(str(archive)) as source:
        yield open_image(source.read_at, source.size)


def _skip_unless_holes(path: Path) -> None:
    if os.stat(path).st_blocks * 512 >= os.stat(path).st_size // 2:
        pytest.skip(f"the filesystem of {path.parent} does not keep holes in sparse files")


def _skip_unless_installed(writer: str) -> None:
    if writer in TOOLS:
        _require(TOOLS[writer][0][0])


@pytest.mark.parametrize("writer", WRITERS)
@settings(max_examples=25, deadline=None)
@given(
    layout=sparsegen.layouts(max_runs=6),
    seed=st.integers(0, 1000),
    reads=st.lists(st.tuples(st.integers(0, 500_000), st.integers(0, 70_000)), max_size=5),
)
def test_random_sparse_file(
    writer: str, layout: sparsegen.Layout, seed: int, reads: list[tuple[int, int]]
) -> None:
    _skip_unless_installed(writer)
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        expected = make_tree(top, layout, seed)
        write_archive(writer, top, top / "out.tar")
        with served(top / "out.tar") as image:
            assert image.name == "vm/disk.img"
            assert image.mapper.size == layout.size
            assert image.mapper.read(0, layout.size) == expected
            for offset, size in reads:
                assert image.mapper.read(offset, size) == expected[offset : offset + size]


@pytest.mark.parametrize("writer", TOOLS)
def test_tool_writes_the_expected_dialect(writer: str, tmp_path: Path) -> None:
    """A file with a 1 MiB hole really is stored sparse by the sparse writers, in their own dialect."""
    _skip_unless_installed(writer)
    layout = sparsegen.Layout(3 << 20, ((4096, 4096), ((2 << 20) + 8192, 5000)))
    expected = make_tree(tmp_path, layout)
    _skip_unless_holes(tmp_path / "vm" / "disk.img")
    write_archive(writer, tmp_path, tmp_path / "out.tar")
    with served(tmp_path / "out.tar") as image:
        sparse = image.member.sparse
        assert (sparse.variant if sparse else None) == TOOLS[writer][1]
        assert image.mapper.read(0, layout.size) == expected


BIG_WRITERS = {
    "gnutar-gnu": ["tar", "--format=gnu", "-S"],
    "gnutar-oldgnu": ["tar", "--format=oldgnu", "-S"],
    "gnutar-pax0.0": ["tar", "--format=posix", "-S", "--sparse-version=0.0"],
    "gnutar-pax0.1": ["tar", "--format=posix", "-S", "--sparse-version=0.1"],
    "gnutar-pax1.0": ["tar", "--format=posix", "-S", "--sparse-version=1.0"],
    "bsdtar-pax": ["bsdtar", "--format=pax"],
}


BIG_SIZE = 9 * GIB
BASE256_SIZE = b"\x80" + BIG_SIZE.to_bytes(11, "big")  # old GNU realsize field, GNU base-256
BIG_RUNS = {0: b"A", 4 * GIB: b"B", 8 * GIB + 512: b"C", BIG_SIZE - 4096: b"D"}


def big_archive(writer: str, tmp_path: Path) -> Path:
    """Archive a 9 GiB sparse file holding BIG_RUNS: past what 11 octal digits can say."""
    _require(BIG_WRITERS[writer][0])
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(BIG_SIZE)
        _skip_unless_holes(path)
        for offset, fill in BIG_RUNS.items():
            os.pwrite(f.fileno(), fill * 4096, offset)
    archive = tmp_path / "big.tar"
    subprocess.run([*BIG_WRITERS[writer], "-cf", archive, "-C", tmp_path, "big.img"], check=True)
    assert archive.stat().st_size < 1 << 20
    return archive


@pytest.mark.parametrize("writer", BIG_WRITERS)
def test_sparse_image_larger_than_8_gib(writer: str, tmp_path: Path) -> None:
    with served(big_archive(writer, tmp_path)) as image:
        assert image.member.sparse is not None
        assert image.mapper.size == BIG_SIZE
        for offset, fill in BIG_RUNS.items():
            assert image.mapper.read(offset, 4096) == fill * 4096
            assert image.mapper.read(offset + 4096, 1) in (b"\0", b"")
        assert image.mapper.read(6 * GIB, 1 << 16) == bytes(1 << 16)


@pytest.mark.parametrize(
    ("writer", "marker"),
    [
        ("gnutar-gnu", BASE256_SIZE),
        ("gnutar-oldgnu", BASE256_SIZE),
        ("gnutar-pax0.0", b"GNU.sparse.size=9663676416\n"),
        ("gnutar-pax0.1", b"GNU.sparse.size=9663676416\n"),
        ("gnutar-pax1.0", b"GNU.sparse.realsize=9663676416\n"),
        ("bsdtar-pax", b"GNU.sparse.realsize=9663676416\n"),
    ],
)
def test_real_size_past_8_gib_encoding(writer: str, marker: bytes, tmp_path: Path) -> None:
    """Pin how each writer says "9 GiB", so the test above covers both encodings."""
    assert marker in big_archive(writer, tmp_path).read_bytes()[:4096]


def test_busybox_archive_of_a_single_file(tmp_path: Path) -> None:
    _require("busybox")
    (tmp_path / "src").mkdir()
    data = os.urandom(70_000)
    (tmp_path / "src" / "disk.raw").write_bytes(data)
    archive = tmp_path / "b.tar"
    subprocess.run(["busybox", "tar", "-cf", archive, "-C", tmp_path / "src", "disk.raw"], check=True)
    with served(archive) as image:
        assert (image.name, image.member.sparse) == ("disk.raw", None)
        assert image.mapper.read(0, len(data)) == data
