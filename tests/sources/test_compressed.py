"""Compressed archives without FUSE: every compressor's output served byte for byte, random reads across
chunk and checkpoint boundaries, the persistent index, the zstd frame reader, the spill, broken streams."""

import io
import itertools
import json
import logging
import os
import random
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
import pyzstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.archives import gce_tarball
from kit.needs import make_archive, require_tool
from kit.sample import SampleImage

from tarfuse import passes
from tarfuse.cli import split_mount_options
from tarfuse.errors import ArchiveError, CompressedArchive, CorruptCompressed, TruncatedArchive
from tarfuse.image.open import open_first_image
from tarfuse.sources import index
from tarfuse.sources.compressed import CHUNK_SIZE, CompressedSource, decompressed
from tarfuse.sources.compression import DecodeError, sniff
from tarfuse.sources.file import ArchiveFile
from tarfuse.sources.zstdframes import ZstdFrames


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


def run_pass(source: CompressedSource, served: str, index_path: str | None) -> passes.IndexingPass:
    indexing = passes.IndexingPass(source, served, index_path)
    indexing.run(threading.Event())
    return indexing


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_image_read_through_the_decompressed_view_equals_the_original(
    kind: str, compressed_of: Callable[[str], Path], sample_image: SampleImage
) -> None:
    with open_compressed(compressed_of(kind)) as source:
        image = open_first_image(source.read_at, source.size, None, source.pread_into)
        assert image.name == "disk.raw"
        assert image.mapper.read(0, image.mapper.size) == sample_image.data


def test_gnu_tar_czf_archive_is_served(sample_image: SampleImage, tmp_path: Path) -> None:
    archive = gce_tarball(sample_image, tmp_path / "image.tar.gz")
    with open_compressed(archive) as source:
        image = open_first_image(source.read_at, source.size, None, source.pread_into)
        assert image.mapper.read(0, image.mapper.size) == sample_image.data


@pytest.mark.parametrize(  # bzip2: too slow to repeat
    "kind", ["gzip", "zstd-single-frame", "zstd-multi-frame", "zstd-seekable", "xz-blocks"]
)
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
            assert source.read_at(offset, size) == reference[offset : offset + size]


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
        assert again.read_at(again.size - 100, 100) == plain_tar.read_bytes()[-100:]


@pytest.mark.parametrize("layout", ["GZTOOL", "INDEXED_GZIP"])  # ours now; what older index files hold
def test_a_gzip_index_in_either_format_loads(
    layout: str, compressed_of: Callable[[str], Path], plain_tar: Path, tmp_path: Path
) -> None:
    import rapidgzip

    archive, where = compressed_of("gzip"), str(tmp_path / "gz.index")
    with rapidgzip.RapidgzipFile(str(archive), parallelization=1) as gz:
        gz.seek(0, os.SEEK_END)
        gz.export_index(blob := io.BytesIO(), getattr(rapidgzip.IndexFormat, layout))
    with open_compressed(archive) as source:
        index.save(where, source, plain_tar.stat().st_size, blob.getvalue())
    with open_compressed(archive) as again:
        assert index.use_saved_index(where, again)
        assert again.read_at(again.size - 100, 100) == plain_tar.read_bytes()[-100:]


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
        image = open_first_image(source.read_at, source.size, None, source.pread_into)
        assert image.name == "a.raw"
        with caplog.at_level(logging.WARNING):
            indexing = run_pass(source, image.name, None)
    assert indexing.others == ["b.qcow2"]
    assert "'b.qcow2'" in caplog.text


@pytest.mark.parametrize(
    ("kind", "refused_by", "error"),
    [
        ("gzip", "read", TruncatedArchive),  # rapidgzip ends the stream early; the mapper finds data missing
        ("zstd-single-frame", "open", CorruptCompressed),  # the headers' chunk is the whole small frame
        ("zstd-multi-frame", "open", CorruptCompressed),
    ],
)
def test_a_stream_cut_short_is_refused_by_the_step_that_reaches_the_cut(
    kind: str,
    refused_by: str,
    error: type[ArchiveError],
    compressed_of: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    data = compressed_of(kind).read_bytes()
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with open_compressed(cut) as source:
        if refused_by == "open":
            with pytest.raises(error) as info:
                open_first_image(source.read_at, source.size, None, source.pread_into)
        else:
            image = open_first_image(source.read_at, source.size, None, source.pread_into)
            with pytest.raises(error) as info:
                image.mapper.read(0, image.mapper.size)
    assert info.value.offset is not None


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("gzip", TruncatedArchive),
        ("zstd-single-frame", CorruptCompressed),
        ("zstd-multi-frame", CorruptCompressed),
    ],
)
def test_a_stream_cut_inside_the_image_fails_the_read_that_reaches_the_cut(
    kind: str, error: type[ArchiveError], dense_tar: Path, tmp_path: Path
) -> None:
    whole = tmp_path / f"dense.{kind}"
    COMPRESSORS[kind](dense_tar, whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with open_compressed(cut) as source:
        image = open_first_image(source.read_at, source.size, None, source.pread_into)  # headers decode
        assert image.mapper.read(0, 1 << 20) == dense_tar.read_bytes()[512 : 512 + (1 << 20)]
        with pytest.raises(error) as info:
            image.mapper.read(0, image.mapper.size)
    assert info.value.offset is not None


def _corrupt_middle(path: Path, out: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)  # deflate: a stored block whose lengths do not match
    out.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("kind", "error"),
    [("gzip", ArchiveError), ("xz-blocks", CorruptCompressed), ("zstd-single-frame", CorruptCompressed),
     ("zstd-multi-frame", CorruptCompressed)],
)  # fmt: skip
def test_reads_of_a_corrupt_region_fail(
    kind: str, error: type[Exception], dense_tar: Path, dense_of: Callable[[str], Path], tmp_path: Path
) -> None:
    bad = tmp_path / f"bad.{kind}"
    _corrupt_middle(dense_of(kind), bad)
    with open_compressed(bad) as source:  # damage in one zstd frame shows at its end (the checksum)
        image = open_first_image(source.read_at, source.size, None, source.pread_into)
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
        open_first_image(source.read_at, source.size, None, source.pread_into)
    assert info.value.offset is not None


# A bug of ours is not a corrupt archive: only the libraries' errors (DecodeError) are. A ValueError from our
# own code on the read path used to be taken for one: CorruptCompressed, and the pass marked the source
# broken, failing every later read with EIO.


def _bug_in_our_frame_bookkeeping(self: ZstdFrames, produced: int) -> None:
    raise ValueError("a bug in tarfuse, not in the archive")


def test_a_bug_in_our_decoder_code_fails_the_read_as_itself(
    compressed_of: Callable[[str], Path], plain_tar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_compressed(compressed_of("zstd-multi-frame")) as source:
        monkeypatch.setattr(ZstdFrames, "_account", _bug_in_our_frame_bookkeeping)
        with pytest.raises(ValueError, match="a bug in tarfuse"):
            source.read_at(0, 4096)
        monkeypatch.undo()
        source.check_unchanged()
        assert source.read_at(0, 4096) == plain_tar.read_bytes()[:4096]


def test_a_bug_in_our_code_in_the_pass_is_called_one_and_fails_reads_not_the_daemon(
    compressed_of: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The pass checks what a mount served early (a later copy of its name): unchecked, reads must fail.
    # But it is not "the archive is corrupt", and the daemon, whose thread ran the pass, goes on.
    with open_compressed(compressed_of("zstd-multi-frame")) as source:
        monkeypatch.setattr(ZstdFrames, "_account", _bug_in_our_frame_bookkeeping)
        run_pass(source, "disk.raw", None)  # returns: nothing propagates into the daemon's loop
        monkeypatch.undo()
        with pytest.raises(ArchiveError, match=r"the indexing pass failed \(ValueError\('a bug in tarfuse"):
            source.check_unchanged()
        assert "a bug in tarfuse; please report it; reads fail from now on" in caplog.text
        assert "corrupt" not in caplog.text


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
    assert (options.noindex, options.index, options.cache_size) == (True, "/var/cache/x.idx", 16 << 20)


# --- the zstd frame reader (zstdframes.py) -----------------------------------------------------------

_PZSTD_SIZE_FRAME = 0x184D2A50  # the skippable frame pzstd writes before each frame, holding its size


@pytest.fixture(scope="module")
def zstd_layouts(
    dense_tar: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, list[int], bytes]]:
    """The first 6 MiB of the dense tar in each zstd layout: {layout: (file, frame boundaries, index)}."""
    directory = tmp_path_factory.mktemp("zstd")
    reference = dense_tar.read_bytes()[: 6 << 20]
    rng = random.Random(8)
    cuts = [0]
    while cuts[-1] < len(reference):
        cuts.append(min(len(reference), cuts[-1] + rng.randrange(50_000, 700_000)))
    seekable = directory / "seekable.zst"
    with pyzstd.SeekableZstdFile(seekable, "w", max_frame_content_size=700_000) as sink:
        sink.write(reference)
    files = {
        "frames": _zstd_frames(reference, cuts, size_frames=False),
        "pzstd-like": _zstd_frames(reference, cuts, size_frames=True),
        "one-frame": pyzstd.compress(reference),
    }
    boundaries = {"seekable": list(range(0, len(reference), 700_000)), "one-frame": [0, len(reference)]}
    layouts = {}
    for layout, data in files.items():
        (directory / f"{layout}.zst").write_bytes(data)
    for layout in [*files, "seekable"]:
        path = directory / f"{layout}.zst"
        with closing(ZstdFrames(open(path, "rb", buffering=0))) as decoder:
            assert decoder.read_at(0, 1 << 40) == reference
            layouts[layout] = (path, boundaries.get(layout, cuts), decoder.export_index() or b"")
    return layouts


def _zstd_frames(data: bytes, cuts: list[int], size_frames: bool) -> bytes:
    """One frame per piece between cuts; `size_frames`: each after a skippable frame with its size (pzstd)."""
    out = []
    for start, end in itertools.pairwise(cuts):
        frame = pyzstd.compress(data[start:end])
        out.append(struct.pack("<III", _PZSTD_SIZE_FRAME, 4, len(frame)) if size_frames else b"")
        out.append(frame)
    return b"".join(out)


class _CountingFile(io.FileIO):
    """A file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size) or b""
        self.read_bytes += len(data)
        return data


@pytest.mark.parametrize("layout", ["frames", "pzstd-like", "seekable", "one-frame"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_zstd_frame_reader_random_reads_match_the_reference(
    layout: str, data: st.DataObject, dense_tar: Path, zstd_layouts: dict[str, tuple[Path, list[int], bytes]]
) -> None:
    path, boundaries, blob = zstd_layouts[layout]
    reference = dense_tar.read_bytes()[: 6 << 20]
    with closing(ZstdFrames(open(path, "rb", buffering=0))) as decoder:
        if data.draw(st.booleans(), label="with the saved index"):
            decoder.import_index(blob)
        for _ in range(6):
            near = max(0, data.draw(st.sampled_from(boundaries)) + data.draw(st.integers(-3000, 3000)))
            offset = data.draw(st.one_of(st.integers(0, len(reference) + 10), st.just(near)))
            size = data.draw(st.integers(0, 2_000_000))
            assert decoder.read_at(offset, size) == reference[offset : offset + size]


@pytest.mark.parametrize("layout", ["frames", "pzstd-like"])
def test_a_zstd_frame_index_round_trips_and_seeks_to_the_last_frame(
    layout: str, dense_tar: Path, zstd_layouts: dict[str, tuple[Path, list[int], bytes]]
) -> None:
    path, boundaries, blob = zstd_layouts[layout]
    reference = dense_tar.read_bytes()[: 6 << 20]
    with closing(ZstdFrames(counting := _CountingFile(path))) as decoder:
        assert decoder.complete_size() is None
        decoder.import_index(blob)
        assert (decoder.complete_size(), decoder.single_stream()) == (len(reference), False)
        assert decoder.export_index() == blob
        counting.read_bytes = 0
        offset = boundaries[-2] + 10  # in the last frame
        assert decoder.read_at(offset, 100) == reference[offset : offset + 100]
        assert counting.read_bytes < path.stat().st_size // 2, "decoded from the start, not the last frame"


def test_the_seek_table_gives_the_size_and_frames_at_open(
    zstd_layouts: dict[str, tuple[Path, list[int], bytes]],
) -> None:
    path = zstd_layouts["seekable"][0]
    with closing(ZstdFrames(open(path, "rb", buffering=0))) as decoder:
        assert decoder.complete_size() == 6 << 20
        assert not decoder.single_stream()


@pytest.mark.parametrize(
    "blob",
    [b"[[0, 0], [1234, 1048576]]", b"not json", b'{"zstd_frames": [[900, 0], [300, 10]], "size": 20}',
     b'{"zstd_frames": [[0, 5]], "size": 20}', b'{"zstd_frames": [[0, 0]], "size": "20"}',
     b'{"zstd_frames": [[0, 0], [99999999, 10]], "size": 20}'],
    ids=["indexed_zstd's", "not-json", "unordered", "not-from-0", "size-not-int", "past-the-file"],
)  # fmt: skip
def test_a_zstd_index_that_cannot_describe_the_file_is_refused(
    blob: bytes, zstd_layouts: dict[str, tuple[Path, list[int], bytes]]
) -> None:
    path = zstd_layouts["frames"][0]
    with closing(ZstdFrames(open(path, "rb", buffering=0))) as decoder:
        with pytest.raises(DecodeError, match=r"zstd|Expecting value"):
            decoder.import_index(blob)
        assert decoder.complete_size() is None  # left as it was


def test_a_zstd_index_that_disagrees_with_the_frames_fails_reads(
    dense_tar: Path, zstd_layouts: dict[str, tuple[Path, list[int], bytes]]
) -> None:
    path, boundaries, _ = zstd_layouts["frames"]
    frames = json.loads(zstd_layouts["frames"][2])["zstd_frames"]
    frames[1][1] += 1  # the second frame one byte later than it is
    with closing(ZstdFrames(open(path, "rb", buffering=0))) as decoder:
        decoder.import_index(json.dumps({"zstd_frames": frames, "size": 6 << 20}).encode())
        with pytest.raises(DecodeError, match="the index says"):
            decoder.read_at(0, boundaries[2])


def test_a_corrupt_zstd_frame_fails_instead_of_returning_bytes(
    zstd_layouts: dict[str, tuple[Path, list[int], bytes]], tmp_path: Path
) -> None:
    data = bytearray(zstd_layouts["frames"][0].read_bytes())
    data[4:8] = b"\xff\xff\xff\xff"  # the first frame's header: an unknown descriptor
    (bad := tmp_path / "bad.zst").write_bytes(bytes(data))
    with closing(ZstdFrames(open(bad, "rb", buffering=0))) as decoder:
        with pytest.raises(DecodeError, match="zstd"):
            decoder.read_at(0, 4096)
        with pytest.raises(DecodeError, match="zstd"):  # again: no state left behind that would let it pass
            decoder.read_at(100, 4096)


def test_a_truncated_zstd_stream_reads_up_to_the_cut_then_fails(
    dense_tar: Path, zstd_layouts: dict[str, tuple[Path, list[int], bytes]], tmp_path: Path
) -> None:
    data = zstd_layouts["one-frame"][0].read_bytes()
    (cut := tmp_path / "cut.zst").write_bytes(data[: len(data) * 2 // 3])
    with closing(ZstdFrames(open(cut, "rb", buffering=0))) as decoder:
        assert decoder.read_at(0, 4096) == dense_tar.read_bytes()[:4096]
        with pytest.raises(DecodeError, match="truncated"):
            decoder.read_at(0, 6 << 20)


# --- the spill of streams with no restart point -------------------------------------------------------

ONE_FRAME_KINDS = ["zstd-single-frame", "xz-one-block"]


def _copy(dense_of: Callable[[str], Path], kind: str, tmp_path: Path) -> tuple[Path, str]:
    archive = tmp_path / f"a.{kind}"
    shutil.copy(dense_of(kind), archive)
    return archive, str(tmp_path / "a.tarfuse-index")


def _random_reads_match(source: CompressedSource, reference: bytes) -> None:
    rng = random.Random(len(reference))
    for _ in range(20):
        offset, size = rng.randrange(len(reference)), rng.choice([512, 4096, 3 * CHUNK_SIZE])
        assert source.read_at(offset, size) == reference[offset : offset + size]


@pytest.mark.parametrize("kind", ONE_FRAME_KINDS)
def test_after_the_pass_reads_come_from_the_spill_not_the_archive(
    kind: str, dense_tar: Path, dense_of: Callable[[str], Path], tmp_path: Path
) -> None:
    archive, where = _copy(dense_of, kind, tmp_path)
    with open_compressed(archive, cache_size=2 * CHUNK_SIZE) as source:
        assert source.needs_spill()
        run_pass(source, "data.img", where)
        assert source.spill == index.spill_path(where) == str(tmp_path / "a.tarfuse-spill.zst")
        assert not source.needs_spill()
        os.truncate(archive, 0)  # nothing can be decompressed from the archive any more
        _random_reads_match(source, dense_tar.read_bytes())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([archive.name, "a.tarfuse-index", "a.tarfuse-spill.zst"])


@pytest.mark.parametrize("kind", ONE_FRAME_KINDS)
def test_a_second_open_serves_from_the_spill_without_a_pass(
    kind: str, dense_tar: Path, dense_of: Callable[[str], Path], tmp_path: Path
) -> None:
    archive, where = _copy(dense_of, kind, tmp_path)
    with open_compressed(archive) as source:
        run_pass(source, "data.img", where)
    with open_compressed(archive, cache_size=2 * CHUNK_SIZE) as again:
        assert index.use_saved_index(where, again)
        assert again.spill == index.spill_path(where)
        assert not again.needs_spill()  # so background.open_in_stream is not used
        assert again.size == dense_tar.stat().st_size
        _random_reads_match(again, dense_tar.read_bytes())


@pytest.mark.parametrize("kind", ONE_FRAME_KINDS)
def test_a_stale_spill_is_rebuilt(
    kind: str,
    dense_tar: Path,
    dense_of: Callable[[str], Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    archive, where = _copy(dense_of, kind, tmp_path)
    spill = Path(index.spill_path(where))
    with open_compressed(archive) as source:
        run_pass(source, "data.img", where)
    old = spill.stat().st_ino
    os.utime(archive, ns=(0, 1_000_000_000))  # another version of the archive, for all we know
    with open_compressed(archive) as source:
        with caplog.at_level(logging.WARNING):
            assert not index.use_saved_index(where, source)
        assert "stale" in caplog.text
        assert source.spill is None
        assert source.needs_spill()
        run_pass(source, "data.img", where)
        assert source.spill == str(spill)
    assert spill.stat().st_ino != old
    with open_compressed(archive) as again:
        assert index.use_saved_index(where, again)
        _random_reads_match(again, dense_tar.read_bytes())


def test_a_spill_of_another_length_is_not_used(
    dense_of: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive, where = _copy(dense_of, "zstd-single-frame", tmp_path)
    with open_compressed(archive) as source:
        run_pass(source, "data.img", where)
    spill = Path(index.spill_path(where))
    spill.write_bytes(spill.read_bytes()[:-100])
    with open_compressed(archive) as source, caplog.at_level(logging.WARNING):
        assert not index.use_saved_index(where, source)
        assert source.spill is None
    assert "spill" in caplog.text


@pytest.mark.parametrize("kind", ["zstd-multi-frame", "zstd-seekable", "xz-blocks", "gzip"])
def test_streams_with_restart_points_get_no_spill(
    kind: str, dense_of: Callable[[str], Path], tmp_path: Path
) -> None:
    archive, where = _copy(dense_of, kind, tmp_path)
    with open_compressed(archive) as source:
        assert not source.size_known or not source.needs_spill()
        run_pass(source, "data.img", where)
        assert source.spill is None
    assert not any(".tarfuse-spill" in p.name for p in tmp_path.iterdir())  # nor a partial one


def test_without_an_index_the_spill_is_an_unnamed_temporary_file(
    dense_tar: Path, dense_of: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with open_compressed(dense_of("zstd-single-frame")) as source:
        run_pass(source, "data.img", None)
        assert (source.spill or "").startswith("/proc/self/fd/")
        _random_reads_match(source, dense_tar.read_bytes())
        assert list((tmp_path / "cache" / "tarfuse").iterdir()) == []  # nothing left behind, even now
