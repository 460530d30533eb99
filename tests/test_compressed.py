"""Compressed archives without FUSE: every compressor's output served byte for byte, random reads across
chunk and checkpoint boundaries, the persistent index, and broken streams."""

import logging
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import pyzstd
from conftest import SampleImage, make_archive, require_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tarfuse import index
from tarfuse.cli import split_mount_options
from tarfuse.compressed import CHUNK_SIZE, CompressedSource, decompressed, sniff
from tarfuse.errors import ArchiveError, CompressedArchive, CorruptCompressed
from tarfuse.image import open_first_image, open_image
from tarfuse.source import ArchiveFile


def _pipe(command: list[str]) -> Callable[[Path, Path], None]:
    def compress(plain: Path, out: Path) -> None:
        require_tool(command[0])
        with plain.open("rb") as source, out.open("wb") as sink:
            subprocess.run(command, stdin=source, stdout=sink, check=True)

    return compress


def _seekable_zstd(plain: Path, out: Path) -> None:
    with (
        plain.open("rb") as source,
        pyzstd.SeekableZstdFile(out, "w", max_frame_content_size=1 << 20) as sink,
    ):
        shutil.copyfileobj(source, sink)


COMPRESSORS: dict[str, Callable[[Path, Path], None]] = {
    "gzip": _pipe(["gzip", "-6", "-c"]),
    "gzip-concatenated": lambda p, o: _concatenated_gzip(p, o),
    "zstd-single-frame": _pipe(["zstd", "-q", "-c"]),
    "zstd-multi-frame": _pipe(["pzstd", "-q", "-p", "2", "-c"]),
    "zstd-seekable": _seekable_zstd,
    "xz-blocks": _pipe(["xz", "-T2", "-1", "--block-size=1MiB", "-c"]),
    "xz-one-block": _pipe(["xz", "-T1", "-1", "-c"]),
    "bzip2": _pipe(["bzip2", "-1", "-c"]),
}


def _concatenated_gzip(plain: Path, out: Path) -> None:
    """Two gzip members back to back (`cat a.gz b.gz`), split in the middle of the tar."""
    data = plain.read_bytes()
    half = len(data) // 2 + 123
    parts = [subprocess.run(["gzip", "-1", "-c"], input=p, capture_output=True, check=True).stdout
             for p in (data[:half], data[half:])]  # fmt: skip
    out.write_bytes(b"".join(parts))


@pytest.fixture(scope="module")
def plain_tar(sample_image: SampleImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample image in an old GNU sparse tar, as GCE images are made (before compression)."""
    return make_archive("oldgnu", sample_image.path, tmp_path_factory.mktemp("plain") / "disk.tar")


@pytest.fixture(scope="module")
def dense_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 MiB of data with no holes (random runs and text), so reads cross chunks and checkpoints."""
    directory = tmp_path_factory.mktemp("dense")
    rng = random.Random(6)
    text = b" ".join(rng.choice((b"boot", b"disk", b"sector", b"tar", b"image")) for _ in range(300_000))
    with (directory / "data.img").open("wb") as out:
        for i in range(16):
            out.write(rng.randbytes(1 << 20) if i % 3 == 0 else text[: 1 << 20])
    return make_archive("gnu", directory / "data.img", directory / "dense.tar")


@pytest.fixture(scope="module")
def dense_of(dense_tar: Path) -> Callable[[str], Path]:
    def get(kind: str) -> Path:
        archive = dense_tar.with_name(f"dense.tar.{kind}")
        if not archive.exists():
            COMPRESSORS[kind](dense_tar, archive)
        return archive

    return get


@pytest.fixture(scope="module")
def compressed_of(plain_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    directory = tmp_path_factory.mktemp("compressed")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = directory / f"disk.tar.{kind}"
            COMPRESSORS[kind](plain_tar, made[kind])
        return made[kind]

    return get


def open_compressed(path: Path, cache_size: int = 8 << 20) -> CompressedSource:
    source = decompressed(ArchiveFile(str(path)), cache_size)
    assert isinstance(source, CompressedSource)
    return source


def run_pass(source: CompressedSource, served: str, index_path: str | None) -> index.IndexingPass:
    indexing = index.IndexingPass(source, served, index_path)
    indexing.run(threading.Event())
    return indexing


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_image_read_through_the_decompressed_view_equals_the_original(
    kind: str, compressed_of: Callable[[str], Path], sample_image: SampleImage
) -> None:
    with open_compressed(compressed_of(kind)) as source:
        image = open_first_image(source.pread, source.size, None, source.pread_into)
        assert image.name == "disk.raw"
        assert image.mapper.read(0, image.mapper.size) == sample_image.data


def test_gnu_tar_czf_archive_is_served(sample_image: SampleImage, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar.gz"
    subprocess.run(
        ["tar", "--format=oldgnu", "-Sczf", str(archive), "-C", str(sample_image.path.parent), "disk.raw"],
        check=True,
    )
    with open_compressed(archive) as source:
        image = open_first_image(source.pread, source.size, None, source.pread_into)
        assert image.mapper.read(0, image.mapper.size) == sample_image.data


@pytest.mark.parametrize("kind", ["gzip", "zstd-multi-frame", "xz-blocks"])  # bzip2: too slow to repeat
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_reads_match_the_decompressed_archive(
    kind: str, data: st.DataObject, dense_tar: Path, dense_of: Callable[[str], Path]
) -> None:
    reference = dense_tar.read_bytes()
    archive = dense_of(kind)
    boundary = st.integers(1, len(reference) // CHUNK_SIZE).map(lambda k: k * CHUNK_SIZE)
    with open_compressed(archive, cache_size=2 * CHUNK_SIZE) as source:
        for _ in range(8):
            near = data.draw(boundary) + data.draw(st.integers(-5000, 5000))
            offset = data.draw(st.one_of(st.integers(0, len(reference)), st.just(max(0, near))))
            size = data.draw(st.integers(0, 3 * CHUNK_SIZE))
            assert source.pread(size, offset) == reference[offset : offset + size]


def test_the_background_pass_completes_and_saves_an_index(
    compressed_of: Callable[[str], Path], plain_tar: Path, tmp_path: Path
) -> None:
    where = str(tmp_path / "gz.index")
    with open_compressed(compressed_of("gzip")) as source:
        assert not source.size_known
        indexing = run_pass(source, "disk.raw", where)
        assert indexing.progress.done
        assert source.size == plain_tar.stat().st_size
        assert indexing.others == []
    with open_compressed(compressed_of("gzip")) as again:
        assert index.use_saved_index(where, again)
        assert again.size == plain_tar.stat().st_size
        assert again.pread(100, again.size - 100) == plain_tar.read_bytes()[-100:]


def test_a_modified_archive_invalidates_the_index(
    compressed_of: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = tmp_path / "a.tar.gz"
    shutil.copy(compressed_of("gzip"), archive)
    where = str(tmp_path / "a.index")
    with open_compressed(archive) as source:
        run_pass(source, "disk.raw", where)
    os.utime(archive, ns=(0, 1_000_000_000))  # same bytes, another mtime: another archive, for all we know
    with open_compressed(archive) as source, caplog.at_level(logging.WARNING):
        assert not index.use_saved_index(where, source)
    assert "stale" in caplog.text


def test_a_corrupt_index_is_rebuilt_with_a_log_line(
    compressed_of: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    where = tmp_path / "gz.index"
    with open_compressed(compressed_of("gzip")) as source:
        run_pass(source, "disk.raw", str(where))
    damaged = bytearray(where.read_bytes())
    damaged[-10] ^= 0xFF
    where.write_bytes(bytes(damaged))
    with open_compressed(compressed_of("gzip")) as source:
        with caplog.at_level(logging.WARNING):
            assert not index.use_saved_index(str(where), source)
        assert "damaged" in caplog.text
        run_pass(source, "disk.raw", str(where))
    with open_compressed(compressed_of("gzip")) as source:
        assert index.use_saved_index(str(where), source)


def test_index_goes_to_the_cache_directory_when_the_archive_directory_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert index.default_path(str(tmp_path / "x.tar.gz"), [1]) == str(tmp_path / "x.tar.gz.tarfuse-index")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda *args: False)
    assert index.default_path(str(tmp_path / "x.tar.gz"), [1]).startswith(str(tmp_path / "cache" / "tarfuse"))


def test_the_first_image_is_served_and_a_later_one_is_named_in_a_warning(
    sample_image: SampleImage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tree := tmp_path / "tree").mkdir()
    for name in ("a.raw", "b.qcow2"):
        shutil.copy(sample_image.path, tree / name)
    archive = tmp_path / "two.tar.gz"
    subprocess.run(["tar", "-Sczf", str(archive), "-C", str(tree), "a.raw", "b.qcow2"], check=True)
    with open_compressed(archive) as source:
        image = open_first_image(source.pread, source.size, None, source.pread_into)
        assert image.name == "a.raw"
        with caplog.at_level(logging.WARNING):
            indexing = run_pass(source, image.name, None)
    assert indexing.others == ["b.qcow2"]
    assert "'b.qcow2'" in caplog.text


def test_truncated_gzip_is_a_truncated_archive(compressed_of: Callable[[str], Path], tmp_path: Path) -> None:
    data = compressed_of("gzip").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with open_compressed(cut) as source:
        image = open_first_image(source.pread, source.size, None, source.pread_into)
        with pytest.raises(ArchiveError):
            image.mapper.read(0, image.mapper.size)


def _corrupt_middle(path: Path, out: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)  # deflate: a stored block whose lengths do not match
    out.write_bytes(bytes(data))


@pytest.mark.parametrize(("kind", "error"), [("gzip", ArchiveError), ("xz-blocks", CorruptCompressed)])
def test_reads_of_a_corrupt_region_fail(
    kind: str, error: type[Exception], dense_tar: Path, dense_of: Callable[[str], Path], tmp_path: Path
) -> None:
    bad = tmp_path / f"bad.{kind}"
    _corrupt_middle(dense_of(kind), bad)
    with open_compressed(bad) as source:
        image = open_image(source.pread, source.size, None, source.pread_into)
        start = image.member.data_offset
        assert image.mapper.read(0, 4096) == dense_tar.read_bytes()[start : start + 4096]  # before the damage
        with pytest.raises(error, match="offset"):
            image.mapper.read(0, image.mapper.size)


def test_an_archive_whose_headers_cannot_be_decompressed_is_refused(
    compressed_of: Callable[[str], Path], tmp_path: Path
) -> None:
    data = bytearray(compressed_of("gzip").read_bytes())
    data[12:4000] = bytes(3988)
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArchiveError) as info, open_compressed(bad) as source:
        open_first_image(source.pread, source.size, None, source.pread_into)
    assert info.value.offset is not None


@pytest.mark.parametrize(
    ("head", "name"),
    [(b"\x04\x22\x4d\x18", "lz4"), (b"LZIP", "lzip"), (b"\x1f\x9d", "compress")],
)
def test_unsupported_compression_is_refused_with_how_to_unpack(head: bytes, name: str) -> None:
    with pytest.raises(CompressedArchive, match=name):
        sniff(head + bytes(12))


@pytest.mark.parametrize(
    ("head", "name"),
    [(b"\x1f\x8b", "gzip"), (b"BZh9", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
     (b"\x50\x2a\x4d\x18", "zstd"), (b"ustar", None)],
)  # fmt: skip
def test_compression_is_chosen_by_content(head: bytes, name: str | None) -> None:
    assert sniff(head + bytes(8)) == name


def test_index_options_are_parsed() -> None:
    options = split_mount_options(["noindex,index=/var/cache/x.idx,cache_size=16M"])
    assert (options.noindex, options.index) == (True, "/var/cache/x.idx")
    assert "cache_size=16M" in options.remote  # one option for both caches, parsed by remote.py
