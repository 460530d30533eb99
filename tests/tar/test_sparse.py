"""sparse: the four GNU dialects decode to the same map, and bad maps are refused with their offset.

Archives are hand-built (tests/kit/tarbuilder.py), except the committed GNU tar fixtures in tests/data.
"""

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kit import sparsegen
from kit import tarbuilder as tb

from tarfuse.errors import ArchiveError, BadHeader, CorruptSparseMap, TruncatedArchive
from tarfuse.image.open import open_image
from tarfuse.tar import sparse
from tarfuse.tar.archive import ReadAt, scan_members

DATA_DIR = Path(__file__).parents[1] / "data"
FIXTURES = {"gnu.tar": "oldgnu", "pax-0.0.tar": "pax0.0", "pax-0.1.tar": "pax0.1", "pax-1.0.tar": "pax1.0"}
GIB = 1 << 30

variants = pytest.mark.parametrize("variant", tb.SPARSE_VARIANTS)


def build(variant: str, layout: sparsegen.Layout, seed: int = 0) -> tuple[bytes, bytes]:
    """An archive holding `layout` as a sparse disk.img, and the expected image."""
    image = sparsegen.image_of(layout, seed)
    member = tb.sparse_member(
        variant, "disk.img", layout.extents, layout.size, sparsegen.packed(layout, image)
    )
    return tb.archive(tb.file_member("readme.txt", b"hi"), member), image


def decode_only(data: bytes) -> sparse.SparseMap:
    read_at = tb.read_at_of(data)
    (member,) = scan_members(read_at, len(data))
    return sparse.decode(member, read_at)


@variants
@given(layout=sparsegen.gnu_layouts(max_runs=30), seed=st.integers(0, 100))
def test_decoded_image_matches(variant: str, layout: sparsegen.Layout, seed: int) -> None:
    data, image = build(variant, layout, seed)
    served = tb.open_bytes(data, "disk.img")
    assert served.mapper.size == layout.size
    assert served.extent_count == len(layout.extents)
    assert served.stored_bytes == sum(length for _, length in layout.extents)
    assert served.mapper.read(0, layout.size) == image


@pytest.mark.parametrize(("archive", "variant"), FIXTURES.items())
def test_gnu_tar_fixture(archive: str, variant: str) -> None:
    sums = (DATA_DIR / "SHA256SUMS").read_text().split()
    expected = dict(zip(sums[1::2], sums[0::2], strict=True))  # file name -> sha256
    image = tb.open_bytes((DATA_DIR / archive).read_bytes())
    assert (image.name, image.member.sparse and image.member.sparse.variant) == ("disk.img", variant)
    assert (image.mapper.size, image.extent_count) == (1 << 20, 2)
    digest = hashlib.sha256(image.mapper.read(0, image.mapper.size)).hexdigest()
    assert digest == expected["disk.img"]


@variants
def test_trailing_zero_length_entry_is_dropped(variant: str) -> None:
    # GNU tar 1.34 ends every map with (real_size, 0).
    member = tb.sparse_member(variant, "d.img", [(10, 3), (40, 0)], 40, b"abc")
    sparse_map = decode_only(tb.archive(member))
    assert list(sparse_map.logical) == [10]
    assert list(sparse_map.lengths) == [3]


@variants
def test_all_hole_file(variant: str) -> None:
    # GNU tar's map of a file without data is the one entry (real_size, 0).
    member = tb.sparse_member(variant, "d.img", [], 5000, b"")
    image = tb.open_bytes(tb.archive(member))
    assert (image.extent_count, image.mapper.read(0, 9999)) == (0, bytes(5000))


@variants
@pytest.mark.parametrize(
    ("extents", "real_size"),
    [([], 5000), ([(0, 512)], 5000), ([(0, 512), (600, 0)], 5000)],
    ids=["empty", "data-then-hole", "short-end-entry"],
)
def test_map_that_ends_before_the_real_size(
    variant: str, extents: list[tuple[int, int]], real_size: int
) -> None:
    # GNU tar's file ends where its map does (it seeks, writes and truncates); tarfile's at the real size.
    data = bytes(sum(length for _, length in extents))
    member = tb.sparse_member(variant, "d.img", extents, real_size, data, end_entry=False)
    with pytest.raises(CorruptSparseMap, match="before the real size 5000") as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 0


@variants
def test_zero_length_entry_inside_the_data(variant: str) -> None:
    # GNU tar truncates the file at a zero-length entry: here, at 100, cutting the first extent short.
    member = tb.sparse_member(variant, "d.img", [(0, 512), (100, 0), (1024, 512)], 1536, bytes(1024))
    with pytest.raises(CorruptSparseMap, match=r"entry 1 \(offset 100\) is unsorted or overlaps"):
        tb.open_bytes(tb.archive(member))


@variants
def test_short_extent_before_another(variant: str) -> None:
    # GNU tar reads each extent's data from a fresh block, libarchive and tarfile right after the last.
    member = tb.sparse_member(variant, "d.img", [(0, 10), (100, 5)], 200, b"abcdefghijvwxyz")
    with pytest.raises(CorruptSparseMap, match="is 10 bytes, not whole blocks") as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 0


@pytest.mark.parametrize("count", [4, 5, 25, 26, 100])
def test_old_gnu_extension_blocks(count: int) -> None:
    layout = sparsegen.Layout(1024 * count - 505, tuple((1024 * i + 7, 512) for i in range(count)))
    data, image = build("oldgnu", layout)
    member = next(m for m in scan_members(tb.read_at_of(data), len(data)) if m.sparse)
    assert member.sparse is not None
    assert member.sparse.extension_blocks == max(0, -(-(count - 4) // 21))
    assert tb.open_bytes(data).mapper.read(0, len(image)) == image


def test_old_gnu_map_that_ends_early_ends_the_extension_chain() -> None:
    # GNU tar reads another extension block only after a full one (src/sparse.c, oldgnu_get_sparse_info):
    # after an unused slot the map is over, whatever isextended says, and the next block is data.
    extents = [(1024 * i, 512) for i in range(4 + 21 + 1)]
    data = b"".join(bytes([65 + i % 26]) * 512 for i in range(26))
    member = bytearray(tb.old_gnu_sparse("d.img", extents, 1024 * 23 + 512, data, stored_size=27 * 512))
    member[512 + 24 * 20 : 512 + 24 * 21] = bytes(24)  # slot 21 of the first extension block emptied
    archive = tb.archive(bytes(member))
    (parsed,) = scan_members(tb.read_at_of(archive), len(archive))
    assert parsed.sparse is not None
    assert (parsed.sparse.extension_blocks, parsed.data_offset) == (1, 1024)
    image = tb.open_bytes(archive)
    assert image.extent_count == 24
    assert image.mapper.read(0, 512) == member[1024:1536]  # the second extension block, read as data
    assert image.mapper.read(1024, 512) == b"A" * 512


def test_old_gnu_garbage_in_extension_block() -> None:
    extents = [(100 * i, 10) for i in range(10)]
    member = bytearray(tb.old_gnu_sparse("d.img", extents, 1000, bytes(100)))
    member[512 + 24 : 512 + 36] = b"not a number"
    with pytest.raises(ArchiveError, match="not an octal number") as info:
        tb.open_bytes(tb.archive(tb.file_member("a.txt"), bytes(member)))
    assert info.value.offset == 1024  # the extension block


def test_old_gnu_chain_runs_into_the_data() -> None:
    # The last (full) extension block claims another follows: the data block is read as one, and refused.
    extents = [(1024 * i, 512) for i in range(4 + 21)]
    data = b"x" * 504 + bytes(8) + b"y" * 24 * 512  # the data block that is read as a chain's last
    member = tb.old_gnu_sparse("d.img", extents, 1024 * 25, data, extension_flags=[True, True])
    with pytest.raises(CorruptSparseMap, match="bad sparse extension block") as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 1024  # the first data block


def test_pax10_map_spanning_several_blocks() -> None:
    layout = sparsegen.Layout(3000 * 400, tuple((3000 * i + 1000, 512) for i in range(400)))
    assert len(tb.pax10_map(layout.extents)) > 4 * tb.BLOCK
    data, image = build("pax1.0", layout)
    assert tb.open_bytes(data).mapper.read(0, len(image)) == image


def test_pax10_map_exactly_one_block() -> None:
    text = b"2\n5\n3\n10\n0\n"
    map_bytes = b"0" * (tb.BLOCK - len(text)) + text  # leading zeros are still decimal
    member = tb.pax10_sparse("d.img", [(5, 3)], 10, b"abc", map_bytes=map_bytes)
    image = tb.open_bytes(tb.archive(member))
    assert image.mapper.read(0, 10) == bytes(5) + b"abc" + bytes(2)


def test_pax10_count_line_longer_than_a_read_chunk() -> None:
    count_line = b"0" * 100_000 + b"2\n"  # odd, but decimal: GNU tar reads it as 2
    map_bytes = tb.pad(count_line + b"5\n3\n10\n0\n")
    member = tb.pax10_sparse("d.img", [(5, 3)], 10, b"abc", map_bytes=map_bytes)
    image = tb.open_bytes(tb.archive(member))
    assert image.mapper.read(0, 10) == bytes(5) + b"abc" + bytes(2)


def test_pax00_repeated_records() -> None:
    layout = sparsegen.Layout(10_000, ((0, 512), (600, 512), (9000, 1000)))
    data, image = build("pax0.0", layout)
    assert tb.open_bytes(data).mapper.read(0, 10_000) == image


@pytest.mark.parametrize("variant", ["oldgnu", "pax1.0", "pax0.1"])
def test_image_larger_than_8_gib(variant: str) -> None:
    # Offsets and sizes past 8 GiB overflow 11 octal digits: base-256 in old GNU headers, decimal in PAX.
    extents = [(0, 512), (4 * GIB + 3, 512), (9 * GIB - 4096, 4096)]
    data = b"A" * 512 + b"B" * 512 + b"C" * 4096
    image = tb.open_bytes(tb.archive(tb.sparse_member(variant, "big.img", extents, 9 * GIB, data)))
    read = image.mapper.read
    assert image.mapper.size == 9 * GIB
    assert read(0, 513) == b"A" * 512 + b"\0"
    assert read(4 * GIB, 520) == bytes(3) + b"B" * 512 + bytes(5)
    assert read(9 * GIB - 4097, 8192) == b"\0" + b"C" * 4096


def test_base256_numbers_in_old_gnu_sparse_header() -> None:
    member = tb.old_gnu_sparse("big.img", [(9 * GIB, 1)], 9 * GIB + 1, b"!")
    assert member[386] == 0x80
    assert member[483] == 0x80
    image = tb.open_bytes(tb.archive(member))
    assert image.mapper.read(9 * GIB - 1, 10) == b"\0!"


def lazy_archive(head: bytes, data_size: int) -> tuple[ReadAt, int]:
    """`head` (one member's headers and map), `data_size` bytes of its data, then the end marker.

    The data is made as it is read, never held: byte k of it is (k // 512) % 251 + 1, so in a map of
    512-byte extents, extent i reads as i % 251 + 1 throughout.
    """
    size = len(head) + data_size + len(tb.END)

    def read_at(offset: int, length: int) -> bytes:
        out = bytearray(head[offset : offset + length])
        position = offset + len(out)
        while position < min(offset + length, size):
            k = position - len(head)
            if k >= data_size:
                out += bytes(min(offset + length, size) - position)
                break
            n = min(512 - k % 512, offset + length - position, data_size - k)
            out += bytes([(k // 512) % 251 + 1]) * n
            position += n
        return bytes(out)

    return read_at, size


@pytest.mark.parametrize("variant", ["oldgnu", "pax1.0"])
def test_hundred_thousand_extents(variant: str) -> None:
    count = 100_000
    extents = [(1024 * i + 1, 512) for i in range(count)]
    head = tb.sparse_member(variant, "many.img", extents, 1024 * count, b"", stored_size=512 * count)
    image = open_image(*lazy_archive(head, 512 * count))
    assert image.extent_count == count
    for i in (0, 1, 250, 251, count // 2, count - 1):
        assert image.mapper.read(1024 * i, 1024) == bytes(1) + bytes([i % 251 + 1]) * 512 + bytes(511)


@pytest.mark.parametrize("variant", ["oldgnu", "pax1.0"])
def test_million_extent_map(variant: str) -> None:
    count = 1_000_000
    extents = [(1024 * i, 512) for i in range(count)]
    head = tb.sparse_member(variant, "many.img", extents, 1024 * count, b"", stored_size=512 * count)
    read_at, size = lazy_archive(head, 512 * count)
    (member,) = scan_members(read_at, size)
    sparse_map = sparse.decode(member, read_at)
    assert len(sparse_map.logical) == count
    assert sparse_map.logical[-1] == 1024 * (count - 1)
    assert sparse_map.physical[-1] - sparse_map.physical[0] == 512 * (count - 1)


@pytest.mark.parametrize("variant", tb.SPARSE_VARIANTS)
def test_map_at_the_entry_limit(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The limit is archive.MAX_SPARSE_ENTRIES; made small here so that both sides of it are cheap to build.
    monkeypatch.setattr(sparse, "MAX_SPARSE_ENTRIES", 30, raising=False)
    at_limit = [(1024 * i, 512) for i in range(29)]  # and GNU tar's (real_size, 0): 30 entries
    data = bytes(512 * 29)
    image = tb.open_bytes(tb.archive(tb.sparse_member(variant, "d.img", at_limit, 40_000, data)))
    assert image.extent_count == 29
    past = tb.archive(
        tb.sparse_member(variant, "d.img", [*at_limit, (29 * 1024, 512)], 40_000, data + data[:512])
    )
    with pytest.raises(CorruptSparseMap, match="claims 31 entries: tarfuse reads at most 30"):
        tb.open_bytes(past)


def _old_gnu_chain_head() -> tuple[bytes, bytes]:
    """An old GNU 'S' header whose four slots are full and say more follows, and an extension block that
    says the same: repeated, a chain that never ends."""
    fields = {386: tb.sparse_entries([(0, 512)] * 4, 4), 482: b"\1", 483: tb.octal(1 << 30, 12)}
    header = tb.header("d.img", size=1 << 30, typeflag=b"S", magic=tb.GNU, fields=fields)
    block = tb.sparse_entries([(0, 512)] * 21, 21) + b"\1" + bytes(7)  # isextended at 504
    return header, block


def test_old_gnu_chain_that_never_ends() -> None:
    header, block = _old_gnu_chain_head()
    assert len(block) == tb.BLOCK
    read_at = tb.endless(header, block, budget=64 << 20)  # the walk reads the chain's 51 MB, not more
    with pytest.raises(CorruptSparseMap, match=r"past 99865 extension blocks: .* at most 2097152") as info:
        list(scan_members(read_at, 1 << 40))
    assert info.value.offset == 0


def _pax10_head(map_start: bytes) -> bytes:
    """A PAX 1.0 sparse member claiming 2**50 bytes of data, whose map starts with `map_start`."""
    records = [("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"), ("GNU.sparse.realsize", str(1 << 40))]
    return tb.pax_header(records) + tb.header("d.img", size=1 << 50) + map_start


def test_pax10_map_count_past_the_limit_is_refused_unread() -> None:
    # The member's size is no check in a compressed archive (2**62 until its end is known).
    read_at = tb.endless(_pax10_head(b"3000000\n"), b"0\n0\n", budget=1 << 20)
    member = next(scan_members(read_at, 1 << 60))
    with pytest.raises(
        CorruptSparseMap, match="claims 3000000 entries: tarfuse reads at most 2097152"
    ) as info:
        sparse.decode(member, read_at)
    assert info.value.offset == 1536


def test_pax10_map_line_that_never_ends() -> None:
    read_at = tb.endless(_pax10_head(b"1\n"), b"1", budget=16 << 20)
    member = next(scan_members(read_at, 1 << 60))
    with pytest.raises(CorruptSparseMap, match="more than 20 digits") as info:
        sparse.decode(member, read_at)
    assert info.value.offset == 1536


def test_pax10_map_line_of_zeros_across_chunks() -> None:
    # Leading zeros are dropped as they are read: a long line costs no memory, and "000…0" is still 0.
    zeros = b"0" * 200_000
    map_bytes = tb.pad(b"2\n" + zeros + b"5\n3\n" + zeros + b"10\n" + zeros + b"\n")
    member = tb.pax10_sparse("d.img", [(5, 3)], 10, b"abc", map_bytes=map_bytes)
    image = tb.open_bytes(tb.archive(member))
    assert image.mapper.read(0, 10) == bytes(5) + b"abc" + bytes(2)


# ---- maps that must be refused --------------------------------------------------------------------


@variants
@pytest.mark.parametrize(
    ("extents", "real_size", "message"),
    [
        ([(0, 10), (5, 10)], 100, "overlaps"),
        ([(50, 10), (0, 10)], 100, "unsorted"),
        ([(0, 10), (95, 10)], 100, "past the real size"),
        ([(0, 10)], 5, "past the real size"),
    ],
)
def test_bad_map(variant: str, extents: list[tuple[int, int]], real_size: int, message: str) -> None:
    data = bytes(sum(length for _, length in extents))
    archive = tb.archive(
        tb.file_member("a.txt"), tb.sparse_member(variant, "d.img", extents, real_size, data)
    )
    with pytest.raises(CorruptSparseMap, match=message) as info:
        tb.open_bytes(archive)
    assert info.value.offset == 512


@variants
def test_map_lists_more_data_than_stored(variant: str) -> None:
    member = tb.sparse_member(variant, "d.img", [(0, 512), (1000, 600)], 2000, b"x" * 700)
    with pytest.raises(CorruptSparseMap, match="1112 bytes of data but only 700") as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 0


@variants
def test_real_size_past_off_t(variant: str) -> None:
    member = tb.sparse_member(variant, "d.img", [(0, 1)], 2**63, b"x", end_entry=False)
    with pytest.raises(CorruptSparseMap, match="real size 9223372036854775808") as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 0


def test_old_gnu_base256_real_size_huge() -> None:
    member = tb.old_gnu_sparse("d.img", [(0, 1)], 2**80, b"x")
    with pytest.raises(CorruptSparseMap, match="larger than any file") as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 0


@pytest.mark.parametrize("variant", ["pax0.1", "pax1.0"])
def test_pax_real_size_with_absurdly_many_digits(variant: str) -> None:
    member = tb.sparse_member(variant, "d.img", [(0, 1)], 10**30, b"x")
    with pytest.raises(BadHeader, match="absurdly large") as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 1024  # the member's own header, after the PAX one


def test_old_gnu_extent_past_2_63() -> None:
    member = tb.old_gnu_sparse("d.img", [(2**64, 1)], 2**64 + 1, b"x")
    with pytest.raises(CorruptSparseMap) as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 0


def test_old_gnu_negative_entry() -> None:
    fields = {386: tb.base256(-100, 12) + tb.octal(10, 12), 483: tb.octal(100, 12)}
    member = tb.header("d.img", size=10, typeflag=b"S", magic=tb.GNU, fields=fields) + tb.pad(bytes(10))
    with pytest.raises(CorruptSparseMap, match="negative") as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 0


@pytest.mark.parametrize(
    ("map_bytes", "message"),
    [
        (b"1000000000000\n0\n1\n", "claims 1000000000000 entries"),
        (b"2\n0\n1\n", "runs past"),  # the map promises more lines than the member holds
        (b"1\n0\n-1\n", "not a decimal"),
        (b"1\n0x0\n1\n", "not a decimal"),
        (b"1\n\xd9\xa3\n1\n", "not a decimal"),  # an Arabic-Indic digit: int() would take it
        (b"one\n0\n1\n", "not a decimal"),
        (b"1\n\n1\n", "not a decimal"),
        (b"1\n0\n" + b"9" * 5000 + b"\n", "absurdly large"),  # int() refuses past 4300 digits
        (b"1\n0\n1\n", "runs past the member's data \\(into its padding\\)"),  # unpadded map
    ],
)
def test_bad_pax10_map(map_bytes: bytes, message: str) -> None:
    member = tb.pax10_sparse("d.img", [(0, 1)], 10, b"x" * 10, map_bytes=map_bytes)
    with pytest.raises(CorruptSparseMap, match=message) as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 1536  # the member's data, where the map is


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([("GNU.sparse.map", "0,1,5")], "odd number"),
        ([("GNU.sparse.map", "0,1,5,x")], "not a decimal"),
        ([("GNU.sparse.map", "0,1"), ("GNU.sparse.numblocks", "2")], "numblocks=2"),
        ([("GNU.sparse.offset", "0")], "pairs"),
        ([("GNU.sparse.offset", "0"), ("GNU.sparse.offset", "1")], "pairs"),
        ([("GNU.sparse.numbytes", "1"), ("GNU.sparse.offset", "0")], "pairs"),
        ([("GNU.sparse.offset", "0"), ("GNU.sparse.numbytes", "+1")], "not a decimal"),
    ],
)
def test_bad_pax0_map(records: list[tuple[str, str]], message: str) -> None:
    member = tb.pax_header([("GNU.sparse.size", "10"), *records]) + tb.file_member("d.img", b"x")
    with pytest.raises(CorruptSparseMap, match=message) as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 0


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [
                ("GNU.sparse.numblocks", "1"),
                ("GNU.sparse.offset", "0"),
                ("GNU.sparse.numblocks", "1"),
                ("GNU.sparse.numbytes", "1"),
            ],
            "after the map has begun",
        ),
        ([("GNU.sparse.map", "0,1"), ("GNU.sparse.numblocks", "1")], "after the map has begun"),
        ([("GNU.sparse.offset", "0"), ("GNU.sparse.numbytes", "1")], "without GNU.sparse.numblocks"),
        ([("GNU.sparse.map", "0,1")], "without GNU.sparse.numblocks"),
    ],
    ids=["pax0.0-numblocks-inside", "pax0.1-numblocks-after", "pax0.0-no-numblocks", "pax0.1-no-numblocks"],
)
def test_pax0_numblocks_must_come_first(records: list[tuple[str, str]], message: str) -> None:
    # GNU tar starts a new, empty map at each GNU.sparse.numblocks; tarfile reads the pairs regardless.
    member = tb.pax_header([("GNU.sparse.size", "1"), *records]) + tb.file_member("d.img", b"x")
    with pytest.raises(CorruptSparseMap, match=message) as info:
        tb.open_bytes(tb.archive(member))
    assert info.value.offset == 0


def test_pax_sparse_major_without_minor_0() -> None:
    # GNU tar reads a PAX 1.0 map from the data whenever GNU.sparse.major > 0, even beside a 0.1 map.
    records = [("GNU.sparse.major", "1"), ("GNU.sparse.numblocks", "1"), ("GNU.sparse.map", "0,1")]
    with pytest.raises(BadHeader, match=r"unknown PAX sparse format 1\.None") as info:
        tb.open_bytes(tb.archive(tb.pax_header(records), tb.file_member("d.img", b"x")))
    assert info.value.offset == 1024


def test_unknown_pax_sparse_version() -> None:
    records = [("GNU.sparse.major", "2"), ("GNU.sparse.minor", "0"), ("GNU.sparse.realsize", "1")]
    with pytest.raises(BadHeader, match=r"unknown PAX sparse format 2\.0") as info:
        tb.open_bytes(tb.archive(tb.pax_header(records), tb.file_member("d.img", b"x")))
    assert info.value.offset == 1024


def test_sparse_data_past_the_archive_end() -> None:
    member = tb.old_gnu_sparse("d.img", [(0, 4096)], 4096, b"x" * 4096)
    with pytest.raises(TruncatedArchive) as info:
        tb.open_bytes(member[:2048])
    assert info.value.offset == 0
