"""sources/dictzip.py against files made by the real dictzip tool, and against broken copies of them.

The oracle is the input given to dictzip. Broken files keep the real tool's deflate data and trailer
under a header rebuilt by `build_header`, or flip bytes in place; every one must read as the original
bytes or raise DictzipError, never another exception.
"""

import contextlib
import gzip
import random
import struct
import subprocess
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.needs import require_tool
from kit.readers import in_threads, read_at_random

from tarfuse.sources.dictzip import (
    HEADER_READ_SIZE,
    DictzipError,
    DictzipReader,
    RandomAccess,
    parse_header,
)

CHUNK = 58315  # dictzip's chunk length (dictzip.h: IN_BUFFER_SIZE)
FHCRC, FEXTRA, FNAME, FCOMMENT = 0x02, 0x04, 0x08, 0x10
SIZES = [1, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 7 * CHUNK + 1234]


def random_data(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def text_data(size: int, seed: int = 1) -> bytes:
    """Compressible bytes: words from a small vocabulary, about 3:1 under deflate."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnop", k=rng.randint(2, 9))) for _ in range(400)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, k=4096)) + b"\n"
    return bytes(out[:size])


DATA = {"random": random_data, "text": text_data}


def dictzip(directory: Path, data: bytes, name: str = "disk.img") -> bytes:
    """The .dz file the real dictzip makes of `data`."""
    tool = require_tool("dictzip")  # Debian package dictzip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)
    subprocess.run([tool, "-k", str(directory / name)], check=True, capture_output=True)
    return (directory / f"{name}.dz").read_bytes()


def reader_of(blob: bytes | bytearray, cache_size: int = 1 << 20) -> DictzipReader:
    return DictzipReader(
        lambda offset, size: bytes(blob[offset : offset + size]), len(blob), cache_size=cache_size
    )


def table_of(blob: bytes) -> RandomAccess:
    table = parse_header(blob[:HEADER_READ_SIZE])
    assert table is not None
    return table


def sizes_of(table: RandomAccess) -> list[int]:
    return [b - a for a, b in zip(table.offsets, table.offsets[1:], strict=False)]


def build_header(
    sizes: Sequence[int],
    *,
    chunk_length: int = CHUNK,
    version: int = 1,
    count: int | None = None,
    sublen: int | None = None,
    xlen: int | None = None,
    before: bytes = b"",
    after: bytes = b"",
    name: bytes | None = b"disk.img",
    comment: bytes | None = None,
    hcrc: bool = False,
) -> bytes:
    """A gzip header with an RA subfield, each field overridable to break it."""
    table = struct.pack(
        f"<3H{len(sizes)}H", version, chunk_length, len(sizes) if count is None else count, *sizes
    )
    extra = before + b"RA" + struct.pack("<H", len(table) if sublen is None else sublen) + table + after
    flags = FEXTRA | (FNAME if name is not None else 0) | (FCOMMENT if comment is not None else 0)
    head = bytes([0x1F, 0x8B, 8, flags | (FHCRC if hcrc else 0), 0, 0, 0, 0, 2, 3])
    head += struct.pack("<H", len(extra) if xlen is None else xlen) + extra
    head += b"" if name is None else name + b"\0"
    head += b"" if comment is None else comment + b"\0"
    return head + (struct.pack("<H", zlib.crc32(head) & 0xFFFF) if hcrc else b"")


def read_all_checked(blob: bytes | bytearray) -> bytes:
    """Everything the reader serves, after verify(): raises DictzipError or returns the file's bytes."""
    reader = reader_of(blob)
    data = reader.read_at(0, reader.size)
    reader.verify()
    return data


@pytest.fixture(scope="module")
def text_dz(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A 3.5-chunk file of compressible data and its dictzip file."""
    data = text_data(3 * CHUNK + CHUNK // 2)
    return data, dictzip(tmp_path_factory.mktemp("text"), data)


@pytest.fixture(scope="module")
def random_dz(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A 3.5-chunk file of incompressible data (deflate stores it) and its dictzip file."""
    data = random_data(3 * CHUNK + CHUNK // 2)
    return data, dictzip(tmp_path_factory.mktemp("random"), data)


# Files from the real tool


@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("size", SIZES)
def test_random_reads_equal_the_input(tmp_path: Path, kind: str, size: int) -> None:
    data = DATA[kind](size)
    reader = reader_of(dictzip(tmp_path, data))
    assert reader.size == size
    rng = random.Random(size)
    for _ in range(300):
        offset, length = rng.randrange(size + 10), rng.choice([1, 512, 4096, 65536, 3 * CHUNK])
        assert reader.read_at(offset, length) == data[offset : offset + length]
    assert reader.read_at(0, size + 1) == data
    reader.verify()
    assert reader.verified


@pytest.mark.parametrize("size", [1, CHUNK, 7 * CHUNK + 1234])
def test_the_file_is_plain_gzip_too(tmp_path: Path, size: int) -> None:
    data = text_data(size)
    blob = dictzip(tmp_path, data)
    assert gzip.decompress(blob) == data
    subprocess.run(["gzip", "-t", str(tmp_path / "disk.img.dz")], check=True)


@pytest.mark.parametrize("size", [1, CHUNK, CHUNK + 1, 7 * CHUNK + 1234])
def test_the_table_matches_the_files_layout(tmp_path: Path, size: int) -> None:
    blob = dictzip(tmp_path, text_data(size), name="disk.img")
    table = table_of(blob)
    assert table.chunk_length == CHUNK
    assert table.chunk_count == -(-size // CHUNK)
    xlen = int.from_bytes(blob[10:12], "little")
    assert table.data_offset == 12 + xlen + len(b"disk.img\0")  # FEXTRA, then FNAME
    assert table.offsets[-1] + 2 + 8 == len(blob)  # the last chunk, Z_FINISH's 03 00, the trailer
    assert blob[table.offsets[-1] : -8] == b"\x03\x00"


def test_an_empty_input_reads_as_empty(tmp_path: Path) -> None:
    # dictzip writes a table of no chunks for it (which dictd itself refuses to read)
    blob = dictzip(tmp_path, b"")
    assert table_of(blob).chunk_count == 0
    reader = reader_of(blob)
    assert reader.size == 0
    assert reader.read_at(0, 100) == b""
    reader.verify()


def test_a_100_mib_sparse_image_reads_right(tmp_path: Path) -> None:
    size = 100 << 20
    rng = random.Random(7)
    image = bytearray(size)  # zeros, with 4 KiB of random data at 400 places and text at 100
    for _ in range(400):
        offset = rng.randrange(size - 4096)
        image[offset : offset + 4096] = rng.randbytes(4096)
    for i in range(100):
        offset = rng.randrange(size - 65536)
        image[offset : offset + 65536] = text_data(65536, seed=i)
    data = bytes(image)
    reader = reader_of(dictzip(tmp_path, data), cache_size=4 << 20)
    assert reader.size == size
    for _ in range(2000):
        offset, length = rng.randrange(size), rng.choice([4096, 131072])
        assert reader.read_at(offset, length) == data[offset : offset + length]


def test_threads_sharing_a_reader_get_the_right_bytes(text_dz: tuple[bytes, bytes]) -> None:
    data, blob = text_dz
    reader = reader_of(blob, cache_size=2 * CHUNK)  # two chunks: threads evict each other's
    tally = in_threads(8, lambda seed: read_at_random(reader.read_at, data, seed, 300, 2 * CHUNK))
    assert tally.wrong == tally.short == 0, tally.notes


def test_the_cache_keeps_recent_chunks_within_its_size(text_dz: tuple[bytes, bytes]) -> None:
    _, blob = text_dz
    reads: list[int] = []

    def read_at(offset: int, size: int) -> bytes:
        reads.append(offset)
        return blob[offset : offset + size]

    reader = DictzipReader(read_at, len(blob), cache_size=2 * CHUNK)
    reads.clear()
    reader.read_at(0, 10)
    reader.read_at(CHUNK, 10)
    reader.read_at(5, 10)  # chunk 0: cached
    assert len(reads) == 2
    reader.read_at(2 * CHUNK, 10)  # evicts chunk 1, the least recently used
    reader.read_at(1, 10)
    assert len(reads) == 3
    reader.read_at(CHUNK + 1, 10)
    assert len(reads) == 4


def test_reads_at_and_past_the_end(text_dz: tuple[bytes, bytes]) -> None:
    data, blob = text_dz
    reader = reader_of(blob)
    assert reader.read_at(len(data) - 3, 100) == data[-3:]
    assert reader.read_at(len(data), 100) == b""
    assert reader.read_at(len(data) + 5000, 1) == b""
    assert reader.read_at(17, 0) == b""
    with pytest.raises(ValueError, match="negative"):
        reader.read_at(-1, 10)


# Headers: what is dictzip and what is plain gzip


def test_plain_gzip_has_no_table(tmp_path: Path) -> None:
    data = text_data(100_000)
    (tmp_path / "f").write_bytes(data)
    subprocess.run(["gzip", "-k", str(tmp_path / "f")], check=True)
    assert parse_header(gzip.compress(data)) is None
    assert parse_header((tmp_path / "f.gz").read_bytes()) is None  # with FNAME
    assert parse_header(b"not gzip at all") is None
    assert parse_header(b"") is None


def test_other_extra_subfields_are_not_a_table() -> None:
    head = bytes([0x1F, 0x8B, 8, FEXTRA, 0, 0, 0, 0, 0, 3]) + struct.pack("<H", 8) + b"AP\x04\x00abcd"
    assert parse_header(head + b"\x03\x00" + bytes(8)) is None


def test_an_ra_field_of_another_version_is_plain_gzip(text_dz: tuple[bytes, bytes]) -> None:
    _, blob = text_dz
    table = table_of(blob)
    assert parse_header(build_header(sizes_of(table), version=99) + blob[table.data_offset :]) is None


def test_ra_after_another_subfield_is_found(text_dz: tuple[bytes, bytes]) -> None:
    data, blob = text_dz
    table = table_of(blob)
    rebuilt = build_header(sizes_of(table), before=b"AP\x02\x00xy") + blob[table.data_offset :]
    assert read_all_checked(rebuilt) == data


def test_a_comment_and_a_header_crc_are_skipped(text_dz: tuple[bytes, bytes]) -> None:
    data, blob = text_dz
    table = table_of(blob)
    rebuilt = build_header(sizes_of(table), comment=b"made by hand", hcrc=True) + blob[table.data_offset :]
    assert gzip.decompress(rebuilt) == data
    assert read_all_checked(rebuilt) == data


def test_no_name_is_fine(text_dz: tuple[bytes, bytes]) -> None:
    data, blob = text_dz
    table = table_of(blob)
    assert read_all_checked(build_header(sizes_of(table), name=None) + blob[table.data_offset :]) == data


def test_a_wrong_header_crc_is_an_error(text_dz: tuple[bytes, bytes]) -> None:
    _, blob = text_dz
    table = table_of(blob)
    head = bytearray(build_header(sizes_of(table), hcrc=True))
    head[-1] ^= 0xFF
    with pytest.raises(DictzipError, match="CRC16"):
        parse_header(bytes(head) + blob[table.data_offset :])


def test_a_zero_chunk_length_is_an_error(text_dz: tuple[bytes, bytes]) -> None:
    _, blob = text_dz
    table = table_of(blob)
    with pytest.raises(DictzipError, match="chunk length is 0") as caught:
        parse_header(build_header(sizes_of(table), chunk_length=0) + blob[table.data_offset :])
    assert caught.value.offset == 18


@pytest.mark.parametrize("count", [0, 3, 5, 0xFFFF])
def test_a_count_that_disagrees_with_the_length_is_an_error(text_dz: tuple[bytes, bytes], count: int) -> None:
    _, blob = text_dz
    table = table_of(blob)
    with pytest.raises(DictzipError, match=f"{count} chunks need"):
        parse_header(build_header(sizes_of(table), count=count) + blob[table.data_offset :])


def test_a_second_ra_subfield_is_an_error(text_dz: tuple[bytes, bytes]) -> None:
    _, blob = text_dz
    table = table_of(blob)
    with pytest.raises(DictzipError, match="second RA"):
        parse_header(build_header(sizes_of(table), after=b"RA\x00\x00") + blob[table.data_offset :])


def test_an_ra_subfield_past_the_extra_field_is_an_error(text_dz: tuple[bytes, bytes]) -> None:
    _, blob = text_dz
    sizes = sizes_of(table_of(blob))
    with pytest.raises(DictzipError, match="run past"):
        parse_header(build_header(sizes, xlen=4 + 6 + 2 * len(sizes) - 2) + bytes(100))


def test_the_headers_dictzip_writes_past_its_limit_are_named() -> None:
    # 42,871 chunks (2.5 GB): XLEN and LEN wrap mod 2**16, CHCNT fits; as dictzip 1.13.0 writes them
    count = 42871
    table = struct.pack(f"<3H{count}H", 1, CHUNK, count, *([77] * count))
    extra = b"RA" + struct.pack("<H", (6 + 2 * count) % 0x10000) + table
    head = bytes([0x1F, 0x8B, 8, FEXTRA | FNAME, 0, 0, 0, 0, 2, 3]) + struct.pack("<H", len(extra) % 0x10000)
    with pytest.raises(DictzipError, match="1,910,516,030"):
        parse_header(head + extra + b"big\0")
    # 32,763 chunks: XLEN wraps to exactly 0
    count = 32763
    table = struct.pack(f"<3H{count}H", 1, CHUNK, count, *([77] * count))
    extra = b"RA" + struct.pack("<H", 6 + 2 * count) + table
    head = bytes([0x1F, 0x8B, 8, FEXTRA | FNAME, 0, 0, 0, 0, 2, 3]) + b"\0\0"
    with pytest.raises(DictzipError, match="1,910,516,030"):
        parse_header(head + extra + b"big\0")


def test_an_unterminated_name_is_an_error(text_dz: tuple[bytes, bytes]) -> None:
    _, blob = text_dz
    sizes = sizes_of(table_of(blob))
    head = build_header(sizes, name=b"x" * HEADER_READ_SIZE)
    with pytest.raises(DictzipError, match="file name does not end"):
        parse_header(head[:HEADER_READ_SIZE])


# Broken files


@pytest.mark.parametrize("fixture", ["text_dz", "random_dz"])
def test_every_truncation_is_an_error(request: pytest.FixtureRequest, fixture: str) -> None:
    _, blob = request.getfixturevalue(fixture)
    data_offset = table_of(blob).data_offset
    cuts = [
        *range(40),
        data_offset - 1,
        data_offset,
        data_offset + 1,
        *range(data_offset + 2, len(blob), 997),
    ]
    for cut in [*cuts, len(blob) - 9, len(blob) - 8, len(blob) - 1]:
        with pytest.raises(DictzipError):
            read_all_checked(blob[:cut])
        try:
            parse_header(blob[:cut])
        except DictzipError:
            assert cut >= 12


def test_chunk_sizes_running_past_the_file_are_an_error(text_dz: tuple[bytes, bytes]) -> None:
    _, blob = text_dz
    table = table_of(blob)
    sizes = sizes_of(table)
    sizes[1] = 0xFFFF
    with pytest.raises(DictzipError, match="past the gzip trailer"):
        reader_of(build_header(sizes) + blob[table.data_offset :])


def test_a_shifted_chunk_boundary_is_an_error(text_dz: tuple[bytes, bytes]) -> None:
    _, blob = text_dz
    table = table_of(blob)
    sizes = sizes_of(table)
    sizes[0], sizes[1] = sizes[0] + 1, sizes[1] - 1  # same total: only the chunks disagree
    reader = reader_of(build_header(sizes) + blob[table.data_offset :])
    with pytest.raises(DictzipError, match="chunk 0"):
        reader.read_at(0, 1)
    with pytest.raises(DictzipError, match="chunk 1"):
        reader.read_at(CHUNK, 1)


def test_no_chunks_but_a_stream_of_data_is_an_error(text_dz: tuple[bytes, bytes], tmp_path: Path) -> None:
    _, blob = text_dz
    table = table_of(blob)
    with pytest.raises(DictzipError, match="bytes follow"):
        reader_of(build_header([]) + blob[table.data_offset :])
    small = dictzip(tmp_path, b"x")  # a stream short enough to pass for the final block
    table = table_of(small)
    with pytest.raises(DictzipError, match="no chunks, but the stream holds data"):
        reader_of(build_header([]) + small[table.data_offset : -4] + struct.pack("<I", 0))


def test_a_wrong_isize_is_an_error(text_dz: tuple[bytes, bytes]) -> None:
    _, blob = text_dz
    broken = blob[:-4] + struct.pack("<I", len(blob) + 1)
    with pytest.raises(DictzipError, match="ISIZE"):
        reader_of(broken)


def test_a_wrong_crc_fails_verify(text_dz: tuple[bytes, bytes]) -> None:
    data, blob = text_dz
    broken = bytearray(blob)
    broken[-8] ^= 1
    reader = reader_of(broken)
    assert reader.read_at(0, reader.size) == data  # the CRC32 is only read by a whole pass
    with pytest.raises(DictzipError, match="CRC32"):
        reader.verify()
    assert not reader.verified


@pytest.mark.parametrize("fixture", ["text_dz", "random_dz"])
def test_a_flipped_byte_never_serves_wrong_bytes(request: pytest.FixtureRequest, fixture: str) -> None:
    data, blob = request.getfixturevalue(fixture)
    table = table_of(blob)
    rng = random.Random(3)
    for position in rng.sample(range(table.data_offset, len(blob)), 150):
        broken = bytearray(blob)
        broken[position] ^= rng.randrange(1, 256)
        with contextlib.suppress(DictzipError):
            assert read_all_checked(broken) == data  # a flip in padding bits changes nothing


def test_a_chunk_that_changes_after_verify_is_an_error(random_dz: tuple[bytes, bytes]) -> None:
    data, blob = random_dz
    table = table_of(blob)
    live = bytearray(blob)
    reader = DictzipReader(
        lambda offset, size: bytes(live[offset : offset + size]), len(live), cache_size=CHUNK
    )
    reader.verify()
    live[table.offsets[1] + 1000] ^= 0x55  # inside stored data: still inflates, to other bytes
    reader.read_at(0, 1)  # chunk 0 replaces chunk 1 in the one-chunk cache
    with pytest.raises(DictzipError, match="no longer inflates"):
        reader.read_at(CHUNK, 1)
    assert reader.read_at(0, CHUNK) == data[:CHUNK]


def test_a_short_read_of_the_file_is_an_error(text_dz: tuple[bytes, bytes]) -> None:
    _, blob = text_dz
    table = table_of(blob)

    def read_at(offset: int, size: int) -> bytes:
        short = offset == table.offsets[2]  # chunk 2 comes back cut, as if the file shrank under us
        return blob[offset : offset + (10 if short else size)]

    reader = DictzipReader(read_at, len(blob))
    with pytest.raises(DictzipError, match="truncated"):
        reader.read_at(2 * CHUNK, 1)


def mutated(blob: bytes, changes: list[tuple[int, int]]) -> bytes:
    out = bytearray(blob)
    for position, value in changes:
        out[position % len(out)] = value
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(changes=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4))
def test_any_mutation_reads_right_or_raises_dictzip_error(
    text_dz: tuple[bytes, bytes], changes: list[tuple[int, int]]
) -> None:
    data, blob = text_dz
    head_changes = [(position % 64, value) for position, value in changes]  # mostly the header and table
    for broken in (mutated(blob, changes), mutated(blob, head_changes)):
        try:
            parse_header(broken[:HEADER_READ_SIZE])
            assert read_all_checked(broken) == data
        except DictzipError:
            pass
