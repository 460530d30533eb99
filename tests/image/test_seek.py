"""SEEK_DATA / SEEK_HOLE on the served file: answered from the archive's map, as lseek(2) says.

The map decides, not the bytes: a run of zeros stored as data is data. The oracle is the original file on
this machine's file system, whose holes GNU tar and bsdtar found with the same calls when they archived it
(data written in whole 4 KiB blocks, so ext4 reports them exactly).
"""

import errno
import json
import os
import random
import subprocess
from pathlib import Path

import pyfuse3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.httpserver import RangeServer
from kit.mounts import MountFactory
from kit.needs import make_archive, require_tool

from tarfuse.image.mapper import ImageMapper
from tarfuse.tar.sparse import SparseMap, _int64s

KiB, MiB = 1 << 10, 1 << 20
HAS_HANDLER = hasattr(pyfuse3.Operations, "lseek")
needs_handler = pytest.mark.skipif(
    not HAS_HANDLER, reason="this pyfuse3 has no lseek handler (make dev builds one)"
)


# ---- the mapper's answers against a byte-by-byte model ------------------------------------------------


def mapper_of(extents: list[tuple[int, int]], size: int) -> ImageMapper:
    sparse_map = SparseMap(
        size, _int64s([o for o, _ in extents]), _int64s([n for _, n in extents]), _int64s([0] * len(extents))
    )
    return ImageMapper(lambda offset, n: bytes(n), sparse_map)


@st.composite
def maps(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int]:
    """Sorted extents, some touching, some empty (GNU tar ends a map with one), and a size past them."""
    extents, at = [], 0
    for _ in range(draw(st.integers(0, 6))):
        at += draw(st.sampled_from([0, 0, 1, 7, 100]))
        length = draw(st.sampled_from([0, 1, 5, 64]))
        extents.append((at, length))
        at += length
    return extents, at + draw(st.integers(0, 50))


@given(maps())
@settings(max_examples=300, deadline=None)
def test_next_data_and_next_hole_match_a_byte_model(case: tuple[list[tuple[int, int]], int]) -> None:
    extents, size = case
    data = [False] * size
    for offset, length in extents:
        for i in range(offset, min(offset + length, size)):
            data[i] = True
    mapper = mapper_of(extents, size)
    for offset in range(size):
        expected_data = next((i for i in range(offset, size) if data[i]), None)
        expected_hole = next((i for i in range(offset, size) if not data[i]), size)
        assert mapper.next_data(offset) == expected_data, (extents, offset)
        assert mapper.next_hole(offset) == expected_hole, (extents, offset)


# ---- through a mount: the same answers as the original file --------------------------------------------


def sparse_original(path: Path, seed: int) -> list[tuple[int, int]]:
    """A 40 MiB file with a few data runs in whole 4 KiB blocks (one ending the file, one all zeros)."""
    rng = random.Random(seed)
    size = 40 * MiB
    runs, at = [], rng.randrange(0, 3) * 64 * KiB
    while at < size - MiB:
        length = rng.randrange(1, 64) * 4 * KiB
        runs.append((at, length))
        at += length + rng.randrange(1, 200) * 4 * KiB
    if seed % 2:
        runs.append((size - 8 * KiB, 8 * KiB))  # data up to the end: no trailing hole
    with path.open("wb") as file:
        file.truncate(size)
        for offset, length in runs:
            file.seek(offset)
            file.write(rng.randbytes(length))
    return runs


def seek(fd: int, offset: int, whence: int) -> int | str:
    try:
        return os.lseek(fd, offset, whence)
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]


@pytest.mark.fuse
@needs_handler
@pytest.mark.parametrize("kind", ["gnu", "oldgnu", "pax0.0", "pax0.1", "pax1.0", "bsdtar"])
def test_seek_data_and_hole_on_the_served_file_match_the_original(
    kind: str, mount: MountFactory, tmp_path: Path
) -> None:
    source = tmp_path / "src" / "disk.img"
    source.parent.mkdir()
    runs = sparse_original(source, seed=len(kind))
    archive = make_archive(kind, source.parent, tmp_path / "disk.tar")
    served = tmp_path / "served"
    served.write_bytes(b"")
    mount(archive, served)
    size = source.stat().st_size
    edges = {
        e
        for offset, length in runs
        for e in (offset - 1, offset, offset + 1, offset + length - 1, offset + length)
    }
    offsets = sorted({0, size - 1, size, size + 1, -1, *edges, *random.Random(1).sample(range(size), 200)})
    original, mounted = os.open(source, os.O_RDONLY), os.open(served, os.O_RDONLY)
    try:
        for offset in offsets:
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                assert seek(mounted, offset, whence) == seek(original, offset, whence), (kind, offset, whence)
    finally:
        os.close(original)
        os.close(mounted)


@pytest.mark.fuse
@needs_handler
def test_zeros_stored_as_data_are_data(mount: MountFactory, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "disk.img").write_bytes(bytes(MiB))  # tar without -S stores the zeros
    archive = tmp_path / "plain.tar"
    subprocess.run(["tar", "-cf", archive, "-C", tmp_path / "src", "disk.img"], check=True)
    served = tmp_path / "served"
    served.write_bytes(b"")
    mount(archive, served)
    fd = os.open(served, os.O_RDONLY)
    try:
        assert (os.lseek(fd, 4096, os.SEEK_DATA), os.lseek(fd, 4096, os.SEEK_HOLE)) == (4096, MiB)
    finally:
        os.close(fd)


@pytest.mark.fuse
@needs_handler
def test_qemu_img_map_and_cp_sparse_see_the_holes(mount: MountFactory, tmp_path: Path) -> None:
    require_tool("qemu-img")
    source = tmp_path / "src" / "disk.img"
    source.parent.mkdir()
    with source.open("wb") as file:  # 9 GiB with 64 MiB of data: a large sparse disk
        file.truncate(9 << 30)
        for gib in (0, 4, 8):
            file.seek(gib << 30)
            file.write(random.Random(gib).randbytes(21 * MiB + 4096))
    archive = make_archive("pax1.0", source.parent, tmp_path / "disk.tar")
    served = tmp_path / "served"
    served.write_bytes(b"")
    mount(archive, served)
    mapped = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", "raw", served],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    data = [(e["start"], e["length"]) for e in mapped if e["data"]]
    assert data == [(gib << 30, 21 * MiB + 4096) for gib in (0, 4, 8)]
    copy = tmp_path / "copy.img"
    subprocess.run(["cp", "--sparse=auto", served, copy], check=True)
    assert copy.stat().st_blocks * 512 < 80 * MiB  # the data, not 9 GiB of zeros
    assert subprocess.run(["cmp", source, copy], check=False).returncode == 0
    converted = tmp_path / "converted.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", served, converted], check=True)
    assert (
        subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", source, converted], check=False
        ).returncode
        == 0
    )


@pytest.mark.fuse
def test_without_the_handler_the_whole_file_is_data(mount: MountFactory, tmp_path: Path) -> None:
    # What a pyfuse3 without the handler gives, and what ours must never give by answering ENOSYS.
    source = tmp_path / "src" / "disk.img"
    source.parent.mkdir()
    sparse_original(source, seed=2)
    archive = make_archive("gnu", source.parent, tmp_path / "disk.tar")
    served = tmp_path / "served"
    served.write_bytes(b"")
    mount(archive, served)
    fd = os.open(served, os.O_RDONLY)
    try:
        found = os.lseek(fd, 0, os.SEEK_HOLE)
    finally:
        os.close(fd)
    assert (found < 40 * MiB) == HAS_HANDLER


def assert_seeks_agree(served: Path, original: Path, runs: list[tuple[int, int]]) -> None:
    """SEEK_DATA and SEEK_HOLE at 0 and at every run's edges: the same answer on both files."""
    theirs, ours = os.open(original, os.O_RDONLY), os.open(served, os.O_RDONLY)
    try:
        for offset in sorted({0, *(o for run in runs for o in (run[0], run[0] + run[1]))}):
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                assert seek(ours, offset, whence) == seek(theirs, offset, whence), (offset, whence)
    finally:
        os.close(theirs)
        os.close(ours)


@pytest.mark.fuse
@needs_handler
@pytest.mark.parametrize("compress", [["gzip"], ["bzip2"], ["xz", "-T2"], ["zstd", "-q", "--rm"]])
def test_seek_on_a_sparse_member_of_a_compressed_tar(
    compress: list[str], mount: MountFactory, tmp_path: Path
) -> None:
    source = tmp_path / "src" / "disk.img"
    source.parent.mkdir()
    runs = sparse_original(source, seed=7)
    archive = make_archive("pax1.0", source.parent, tmp_path / "disk.tar")
    subprocess.run([*compress, str(archive)], check=True)
    compressed = next(tmp_path.glob("disk.tar.*"))
    served = tmp_path / "served"
    served.write_bytes(b"")
    mount(compressed, served, "-o", "noindex")
    assert_seeks_agree(served, source, runs)


@pytest.mark.fuse
@needs_handler
@pytest.mark.parametrize("compress", [None, ["gzip", "-c"]], ids=["tar", "tar.gz"])
def test_seek_on_a_sparse_member_over_http(
    compress: list[str] | None, mount: MountFactory, tmp_path: Path, server: RangeServer, private_cache: Path
) -> None:
    """The map answers for an archive on a web server too: no byte of a hole is fetched to find it."""
    source = tmp_path / "src" / "disk.img"
    source.parent.mkdir()
    runs = sparse_original(source, seed=9)
    archive = make_archive("gnu", source.parent, tmp_path / "disk.tar").read_bytes()
    if compress is not None:
        archive = subprocess.run(compress, input=archive, capture_output=True, check=True).stdout
    served = tmp_path / "served"
    served.write_bytes(b"")
    mount(server.put("disk.tar" + (".gz" if compress else ""), archive), served, "-o", "noindex")
    assert_seeks_agree(served, source, runs)
