"""archive + image: walking headers, merging extended headers, and choosing the member to serve.

Archives come from stdlib tarfile where it writes the case, and from tests/kit/tarbuilder.py where it cannot.
"""

import tarfile
import time

import pytest
from kit import tarbuilder as tb

from tarfuse.errors import BadHeader, NoImage, TruncatedArchive
from tarfuse.image.open import open_image
from tarfuse.tar import archive
from tarfuse.tar.archive import Member, normalize_name, scan_members

DATA = bytes(range(256)) * 7  # 1792 bytes: not a multiple of the block size


def members(data: bytes) -> list[Member]:
    return list(scan_members(tb.read_at_of(data), len(data)))


def served(data: bytes, wanted: str | None = None) -> tuple[str, bytes]:
    image = tb.open_bytes(data, wanted)
    return image.name, image.mapper.read(0, image.mapper.size + 1)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_plain_member_from_tarfile(fmt: int) -> None:
    data = tb.with_tarfile(("notes.txt", b"hello"), ("vm/disk.img", DATA), fmt=fmt)
    assert served(data) == ("vm/disk.img", DATA)


def test_member_offsets() -> None:
    data = tb.archive(tb.file_member("a.txt", b"x" * 513), tb.file_member("b.img", DATA))
    a, b = members(data)
    assert (a.header_offset, a.data_offset, a.stored_size, a.real_size) == (0, 512, 513, 513)
    assert (b.header_offset, b.data_offset, b.stored_size) == (1536, 2048, len(DATA))
    assert (a.kind, b.kind, b.sparse) == ("file", "file", None)


def test_ustar_prefix_from_tarfile() -> None:
    directory = "/".join(["directory-with-a-long-name"] * 4)  # 107 bytes: needs the prefix field
    data = tb.with_tarfile((f"{directory}/disk.img", DATA), fmt=tarfile.USTAR_FORMAT)
    assert data[345:350] == b"direc"  # tarfile did use the prefix field
    assert served(data) == (f"{directory}/disk.img", DATA)


@pytest.mark.parametrize("length", [101, 600])
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names(fmt: int, length: int) -> None:
    name = "d/" + "n" * (length - 6) + ".img"  # GNU 'L' header or PAX path record
    data = tb.with_tarfile(("a.txt", b"a"), (name, DATA), ("z.txt", b"z"), fmt=fmt)
    assert served(data) == (name, DATA)
    assert [m.name for m in members(data)] == ["a.txt", name, "z.txt"]


def test_long_name_applies_to_the_next_member_only() -> None:
    data = tb.archive(
        tb.gnu_long("x" * 300 + ".img"), tb.file_member("short", DATA), tb.file_member("next", b"n")
    )
    assert [m.name for m in members(data)] == ["x" * 300 + ".img", "next"]


def test_pax_size_overrides_header_size() -> None:
    # A PAX size record wins over the header field (POSIX pax "size"); here the field says 0.
    data = tb.archive(
        tb.pax_header([("size", str(len(DATA)))]),
        tb.header("disk.img", size=0) + tb.pad(DATA),
        tb.file_member("after.txt", b"after"),
    )
    disk, after = members(data)
    assert (disk.stored_size, after.name) == (len(DATA), "after.txt")
    assert served(data) == ("disk.img", DATA)


def test_pax_size_beyond_octal_range() -> None:
    big = 0o77777777777 + 1  # 8 GiB: no longer fits 11 octal digits; tarfile writes PAX size
    data = tb.pax_header([("size", str(big))]) + tb.header("huge.img", size=0)
    with pytest.raises(TruncatedArchive, match=str(big)) as info:
        members(data)
    assert info.value.offset == 0


def test_global_pax_header_applies_to_every_member() -> None:
    data = tb.archive(
        tb.pax_header([("mtime", "123.5")], typeflag=b"g"),
        tb.file_member("a.img", b"a"),
        tb.pax_header([("mtime", "-7")]),
        tb.file_member("b.img", b"b"),
    )
    assert [m.mtime for m in members(data)] == [123, -7]


def test_image_is_last_member_without_end_blocks() -> None:
    data = tb.archive(tb.file_member("a.txt", b"a"), tb.file_member("disk.img", DATA), end=False)
    assert served(data) == ("disk.img", DATA)


def test_trailing_zero_blocks_stripped_from_tarfile_output() -> None:
    full = tb.with_tarfile(("disk.img", DATA), fmt=tarfile.GNU_FORMAT)
    stripped = full.rstrip(b"\0")
    stripped += bytes(-len(stripped) % 512)
    assert len(stripped) < len(full)
    assert served(stripped) == ("disk.img", DATA)


def test_zero_length_image() -> None:
    image = tb.open_bytes(tb.with_tarfile(("empty.img", b""), ("x.txt", b"x")))
    assert (image.name, image.mapper.size, image.extent_count) == ("empty.img", 0, 0)
    assert image.mapper.read(0, 4096) == b""
    assert image.format.driver == "raw"


def test_twenty_thousand_members_before_the_image() -> None:
    small = [(f"etc/file{i:05}.conf", b"%d\n" % i) for i in range(20_000)]
    data = tb.with_tarfile(*small, ("var/lib/vm/disk.qcow2", DATA), ("z.txt", b"z"))
    start = time.perf_counter()
    image = tb.open_bytes(data)
    elapsed = time.perf_counter() - start
    assert image.name == "var/lib/vm/disk.qcow2"
    assert image.mapper.read(0, len(DATA)) == DATA
    assert image.member.header_offset == 20_000 * 1024
    assert elapsed < 10  # not a benchmark: only catches an accidentally quadratic walk


def test_hard_link_to_an_image_serves_the_link_name_with_the_target_data() -> None:
    link = tb.tarinfo("vm/disk.img", tarfile.LNKTYPE, linkname="./store/blob")
    data = tb.with_tarfile(("store/blob", DATA), link, ("z.txt", b"z"))
    image = tb.open_bytes(data)
    assert image.name == "vm/disk.img"
    assert image.member.name == "store/blob"
    assert image.mapper.read(0, 1 << 16) == DATA


def test_hard_link_with_a_long_target_name() -> None:
    target = "t" * 200 + ".bin"
    link = tb.tarinfo("disk.img", tarfile.LNKTYPE, linkname=target)
    data = tb.with_tarfile((target, DATA), link, fmt=tarfile.GNU_FORMAT)  # a 'K' header
    assert served(data) == ("disk.img", DATA)


def test_hard_link_chosen_by_member_option() -> None:
    link = tb.tarinfo("copy.img", tarfile.LNKTYPE, linkname="orig.img")
    data = tb.with_tarfile(("orig.img", DATA), link)
    with pytest.raises(NoImage, match="2 disk images"):
        tb.open_bytes(data)
    assert served(data, "copy.img") == ("copy.img", DATA)


def test_hard_link_to_a_missing_target_is_no_file() -> None:
    link = tb.tarinfo("disk.img", tarfile.LNKTYPE, linkname="nowhere.img")
    with pytest.raises(NoImage, match="no disk image"):
        tb.open_bytes(tb.with_tarfile(("a.txt", b"a"), link))


def test_hard_link_to_a_later_member_is_no_file() -> None:
    link = tb.tarinfo("disk.img", tarfile.LNKTYPE, linkname="later.bin")
    with pytest.raises(NoImage, match="no disk image"):
        tb.open_bytes(tb.with_tarfile(link, ("later.bin", DATA)))


def test_directories_symlinks_devices_and_fifos_are_not_images() -> None:
    data = tb.with_tarfile(
        tb.tarinfo("a.img", tarfile.DIRTYPE),
        tb.tarinfo("b.img", tarfile.SYMTYPE, linkname="disk.img"),
        tb.tarinfo("c.img", tarfile.CHRTYPE),
        tb.tarinfo("d.img", tarfile.BLKTYPE),
        tb.tarinfo("e.img", tarfile.FIFOTYPE),
        ("disk.img", DATA),
    )
    kinds = [m.kind for m in members(data)]
    assert kinds == ["other", "symlink", "other", "other", "other", "file"]
    assert served(data) == ("disk.img", DATA)


def test_directory_size_field_is_not_data() -> None:
    # Some tars put a size in directory headers; tar -x skips no data for type '5'.
    data = tb.archive(tb.header("dir/", typeflag=b"5", size=4096), tb.file_member("disk.img", DATA))
    assert served(data) == ("disk.img", DATA)


def test_contiguous_file_type_is_a_file() -> None:
    data = tb.archive(tb.file_member("disk.img", DATA, typeflag=b"7"))
    assert served(data) == ("disk.img", DATA)


def test_v7_archive() -> None:
    data = tb.archive(
        tb.file_member("readme", b"r", magic=tb.V7, typeflag=b"\0"),
        tb.file_member("disk.img", DATA, magic=tb.V7, typeflag=b"\0"),
    )
    assert served(data) == ("disk.img", DATA)


def test_signed_checksum_header() -> None:
    name = "\xe9t\xe9.img".encode("latin-1")
    data = tb.archive(tb.header(name, size=len(DATA), signed=True) + tb.pad(DATA))
    assert served(data) == ("\udce9t\udce9.img", DATA)


def test_negative_mtime_in_base256() -> None:
    data = tb.archive(tb.file_member("disk.img", DATA, fields={136: tb.base256(-(10**9), 12)}))
    (member,) = members(data)
    assert member.mtime == -(10**9)


def test_gnu_sparse_name_overrides_the_header_name() -> None:
    image = bytes(100) + b"data" + bytes(100)
    data = tb.archive(tb.sparse_member("pax1.0", "vm/real.img", [(100, 4)], len(image), b"data"))
    (member,) = members(data)
    assert member.name == "vm/real.img"
    assert served(data) == ("vm/real.img", image)


def test_gnu_sparse_name_overrides_a_pax_path() -> None:
    records = [("path", "GNUSparseFile.1/real.img"), ("GNU.sparse.name", "real.img")]
    data = tb.archive(tb.pax0_sparse("ignored", [(0, 4), (8, 0)], 8, b"data", extra=records))
    assert served(data) == ("real.img", b"data" + bytes(4))


def test_gnu_sparse_name_renames_a_member_that_is_not_sparse() -> None:
    # GNU tar and tarfile apply GNU.sparse.name to any member: here the later one overwrites disk.img.
    later = tb.pax_header([("GNU.sparse.name", "disk.img")]) + tb.file_member("notes.txt", b"notes")
    data = tb.archive(tb.file_member("disk.img", DATA), later)
    assert [m.name for m in members(data)] == ["disk.img", "disk.img"]
    assert served(data) == ("disk.img", b"notes")


def test_s_typeflag_under_ustar_magic_is_a_plain_file() -> None:
    # GNU tar extracts it as it stands: the old GNU sparse fields exist only under GNU magic.
    fields = {386: tb.octal(0, 12) + tb.octal(4, 12), 483: tb.octal(1000, 12)}
    data = tb.archive(tb.file_member("disk.img", DATA, typeflag=b"S", fields=fields))
    (member,) = members(data)
    assert (member.kind, member.sparse, member.real_size) == ("file", None, len(DATA))
    assert served(data) == ("disk.img", DATA)


@pytest.mark.parametrize("typeflag", [b"0", b"\0", b"7"])
def test_regular_file_named_with_a_slash_is_a_directory(typeflag: bytes) -> None:
    # GNU tar extracts it as a directory: "BSD tar uses the convention that a slash suffix means a directory".
    image = bytes(510) + b"\x55\xaa"  # an MBR signature: a candidate by content, if it were a file
    data = tb.archive(tb.file_member("disk.img/", image, typeflag=typeflag), tb.file_member("a.txt", b"a"))
    assert [m.kind for m in members(data)] == ["other", "file"]
    with pytest.raises(NoImage):
        tb.open_bytes(data, "disk.img")


def test_duplicate_names_last_wins_with_member_option() -> None:
    data = tb.with_tarfile(("disk.img", b"first"), ("x.txt", b"x"), ("disk.img", b"second"))
    assert served(data, "disk.img") == ("disk.img", b"second")
    assert served(data, "./disk.img") == ("disk.img", b"second")


def test_duplicate_names_are_one_candidate() -> None:
    # tar -x leaves one disk.img, the last: there is nothing to choose between.
    data = tb.with_tarfile(("disk.img", b"first"), ("disk.img", b"second"))
    assert served(data) == ("disk.img", b"second")


def test_member_option_matches_normalised_names() -> None:
    data = tb.with_tarfile(("./vm/disk.img", DATA), ("other.img", b"o"))
    assert served(data, "/vm/disk.img") == ("./vm/disk.img", DATA)


def test_member_option_can_name_a_file_without_image_suffix() -> None:
    data = tb.with_tarfile(("a.img", b"a"), ("b.img", b"b"), ("blob", DATA))
    assert served(data, "blob") == ("blob", DATA)


def test_member_option_naming_nothing() -> None:
    with pytest.raises(NoImage, match=r"no file named 'nope.img'.*'a.img'"):
        tb.open_bytes(tb.with_tarfile(("a.img", b"a")), "nope.img")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("./a/b.img", "a/b.img"), ("/a/b.img", "a/b.img"), ("././/x", "x"), ("dir/", "dir"), ("a", "a")],
)
def test_normalize_name(name: str, expected: str) -> None:
    assert normalize_name(name) == expected


def test_extended_header_at_the_end_without_its_member() -> None:
    data = tb.archive(tb.file_member("a.img", b"a"), tb.gnu_long("x" * 200))
    with pytest.raises(TruncatedArchive, match="after an extended header") as info:
        members(data)
    assert info.value.offset == 1024 + 1024


def test_scan_stops_at_first_zero_block() -> None:
    data = tb.archive(tb.file_member("a.img", b"a")) + b"garbage that tar never reads" * 40
    assert [m.name for m in members(data)] == ["a.img"]


def test_bad_checksum_names_the_header_offset() -> None:
    bad = tb.set_checksum(tb.header("disk.img", size=len(DATA)), value=1)
    data = tb.archive(tb.file_member("a.txt", b"a"), bad + tb.pad(DATA))
    with pytest.raises(BadHeader, match="checksum") as info:
        members(data)
    assert info.value.offset == 1024


def test_hard_link_to_a_hard_link() -> None:
    first = tb.tarinfo("b.bin", tarfile.LNKTYPE, linkname="a.bin")
    second = tb.tarinfo("disk.img", tarfile.LNKTYPE, linkname="b.bin")
    assert served(tb.with_tarfile(("a.bin", DATA), first, second)) == ("disk.img", DATA)


def test_later_symlink_replaces_an_image() -> None:
    link = tb.tarinfo("old.img", tarfile.SYMTYPE, linkname="disk.img")
    data = tb.with_tarfile(("old.img", b"stale"), ("disk.img", DATA), link)
    assert served(data) == ("disk.img", DATA)


@pytest.mark.parametrize(
    ("value", "mtime"),
    [
        (str(archive.MAX_MTIME), archive.MAX_MTIME),
        (f"-{archive.MAX_MTIME}.999", -archive.MAX_MTIME),
        ("00000000000000000000000000000012.5", 12),  # leading zeros: still 12
        (str(archive.MAX_MTIME + 1), 1_700_000_000),  # its nanoseconds do not fit 64 bits: the header's
        (f"-{archive.MAX_MTIME + 1}", 1_700_000_000),
    ],
)
def test_pax_mtime_range(value: str, mtime: int) -> None:
    # FUSE's st_mtime_ns is a signed 64-bit count of nanoseconds: years 1677 to 2262.
    data = tb.archive(tb.pax_header([("mtime", value)]), tb.file_member("disk.img", DATA))
    (member,) = members(data)
    assert member.mtime == mtime
    assert len(member.warnings) == (mtime == 1_700_000_000)


@pytest.mark.parametrize("mtime", [archive.MAX_MTIME, -archive.MAX_MTIME])
def test_base256_header_mtime_at_the_range_ends(mtime: int) -> None:
    data = tb.archive(tb.file_member("disk.img", DATA, fields={136: tb.base256(mtime, 12)}))
    (member,) = members(data)
    assert (member.mtime, member.warnings) == (mtime, ())


def test_short_reads_give_the_same_members() -> None:
    # Payloads are then filled into one buffer (a bytearray) instead of joined from parts.
    data = tb.archive(
        tb.gnu_long("l" * 3000 + ".img"),
        tb.file_member("x", DATA),
        tb.pax_header([("path", "p" * 2000 + ".img"), ("mtime", "12.5")]),
        tb.file_member("y", DATA),
    )
    whole = tb.read_at_of(data)

    def short(offset: int, size: int) -> bytes:
        return whole(offset, min(size, 100))

    assert list(scan_members(short, len(data))) == members(data)
    assert served(data, "l" * 3000 + ".img") == ("l" * 3000 + ".img", DATA)


# ---- a stream of unknown size (compressed): where it ends is found by reading --------------------------

UNKNOWN = 1 << 62  # what a compressed source says until its end is decompressed


def stream_members(data: bytes) -> list[Member]:
    return list(scan_members(tb.read_at_of(data), UNKNOWN))


def test_stream_without_end_of_archive_blocks() -> None:
    # Served from a plain file, and now from a .tar.gz too (it said "ends in the middle of a header block").
    data = tb.archive(tb.file_member("a.txt", b"a"), tb.file_member("disk.img", DATA), end=False)
    assert [m.name for m in stream_members(data)] == ["a.txt", "disk.img"]
    image = open_image(tb.read_at_of(data), UNKNOWN)
    assert image.mapper.read(0, len(DATA) + 1) == DATA


@pytest.mark.parametrize(
    ("cut", "message", "offset"),
    [
        (
            1024 + 512 + 1000,
            "member 'disk.img' needs 1792 bytes of data but the archive ends before them",
            1024,
        ),
        (1024 + 512 + 1792 + 100, "inside the padding after a member's data", 1024 + 512 + 1792),
        (512 + 300, "inside the padding after an extended header", 512 + 201),
        (1024, "after an extended header, before its member", 1024),
    ],
    ids=["in-data", "in-padding", "in-extended-padding", "after-extended"],
)
def test_stream_that_ends_early_says_where_inside_it(cut: int, message: str, offset: int) -> None:
    # The offset is inside what was decompressed: the header expected next is past the end of it.
    if "extended" in message:
        data = tb.archive(tb.gnu_long("x" * 200), tb.file_member("disk.img", DATA))[:cut]
    else:
        data = tb.archive(tb.file_member("a.txt", b"a"), tb.file_member("disk.img", DATA))[:cut]
    with pytest.raises(TruncatedArchive, match=message) as info:
        stream_members(data)
    assert info.value.offset == offset
    assert info.value.offset <= len(data)
