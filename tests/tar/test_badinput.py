"""Bad input: truncated, corrupt, random and absurd archives fail with an ArchiveError, never a crash.

An ArchiveError names the archive offset of the problem wherever there is one; IndexError, ValueError,
struct.error, OverflowError or MemoryError would be bugs.
"""

import os
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import pyzstd
from hypothesis import given, settings
from hypothesis import strategies as st
from kit import sparsegen
from kit import tarbuilder as tb
from kit.mounts import run_tarfuse_measuring_peak_rss

from tarfuse.errors import ArchiveError, BadHeader, NoImage, TruncatedArchive
from tarfuse.image.open import Image
from tarfuse.tar import archive, files
from tarfuse.tar.archive import scan_members

LAYOUT = sparsegen.layout_from_runs([(1000, 1024), (5000, 512), (0, 512), (70_000, 2000)], 333)
IMAGE = sparsegen.image_of(LAYOUT)
PACKED = sparsegen.packed(LAYOUT, IMAGE)
README = tb.file_member("readme.txt", b"not an image\n")
MANY = [(1024 * i + 17, 512) for i in range(120)]  # 120 extents: long maps in every dialect
MANY_SIZE = 1024 * 120 + 1000


def _many(variant: str) -> tuple[bytes, bytes]:
    layout = sparsegen.Layout(MANY_SIZE, tuple(MANY))
    image = sparsegen.image_of(layout)
    return tb.sparse_member(variant, "many.img", MANY, MANY_SIZE, sparsegen.packed(layout, image)), image


# Each kind: the image member (without end blocks) and the image it holds.
KINDS: dict[str, Callable[[], tuple[bytes, bytes]]] = {
    "ustar": lambda: (tb.file_member("disk.img", IMAGE), IMAGE),
    "gnu-long-name": lambda: (tb.gnu_long("d" * 300 + ".img") + tb.file_member("short", IMAGE), IMAGE),
    "pax-long-path": lambda: (
        tb.pax_header([("path", "p" * 700 + ".img"), ("mtime", "1.5")]) + tb.file_member("x", IMAGE),
        IMAGE,
    ),
    "oldgnu": lambda: (tb.sparse_member("oldgnu", "s.img", LAYOUT.extents, LAYOUT.size, PACKED), IMAGE),
    "pax1.0": lambda: (tb.sparse_member("pax1.0", "s.img", LAYOUT.extents, LAYOUT.size, PACKED), IMAGE),
    "oldgnu-chain": lambda: _many("oldgnu"),
    "pax1.0-long-map": lambda: _many("pax1.0"),
    "pax0.0-long-payload": lambda: _many("pax0.0"),
    "pax0.1-long-payload": lambda: _many("pax0.1"),
}


def _cut_points(size: int) -> list[int]:
    blocks = {b + d for b in range(0, size + 1, 512) for d in (-1, 0, 1, 100)}
    return sorted(p for p in blocks | set(range(0, size, 241)) if 0 <= p < size)


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_anywhere(kind: str) -> None:
    member, image = KINDS[kind]()
    archive = tb.archive(README, member)
    image_start = len(README)
    last = list(scan_members(tb.read_at_of(archive), len(archive)))[-1]
    image_end = last.data_offset + last.stored_size
    for cut in _cut_points(len(archive)):
        result = _outcome(archive[:cut])
        if isinstance(result, NoImage):
            assert cut <= image_start, cut  # cut before the image: a shorter archive with no image
        elif isinstance(result, ArchiveError):
            _assert_says_why_and_where(result, cut)
        else:
            assert cut >= image_end, cut
            assert result.mapper.read(0, len(image) + 1) == image


def _assert_says_why_and_where(error: ArchiveError, archive_size: int) -> None:
    """What the module promises: a reason, and the offset of the problem inside the archive, in the message
    too; NoImage (no member qualifies, or several do) has no one place to name."""
    assert error.reason, repr(error)
    if isinstance(error, NoImage):
        return
    assert error.offset is not None, repr(error)
    assert 0 <= error.offset <= archive_size, (error.offset, archive_size, str(error))
    assert str(error) == f"{error.reason} at archive offset {error.offset}"


def _outcome(archive: bytes) -> Image | ArchiveError:
    """The image served from `archive`, or the error that refused it."""
    try:
        return tb.open_bytes(archive)
    except ArchiveError as exc:
        return exc


def test_truncated_inside_the_last_member_padding_names_the_end() -> None:
    archive = tb.archive(tb.file_member("disk.img", b"x" * 100), end=False)[:700]
    with pytest.raises(TruncatedArchive, match="padding") as info:
        tb.open_bytes(archive)
    assert info.value.offset == 700


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_mutated_archives_fail_cleanly(kind: str, data: st.DataObject) -> None:
    member, _ = KINDS[kind]()
    archive = bytearray(tb.archive(README, member))
    for _ in range(data.draw(st.integers(1, 3))):
        archive[data.draw(st.integers(0, len(archive) - 1))] = data.draw(st.integers(0, 255))
    for start in range(0, len(archive), tb.BLOCK):  # re-sign headers, so changes reach the fields
        block = archive[start : start + tb.BLOCK]
        if block[257:262] == b"ustar":
            archive[start : start + tb.BLOCK] = tb.set_checksum(block)
    try:
        image = tb.open_bytes(bytes(archive))
        image.mapper.read(0, min(image.mapper.size, 1 << 20))
    except ArchiveError as exc:  # refused when opened, or when read: either way it says why and where
        _assert_says_why_and_where(exc, len(archive))


@given(st.binary(max_size=3000))
def test_random_bytes(data: bytes) -> None:
    with pytest.raises(ArchiveError):
        tb.open_bytes(data)


def test_empty_file() -> None:
    with pytest.raises(NoImage, match="no regular files"):
        tb.open_bytes(b"")


def test_only_end_of_archive_blocks() -> None:
    with pytest.raises(NoImage, match="no regular files"):
        tb.open_bytes(tb.END)


def test_shorter_than_one_block() -> None:
    with pytest.raises(TruncatedArchive, match="middle of a header block") as info:
        tb.open_bytes(b"disk.img" + bytes(92))
    assert info.value.offset == 0


def test_bad_checksum() -> None:
    header = tb.set_checksum(tb.header("disk.img", size=len(IMAGE)), value=12345)
    with pytest.raises(BadHeader, match="checksum") as info:
        tb.open_bytes(tb.archive(README, header + tb.pad(IMAGE)))
    assert info.value.offset == len(README)


@pytest.mark.parametrize(
    "size_field",
    [b"77777777777\0", tb.base256(2**88 - 1, 12), tb.base256(2**40, 12)],
    ids=["octal-max", "base256-huge", "base256-1TiB"],
)
def test_absurd_size_field(size_field: bytes) -> None:
    header = tb.header("disk.img", fields={124: size_field})
    with pytest.raises(TruncatedArchive, match=r"needs \d+ bytes of data") as info:
        tb.open_bytes(tb.archive(README, header + tb.pad(b"x" * 100)))
    assert info.value.offset == len(README)


@pytest.mark.parametrize("typeflag", [b"x", b"g", b"L", b"K"])
def test_extended_header_claiming_10_gb(typeflag: bytes) -> None:
    header = tb.header("ext", size=10 * 10**9, typeflag=typeflag)
    with pytest.raises(BadHeader, match=r": 10000000000 bytes, past tarfuse.s limit of \d+ bytes") as info:
        tb.open_bytes(tb.archive(README, header, tb.file_member("disk.img", b"x")))
    assert info.value.offset == len(README)


def test_pax_record_claiming_10_gb() -> None:
    payload = b"10000000000 path=disk.img\n"
    with pytest.raises(BadHeader, match="10000000000") as info:
        tb.open_bytes(tb.archive(README, tb.pax_header(payload), tb.file_member("x", b"x")))
    assert info.value.offset == len(README) + 512


def test_pax_record_longer_than_its_header_size() -> None:
    payload = tb.pax_payload([("path", "disk.img")])
    header = tb.pax_header(payload, size=len(payload) - 5)
    with pytest.raises(BadHeader, match="does not fit") as info:
        tb.open_bytes(tb.archive(README, header, tb.file_member("x", b"x")))
    assert info.value.offset == len(README) + 512


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("size", "9" * 5000, "absurdly large"),  # int() would raise ValueError past 4300 digits
        ("size", "-1", "not a decimal"),
        ("size", "1e3", "not a decimal"),
        ("size", "\u0661\u0662", "not a decimal"),  # Arabic-Indic digits
        ("size", "", "not a decimal"),
        ("GNU.sparse.realsize", "abc", "not a decimal"),
    ],
)
def test_bad_pax_number(key: str, value: str, message: str) -> None:
    records = [(key, value)]
    if key.startswith("GNU.sparse"):
        records += [("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0")]
    pax = tb.pax_header(records)
    archive = tb.archive(README, pax, tb.file_member("disk.img", b"x"))
    with pytest.raises(BadHeader, match=message) as info:
        tb.open_bytes(archive)
    assert info.value.offset == len(README) + len(pax)  # the header the records apply to


def test_nul_in_a_pax_path() -> None:
    # No file name holds a NUL: GNU tar would cut the name there, tarfile keep it.
    pax = tb.pax_header([("path", "vm/dis\0k.img")])
    with pytest.raises(BadHeader, match="has a NUL byte") as info:
        tb.open_bytes(tb.archive(README, pax, tb.file_member("x", b"x")))
    assert info.value.offset == len(README) + len(pax)


def test_sparse_records_in_a_global_header() -> None:
    # GNU tar applies them to every member after; tarfile ignores them.
    records = [("GNU.sparse.map", "0,1"), ("GNU.sparse.size", "1")]
    with pytest.raises(BadHeader, match="global PAX header") as info:
        tb.open_bytes(
            tb.archive(README, tb.pax_header(records, typeflag=b"g"), tb.file_member("d.img", b"x"))
        )
    assert info.value.offset == len(README) + 512


def test_pax_sparse_records_on_a_gnu_header() -> None:
    # GNU tar reads PAX sparse records only for a POSIX header; under GNU magic it extracts the raw data.
    member = bytearray(tb.sparse_member("pax1.0", "d.img", [(0, 3)], 3, b"abc"))
    header = 2 * tb.BLOCK  # the member's own header, after the PAX header and its records
    block = bytearray(member[header : header + tb.BLOCK])
    block[257:265] = tb.GNU
    member[header : header + tb.BLOCK] = tb.set_checksum(block)
    with pytest.raises(BadHeader, match="without POSIX magic") as info:
        tb.open_bytes(tb.archive(bytes(member)))
    assert info.value.offset == header


def test_size_after_a_leading_nul() -> None:
    # GNU tar extracts 512 zero bytes and goes on to notes.txt; tarfile sees an empty disk.img, then the end.
    header = tb.header("disk.img", fields={124: b"\x0000000001000"})
    with pytest.raises(BadHeader, match="after a leading NUL") as info:
        tb.open_bytes(tb.archive(README, header + bytes(512), tb.file_member("notes.txt", b"hi")))
    assert info.value.offset == len(README)


@pytest.mark.parametrize("key", ["GNU.sparse.size", "GNU.sparse.realsize"])
def test_sparse_size_without_a_sparse_map(key: str) -> None:
    # GNU tar extracts that many bytes (here, the rest of the archive too); tarfile ignores the record.
    pax = tb.pax_header([(key, "26409")])
    with pytest.raises(BadHeader, match="without a sparse map") as info:
        tb.open_bytes(
            tb.archive(README, pax, tb.file_member("notes.txt", b"hi"), tb.file_member("d.img", b"x"))
        )
    assert info.value.offset == len(README) + len(pax)


def test_negative_size() -> None:
    header = tb.header("disk.img", fields={124: tb.base256(-512, 12)})
    with pytest.raises(BadHeader, match="negative size") as info:
        tb.open_bytes(tb.archive(README, header))
    assert info.value.offset == len(README)


def test_pax_mtime_fraction_and_sign() -> None:
    archive = tb.archive(tb.pax_header([("mtime", "-12.75")]), tb.file_member("disk.img", b"x"))
    (member,) = scan_members(tb.read_at_of(archive), len(archive))
    assert member.mtime == -12


def test_tarfile_archive_with_garbage_after_the_end() -> None:
    archive = tb.with_tarfile(("disk.img", IMAGE), fmt=tarfile.GNU_FORMAT) + b"\xff" * 3000
    assert tb.open_bytes(archive).mapper.read(0, len(IMAGE)) == IMAGE


# ---- metadata read whole has a bound (a small archive must never cost large memory) ----------------

EXTENDED_LIMITS = {
    b"L": archive.MAX_LONG_NAME_SIZE,
    b"K": archive.MAX_LONG_NAME_SIZE,
    b"x": archive.MAX_PAX_SIZE,
    b"g": archive.MAX_PAX_SIZE,
}


@pytest.mark.parametrize("typeflag", EXTENDED_LIMITS)
def test_extended_header_past_its_limit_is_refused_unread(typeflag: bytes) -> None:
    # The payload is there, and would parse: what refuses it is its size, before a byte of it is read.
    limit = EXTENDED_LIMITS[typeflag]
    header = tb.header("././@LongLink", size=limit + 1, typeflag=typeflag, magic=tb.GNU)
    read_at = tb.endless(header, b"19 path=a/disk.img\n" if typeflag in b"xg" else b"a", budget=1 << 20)
    with pytest.raises(
        BadHeader, match=f": {limit + 1} bytes, past tarfuse's limit of {limit} bytes"
    ) as info:
        list(scan_members(read_at, 1 << 40))
    assert info.value.offset == 0


def test_long_name_at_the_limit_is_read() -> None:
    name = "d/" * ((archive.MAX_LONG_NAME_SIZE - 6) // 2) + "x.img"
    assert len(name) + 1 == archive.MAX_LONG_NAME_SIZE  # the payload ends with a NUL
    data = tb.archive(tb.gnu_long(name), tb.file_member("short", b"image"))
    (member,) = scan_members(tb.read_at_of(data), len(data))
    assert member.name == name


def test_pax_header_at_the_limit_is_read() -> None:
    payload = tb.pax_record("path", "p" * (archive.MAX_PAX_SIZE - 18) + ".img")
    assert len(payload) == archive.MAX_PAX_SIZE
    data = tb.archive(tb.pax_header(payload), tb.file_member("x", b"image"))
    (member,) = scan_members(tb.read_at_of(data), len(data))
    assert member.name.endswith("p.img")


def test_pax_headers_of_one_member_add_up() -> None:
    # Eight 'x' headers of 1 MiB are the limit for one member; a ninth is past it.
    record = tb.pax_record("comment", "c" * ((1 << 20) - 17))
    assert len(record) == 1 << 20
    headers = [tb.pax_header(record)] * 9
    data = tb.archive(*headers, tb.file_member("disk.img", b"x"))
    with pytest.raises(BadHeader, match=r"PAX extended headers: 9437184 bytes together, past") as info:
        list(scan_members(tb.read_at_of(data), len(data)))
    assert info.value.offset == 8 * len(headers[0])
    fine = tb.archive(*headers[:8], tb.file_member("disk.img", b"x"))
    assert [m.name for m in scan_members(tb.read_at_of(fine), len(fine))] == ["disk.img"]


def _traced(work: Callable[[], object]) -> tuple[object, int, int]:
    """Run `work`; return its result, the memory it still holds, and the peak it reached (tracemalloc)."""
    tracemalloc.start()
    try:
        result = work()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, held, peak


def test_global_pax_headers_keep_only_what_the_walk_reads() -> None:
    # Every 'g' header adds to the ones before, so distinct keywords used to pile up for the whole walk.
    headers = [tb.pax_header([(f"k{i}.{j}", "v") for j in range(40_000)], typeflag=b"g") for i in range(5)]
    data = tb.archive(*headers, tb.pax_header([("mtime", "7")], typeflag=b"g"), tb.file_member("d.img"))
    members, _, peak = _traced(lambda: list(scan_members(tb.read_at_of(data), len(data))))
    assert [m.mtime for m in members] == [7]  # type: ignore[attr-defined]
    assert peak < 12 << 20  # one header's records at a time (8 MiB); all five of them cost 22 MiB


def test_members_keep_no_pax_records() -> None:
    # PAX 0.0 maps of 20,000 records: each member used to keep its own, until the walk's caller let go.
    entries = [(i, 0) for i in range(10_000)]
    data = tb.archive(*[tb.pax0_sparse(f"s{i}.img", entries, 10_000, b"", version="0.0") for i in range(6)])
    members, held, _ = _traced(lambda: list(scan_members(tb.read_at_of(data), len(data))))
    assert len(members) == 6  # type: ignore[arg-type]
    assert held < 1 << 20  # six maps took 12 MiB


def _zst_with_long_name(path: Path, claimed: int) -> None:
    """A .tar.zst whose first header is a GNU 'L' of `claimed` bytes of 'a' (16 KB of zstd for 256 MiB)."""
    compressor = pyzstd.ZstdCompressor()
    with path.open("wb") as out:
        out.write(compressor.compress(tb.header("././@LongLink", size=claimed, typeflag=b"L", magic=tb.GNU)))
        chunk = b"a" * (1 << 20)
        for start in range(0, claimed, len(chunk)):
            out.write(compressor.compress(chunk[: claimed - start]))
        tail = tb.pad(bytes(-claimed % tb.BLOCK)) + tb.archive(tb.file_member("disk.img", b"x" * 1000))
        out.write(compressor.compress(tail) + compressor.flush())


def test_list_of_a_small_zst_claiming_a_huge_long_name(tmp_path: Path) -> None:
    # An 84 KB .tar.zst with a 512 MiB 'L' header made `tarfuse --list` peak at 1.5 GiB: names have a bound.
    archive_path = tmp_path / "long.tar.zst"
    _zst_with_long_name(archive_path, 256 << 20)
    assert archive_path.stat().st_size < 100_000
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result, peak = run_tarfuse_measuring_peak_rss("--list", archive_path, scratch=tmp_path, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, lines
    assert len(lines) == 1
    assert "GNU long name ('L'): 268435456 bytes, past tarfuse's limit" in lines[0]
    assert lines[0].endswith("at archive offset 0")
    assert peak < 128 * 1024 * 1024  # Python and tarfuse take about 35 MiB; it was 800 MiB


# ---- the number of members has a bound too: every name is kept while the archive is read -------------


def test_member_count_at_the_limit_is_read_and_one_more_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "MAX_MEMBERS", 10)
    empties = [tb.header(f"empty-{i}", size=0) for i in range(9)]
    at_limit = tb.archive(*empties, tb.file_member("disk.img", IMAGE))
    assert tb.open_bytes(at_limit).mapper.read(0, len(IMAGE)) == IMAGE
    over = tb.archive(tb.header("one-more", size=0), *empties, tb.file_member("disk.img", IMAGE))
    with pytest.raises(ArchiveError, match="more than 10 members: past tarfuse's limit") as info:
        tb.open_bytes(over)
    assert info.value.offset == 10 * tb.BLOCK  # the header of the eleventh


def test_list_of_a_small_zst_with_a_million_names_stays_under_the_memory_ceiling(tmp_path: Path) -> None:
    # 300,000 empty members in 2 MB of zstd: kept whole, their names took ~100 MiB (a million: 330 MiB).
    archive_path = tmp_path / "names.tar.zst"
    count = files.MAX_MEMBERS + 50_000
    compressor = pyzstd.ZstdCompressor()
    with archive_path.open("wb") as out:
        for start in range(0, count, 10_000):
            names = (f"d/{i:09d}" for i in range(start, min(start + 10_000, count)))
            batch = b"".join(tb.header(name, size=0) for name in names)
            out.write(compressor.compress(batch))
        out.write(compressor.compress(tb.archive(tb.file_member("disk.img", IMAGE))) + compressor.flush())
    assert archive_path.stat().st_size < 8 << 20
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result, peak = run_tarfuse_measuring_peak_rss("--list", archive_path, scratch=tmp_path, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, lines
    assert lines == [
        f"tarfuse: {archive_path}: more than {files.MAX_MEMBERS:,} members: past tarfuse's limit (it keeps "
        f"every name while it reads the archive); extract the image with tar -x at archive offset "
        f"{files.MAX_MEMBERS * tb.BLOCK}"
    ]
    assert peak < 256 << 20, f"{peak >> 20} MiB"
