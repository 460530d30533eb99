"""tar/header.py: number fields, checksums, header fields and PAX records, one block at a time."""

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kit import tarbuilder as tb

from tarfuse.errors import BadHeader
from tarfuse.tar import header as th


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (b"00000001750\0", 0o1750),
        (b"     1750 \0\0", 0o1750),  # space padding, as some old tars write
        (b"0000644\0", 0o644),
        (b"\0" * 12, 0),
        (b" " * 11 + b"\0", 0),
        (b"17\0garbage\0\0", 0o17),  # the field ends at its first NUL
        (b"\x80" + (9 * 2**30).to_bytes(11, "big"), 9 * 2**30),
        (b"\xff" * 12, -1),
        (tb.base256(-(2**40), 12), -(2**40)),
        (b"77777777777\0", 0o77777777777),
    ],
)
def test_parse_number(field: bytes, value: int) -> None:
    assert th.parse_number(field) == value


@pytest.mark.parametrize("field", [b"0000001_7\0", b"+17\0", b"-1\0", b"0000009\0", b"12 34\0", b"\x81abc"])
def test_parse_number_rejects_what_int_would_accept(field: bytes) -> None:
    with pytest.raises(BadHeader, match="not an octal number"):
        th.parse_number(field)


@given(st.integers(0, 2**88 - 1))
def test_number_round_trip(value: int) -> None:
    assert th.parse_number(tb.number(value, 12)) == value


@given(st.integers(-(2**88), -1))
def test_negative_base256_round_trip(value: int) -> None:
    assert th.parse_number(tb.base256(value, 12)) == value


def test_checksum_unsigned() -> None:
    assert th.checksum_ok(tb.header("é.img"))


def test_checksum_signed_as_old_sun_tar_computed_it() -> None:
    block = tb.header("\xe9\xff.img".encode("latin-1"), signed=True)
    assert tb.checksum(block, signed=True) != tb.checksum(block)
    assert th.checksum_ok(block)
    assert th.parse_header(block, 0).name == "\udce9\udcff.img"  # not UTF-8: kept byte for byte


def test_checksum_wrong_by_one() -> None:
    block = tb.header("a.img")
    bad = tb.set_checksum(block, value=tb.checksum(block) + 1)
    assert not th.checksum_ok(bad)
    with pytest.raises(BadHeader, match="checksum") as info:
        th.parse_header(bad, 4096)
    assert info.value.offset == 4096


def test_checksum_field_not_octal() -> None:
    block = bytearray(tb.header("a.img"))
    block[148:156] = b"zzzzzz\0 "
    assert not th.checksum_ok(bytes(block))


def test_header_fields() -> None:
    block = tb.header("dir/a.img", size=12345, mtime=1_600_000_000, typeflag=b"0")
    header = th.parse_header(block, 0)
    assert (header.name, header.size, header.mtime, header.typeflag) == (
        "dir/a.img",
        12345,
        1_600_000_000,
        ord("0"),
    )
    assert not header.is_gnu


def test_ustar_prefix_is_joined_to_name() -> None:
    block = tb.header("disk.img", prefix="a" * 150)
    assert th.parse_header(block, 0).name == "a" * 150 + "/disk.img"


def test_gnu_magic_ignores_prefix_area() -> None:
    # In the GNU formats bytes 345.. are atime/ctime, not a prefix.
    block = tb.header("disk.img", magic=tb.GNU, fields={345: b"00000000017\0"})
    header = th.parse_header(block, 0)
    assert header.name == "disk.img"
    assert header.is_gnu


def test_v7_header_has_no_magic() -> None:
    block = tb.header("disk.img", magic=tb.V7, typeflag=b"\0", size=1024, fields={345: b"junk"})
    header = th.parse_header(block, 0)
    assert (header.name, header.size, header.typeflag) == ("disk.img", 1024, 0)


def test_negative_mtime_in_base256() -> None:
    block = tb.header("old.img", fields={136: tb.base256(-86400, 12)})
    assert th.parse_header(block, 0).mtime == -86400


@pytest.mark.parametrize("field", [b"zzzzzzzzzzz\0", b"\x0000000001000", b"0000001_7\0"])
def test_mtime_that_is_not_a_number_is_none(field: bytes) -> None:
    # It does not change the bytes served: archive.py warns and serves another mtime; the size still refuses.
    header = th.parse_header(tb.header("a.img", size=5, fields={136: field}), 0)
    assert (header.mtime, header.size) == (None, 5)


def test_negative_size_is_rejected() -> None:
    block = tb.header("a.img", fields={124: tb.base256(-512, 12)})
    with pytest.raises(BadHeader, match="negative size") as info:
        th.parse_header(block, 1024)
    assert info.value.offset == 1024


def test_bad_size_field_names_the_offset() -> None:
    block = tb.header("a.img", fields={124: b"12x45678901\0"})
    with pytest.raises(BadHeader, match="not an octal number") as info:
        th.parse_header(block, 512)
    assert info.value.offset == 512


def test_old_gnu_sparse_header_fields() -> None:
    block = tb.old_gnu_sparse("s.img", [(0, 10), (100, 5)], 4096, bytes(15))[: tb.BLOCK]
    header = th.parse_header(block, 0)
    assert header.typeflag == th.GNU_SPARSE
    assert header.sparse_entries == ((0, 10), (100, 5))
    assert header.real_size == 4096
    assert not header.is_extended


@pytest.mark.parametrize("field", [b"\x0000000001000", b"\x00 0000001000"])
def test_number_after_a_leading_nul(field: bytes) -> None:
    # GNU tar reads 512 here (it skips one leading NUL), tarfile 0.
    with pytest.raises(BadHeader, match="after a leading NUL"):
        th.parse_number(field)


def test_all_nul_number_is_zero() -> None:
    assert th.parse_number(bytes(12)) == th.parse_number(b"\0" + b" " * 11) == 0


def test_pax_keyword_with_a_nul() -> None:
    # GNU tar stops the keyword at the NUL and finds no '='; tarfile keeps it.
    record = tb.pax_record("GNU.sparse.nu\0mblocks", "1")
    with pytest.raises(BadHeader, match="no keyword=value") as info:
        th.parse_pax_records(tb.pax_record("path", "a") + record, 1000)
    assert info.value.offset == 1000 + len(tb.pax_record("path", "a"))


def test_old_gnu_slot_is_unused_when_its_numbytes_starts_with_nul() -> None:
    # GNU tar's rule (src/sparse.c, oldgnu_add_sparse): the offset field does not decide.
    used = bytes(12) + tb.octal(512, 12)  # offset all NUL reads as 0
    unused = tb.octal(4096, 12) + bytes(12)
    assert th.parse_sparse_numbers(used + unused + used, 3) == [0, 512]
    assert not th.sparse_slots_full(used + unused, 2)
    assert th.sparse_slots_full(used + used, 2)


def test_s_typeflag_without_gnu_magic_is_no_sparse_header() -> None:
    # GNU tar reads the old GNU sparse fields only under GNU magic; under ustar 'S' is a plain file.
    fields = {386: tb.octal(0, 12) + tb.octal(10, 12), 482: b"\1", 483: tb.octal(100, 12)}
    header = th.parse_header(tb.header("s.img", size=10, typeflag=b"S", fields=fields), 0)
    assert (header.sparse_entries, header.is_extended, header.real_size) == ((), False, 0)


def test_old_gnu_sparse_header_base256_real_size() -> None:
    block = tb.old_gnu_sparse("s.img", [(9 * 2**30, 512)], 10 * 2**30, bytes(512))[: tb.BLOCK]
    header = th.parse_header(block, 0)
    assert header.real_size == 10 * 2**30
    assert header.sparse_entries == ((9 * 2**30, 512),)


def test_old_gnu_sparse_negative_real_size() -> None:
    block = tb.header("s.img", typeflag=b"S", magic=tb.GNU, fields={483: tb.base256(-1, 12)})
    with pytest.raises(BadHeader, match="negative real size"):
        th.parse_header(block, 0)


@given(
    st.lists(st.tuples(st.integers(0, 2**70), st.integers(1, 2**70)), max_size=21),
    st.booleans(),
)
def test_extension_block_round_trip(entries: list[tuple[int, int]], extended: bool) -> None:
    block = bytearray(tb.sparse_entries(entries, 21) + bytes(8))
    block[504] = extended
    numbers, flag = th.parse_extension_block(bytes(block))
    assert list(zip(numbers[0::2], numbers[1::2], strict=True)) == entries
    assert flag == extended


def test_extension_block_space_padded_numbers() -> None:
    slot = b"        144\0" + b"         12\0"  # valid octal, but not GNU tar's "%011o"
    assert th.parse_sparse_entries(slot + bytes(24), 2) == ((100, 10),)


def test_extension_block_bad_number() -> None:
    with pytest.raises(BadHeader):
        th.parse_sparse_entries(b"00000000009\0" + b"00000000001\0", 1)


def test_pax_records_in_order_with_repeats() -> None:
    payload = tb.pax_payload(
        [("GNU.sparse.offset", "0"), ("GNU.sparse.numbytes", "5"), ("GNU.sparse.offset", "9")]
    )
    assert th.parse_pax_records(payload, 0) == [
        ("GNU.sparse.offset", "0"),
        ("GNU.sparse.numbytes", "5"),
        ("GNU.sparse.offset", "9"),
    ]


def test_pax_record_value_may_hold_newlines_and_equals() -> None:
    payload = tb.pax_record("path", "a=b\nc.img")
    assert th.parse_pax_records(payload, 0) == [("path", "a=b\nc.img")]


def test_pax_records_stop_at_nul_padding() -> None:
    payload = tb.pax_record("path", "x.img") + bytes(40)
    assert th.parse_pax_records(payload, 0) == [("path", "x.img")]


@pytest.mark.parametrize(
    ("payload", "message", "at"),
    [
        (b"x path=a\n", "does not start with a length", 0),
        (b"10000000000 path=a\n", "does not fit", 0),  # claims 10 GB
        (b"99999999999999999999 path=a\n", "does not fit", 0),
        (b"12 path=abc", "does not fit", 0),  # no newline at its end
        (b"12 path=abc!\n", "does not fit", 0),  # length off by one: byte 12 is not "\n"
        (b"2 \n", "does not fit", 0),  # shorter than its own length field
        (b"3 \n", "no keyword=value", 0),
        (b"11 pathabc\n", "no keyword=value", 0),
        (b"9 =value\n", "no keyword=value", 0),
        (tb.pax_record("path", "a") + b"junk", "does not start with a length", 9),
    ],
)
def test_bad_pax_records(payload: bytes, message: str, at: int) -> None:
    with pytest.raises(BadHeader, match=message) as info:
        th.parse_pax_records(payload, 2048)
    assert info.value.offset == 2048 + at


@given(st.binary(max_size=200))
def test_pax_records_never_crash(payload: bytes) -> None:
    with contextlib.suppress(BadHeader):
        th.parse_pax_records(payload, 0)


@given(st.binary(min_size=512, max_size=512))
def test_random_blocks_never_crash(block: bytes) -> None:
    with contextlib.suppress(BadHeader):
        th.parse_header(block, 0)


@given(st.binary(min_size=512, max_size=512))
def test_random_blocks_with_valid_checksum_never_crash(block: bytes) -> None:
    with contextlib.suppress(BadHeader):
        th.parse_header(tb.set_checksum(block), 0)


def test_long_name_payload_keeps_bytes_that_are_not_utf8() -> None:
    payload = b"\xff" * 600 + b".img\0garbage after the NUL"
    assert th.decode_name(payload) == "\udcff" * 600 + ".img"
    assert th.decode_name(bytearray(payload)) == "\udcff" * 600 + ".img"
    assert th.decode_name(b"x" * 700) == "x" * 700  # no NUL at all: the whole payload


def test_pax_records_from_a_bytearray() -> None:
    payload = tb.pax_payload([("path", "a.img"), ("mtime", "1.5"), ("path", "b.img")])
    assert th.parse_pax_records(bytearray(payload), 0) == th.parse_pax_records(payload, 0)
    assert th.parse_pax_records(payload, 0)[2] == ("path", "b.img")
