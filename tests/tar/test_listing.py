"""tar.listing: a member list written down by the indexing pass and read back instead of the walk."""

import json
import tracemalloc

import pytest
from kit.tarbuilder import (
    SPARSE_VARIANTS,
    archive,
    file_member,
    gnu_long,
    header,
    pax_header,
    read_at_of,
    sparse_member,
)

from tarfuse.image.open import list_images, open_image
from tarfuse.tar import listing
from tarfuse.tar.archive import scan_members
from tarfuse.tar.listing import BadListing, ListedMembers, ListingMismatch, Recorder, decode

KiB = 1024


def every_kind() -> bytes:
    """Members of every kind the walk makes, in every dialect that changes what it reads."""
    data = bytes(range(256)) * 16
    return archive(
        file_member("small.txt", b"hello"),
        gnu_long("dir/" + "long" * 40 + ".raw") + header("ignored", size=len(data)) + data,
        pax_header([("path", "pax/ünïcode.img"), ("mtime", "1700000000.5")]) + file_member("x", data),
        header(b"raw\xffname.bin", size=5) + b"bytes".ljust(512, b"\0"),
        header("link.raw", typeflag=b"1", linkname="small.txt"),
        header("sym", typeflag=b"2", linkname="../../etc/passwd"),
        header("dir/", typeflag=b"5"),
        *(
            sparse_member(
                v, f"sparse-{v}.raw", [(0, 4 * KiB), (64 * KiB, 4 * KiB)], 128 * KiB, data[: 8 * KiB]
            )
            for v in SPARSE_VARIANTS
        ),
    )


def recorded(data: bytes) -> bytes:
    recorder = Recorder()
    for member in scan_members(read_at_of(data), len(data)):
        recorder.add(member)
    written = recorder.encode()
    assert written is not None
    return written


def test_a_written_list_reads_back_as_the_walk_made_it() -> None:
    data = every_kind()
    walked = list(scan_members(read_at_of(data), len(data)))
    assert {m.kind for m in walked} == {"file", "hardlink", "symlink", "other"}
    assert {m.sparse.variant for m in walked if m.sparse} == set(SPARSE_VARIANTS)
    assert decode(recorded(data)) == walked


def test_each_listed_member_is_the_archives_entry_at_its_offset() -> None:
    data = every_kind()
    listed = ListedMembers(decode(recorded(data)), read_at_of(data), len(data))
    for member in listed:
        listed.check(member)  # raises if the walk reads anything else there


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("name", "other.raw", "where the archive holds 'small.txt'"),
        ("data_offset", 1024, "other fields"),
        ("header_offset", 512, "no member where it lists"),  # inside small.txt's data: no header there
        ("header_offset", 1 << 30, "no member where it lists"),  # past the archive's end
        ("header_offset", "end", "holds nothing"),  # at the end-of-archive blocks
    ],
)
def test_a_member_that_is_not_the_archives_entry_is_a_mismatch(field: str, value: object, said: str) -> None:
    data = every_kind()
    rows = json.loads(recorded(data))
    value = len(data) - 1024 if value == "end" else value
    rows[0][["name", "kind", "header_offset", "data_offset"].index(field)] = value
    listed = ListedMembers(decode(json.dumps(rows).encode()), read_at_of(data), len(data))
    with pytest.raises(ListingMismatch, match=said):
        listed.check(next(iter(listed)))


@pytest.mark.parametrize(
    "bad",
    [
        b"not json",
        b"{}",
        b'[["a","file",0,512,1,1,0,""]]',  # a field short
        b'[["a","file",-1,512,1,1,0,"",null,[]]]',  # a negative offset
        b'[["a","file",true,512,1,1,0,"",null,[]]]',  # a bool is no offset
        b'[["a","fifo",0,512,1,1,0,"",null,[]]]',  # no such kind
        b'[["a","file",0,512,1,1,0,"",["pax9.9",0,0,[]],[]]]',  # no such sparse dialect
        b'[["a","file",0,512,1,1,0,"",["pax0.1",0,0,[[1]]],[]]]',  # a payload without its size
        b'[["a","file",0,512,1,1,0,"",null,[1]]]',  # a warning that is no text
    ],
)
def test_a_damaged_list_is_refused(bad: bytes) -> None:
    with pytest.raises(BadListing):
        decode(bad)


def test_a_list_past_its_bound_is_not_written_nor_read(monkeypatch: pytest.MonkeyPatch) -> None:
    data = archive(*(file_member(f"file{i:04}", b"x") for i in range(200)))
    monkeypatch.setattr(listing, "MAX_LISTING", 4 * KiB)
    recorder = Recorder()
    for member in scan_members(read_at_of(data), len(data)):
        recorder.add(member)
    assert recorder.encode() is None
    with pytest.raises(BadListing, match="longer than 4096 bytes"):
        decode(b"[" + b" " * 4 * KiB + b"]")


def test_a_listed_archive_reads_no_header_but_those_of_what_it_opens() -> None:
    """The walk reads every header up to the image's; the list only the image's, and the 16 bytes that say
    the stream is not compressed."""
    image = b"\xeb\x63\x90" + bytes(509) + b"disk" * 8192
    data = archive(
        *(file_member(f"notes/{i}.txt", bytes(64 * KiB)) for i in range(20)), file_member("disk.img", image)
    )
    reads: list[int] = []

    def read_at(offset: int, size: int) -> bytes:
        reads.append(offset)
        return data[offset : offset + size]

    listed = ListedMembers(decode(recorded(data)), read_at, len(data))
    opened = open_image(read_at, len(data), None, listed=listed)
    assert opened.mapper.read(0, len(image)) == image
    start = opened.member.header_offset
    assert sorted(set(reads)) == [0, *sorted({o for o in reads if o >= start})]
    reads.clear()
    walked = open_image(read_at, len(data))
    assert walked.member == opened.member
    assert len([o for o in reads if 0 < o < start]) == 19  # the walk: every header before it, past the first


def test_a_listed_multi_disk_archive_opens_every_disk() -> None:
    disks = [b"\xeb\x63\x90" + bytes(509) + bytes([i]) * 8192 for i in range(3)]
    data = archive(
        file_member("vm.ovf", b"<Envelope/>"), *(file_member(f"disk{i}.vmdk", d) for i, d in enumerate(disks))
    )
    listed = ListedMembers(decode(recorded(data)), read_at_of(data), len(data))
    images = list_images(read_at_of(data), len(data), listed=listed)
    walked = list_images(read_at_of(data), len(data))
    assert [i.member for i in images] == [i.member for i in walked]


def test_the_longest_list_parses_within_a_bound_of_memory() -> None:
    """Someone else's input: a list of MAX_LISTING bytes of short rows, the most objects a list can make,
    costs at most 32 MiB at its peak while it is parsed (a mount may take 256 MiB in all)."""
    rows = []
    length = 2
    while length < listing.MAX_LISTING - 100:
        row = json.dumps([f"f{len(rows)}", "file", 0, 512, 1, 1, 0, "", None, []], separators=(",", ":"))
        rows.append(row)
        length += len(row) + 1
    data = ("[" + ",".join(rows) + "]").encode()
    del rows
    tracemalloc.start()
    try:
        members = decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(members) > 40_000
    assert peak < 32 << 20, peak
