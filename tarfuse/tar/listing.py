"""A tar's member list, written down once and read back by every host that mounts the archive.

Over a remote compressed archive, every header the walk reads costs requests: the window of the seek point
before it, and the compressed bytes from there. A published index (sources/index.py) made by the indexing
pass carries the members the pass walked over, so a mount finds its image, or every disk of an OVA, without
reading one header it does not serve. The list is someone else's input: parsed within bounds into the
Members the walk would have made, and each member whose data a mount reads is first compared with the
entry the archive holds at its header offset (ListedMembers.check), which is read anyway with the data
after it. A list that does not match is dropped and the mount walks the headers, as without one.

Sparse maps are not in the list, only where each is (SparseSpec): sparse.py decodes the served member's
map from beside its header, where the check has just read.
"""

import json
from collections.abc import Iterator
from typing import Any, cast, get_args

from tarfuse.errors import ArchiveError
from tarfuse.tar.archive import MAX_MTIME, Member, MemberKind, ReadAt, SparseSpec, SparseVariant, scan_members
from tarfuse.tar.files import MAX_MEMBERS

# The longest list written or read: members of a VM archive are a handful, and tens of thousands fit. Parsed,
# the longest costs a few tens of MiB while the mount is put together, well within its memory ceiling
# (tests/tar/test_listing.py asserts the bound); a longer list is not written, and mounts walk the headers.
MAX_LISTING = 2 << 20
_KINDS = frozenset(get_args(MemberKind))
_VARIANTS = frozenset(get_args(SparseVariant))


class BadListing(Exception):
    """A member list that cannot be used: damaged, past a bound, or not the archive's (the message says)."""


class Recorder:
    """The members of a walk, written down as they come, within MAX_LISTING (past it, none: `encode` is
    None, and mounts walk the headers as they always did)."""

    def __init__(self) -> None:
        self._rows: list[str] | None = []
        self._length = 2

    def add(self, member: Member) -> None:
        if self._rows is None:
            return
        row = json.dumps(_row(member), separators=(",", ":"))
        self._length += len(row) + 1
        if self._length > MAX_LISTING:
            self._rows = None
            return
        self._rows.append(row)

    def encode(self) -> bytes | None:
        return None if self._rows is None else ("[" + ",".join(self._rows) + "]").encode()


def _row(member: Member) -> list[object]:
    spec = member.sparse
    sparse = None
    if spec is not None:
        sparse = [
            spec.variant,
            spec.header_offset,
            spec.extension_blocks,
            [list(p) for p in spec.pax_payloads],
        ]
    return [
        member.name,
        member.kind,
        member.header_offset,
        member.data_offset,
        member.stored_size,
        member.real_size,
        member.mtime,
        member.linkname,
        sparse,
        list(member.warnings),
    ]


def decode(data: bytes) -> list[Member]:
    """The members of a written list, in archive order; BadListing unless every field is of its type and
    within its bounds (whether they are the archive's is ListedMembers.check's question)."""
    if len(data) > MAX_LISTING:
        raise BadListing(f"its member list is longer than {MAX_LISTING} bytes")
    try:
        rows = json.loads(data)
        if not isinstance(rows, list) or len(rows) > MAX_MEMBERS:
            raise BadListing(f"its member list is not a list of at most {MAX_MEMBERS:,} members")
        return [_member(row) for row in rows]
    except (ValueError, TypeError) as exc:  # json's errors, and a row of the wrong shape
        raise BadListing(f"its member list is damaged ({exc.__class__.__name__})") from None


def _member(row: Any) -> Member:
    name, kind, header, data, stored, real, mtime, link, sparse, warnings = row
    if not (isinstance(name, str) and isinstance(link, str) and kind in _KINDS):
        raise TypeError
    if not all(_count(n) for n in (header, data, stored, real)) or not _int(mtime, -MAX_MTIME, MAX_MTIME):
        raise TypeError
    if not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
        raise TypeError
    return Member(
        name=name,
        kind=cast(MemberKind, kind),
        header_offset=header,
        data_offset=data,
        stored_size=stored,
        real_size=real,
        mtime=mtime,
        linkname=link,
        sparse=None if sparse is None else _spec(sparse),
        warnings=tuple(warnings),
    )


def _spec(row: Any) -> SparseSpec:
    variant, header, blocks, payloads = row
    if variant not in _VARIANTS or not (_count(header) and _count(blocks) and isinstance(payloads, list)):
        raise TypeError
    pairs = tuple((offset, size) for offset, size in payloads)
    if not all(_count(n) for pair in pairs for n in pair):
        raise TypeError
    return SparseSpec(cast(SparseVariant, variant), header, blocks, pairs)


def _count(value: object) -> bool:
    return _int(value, 0, 2**88)  # what a tar size field can say


def _int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


class ListingMismatch(Exception):
    """A listed member is not the entry the archive holds at its header offset: the list is not this
    archive's (or was made up), and the mount walks the headers instead."""


class ListedMembers:
    """A written member list, standing in for the walk of the headers (image.open), over the archive read
    through `read_at`: `check` each member before its data is read."""

    def __init__(self, members: list[Member], read_at: ReadAt, archive_size: int) -> None:
        self._members, self._read_at, self._size = members, read_at, archive_size
        self._checked: set[int] = set()

    def __iter__(self) -> Iterator[Member]:
        return iter(self._members)

    def check(self, member: Member) -> None:
        """Raise ListingMismatch unless the archive's entry at `member`'s header offset is `member`."""
        if member.header_offset in self._checked:
            return
        try:
            # as the walk reads it there; a global PAX header before it is not seen, so a member it
            # changed reads otherwise here than in the walk, and the list is dropped
            found = next(scan_members(self._read_at, self._size, member.header_offset), None)
        except ArchiveError as exc:
            raise ListingMismatch(f"no member where it lists {member.name[:200]!r} ({exc})") from None
        if found != member:
            raise ListingMismatch(
                f"it lists {member.name[:200]!r} at offset {member.header_offset}, where the archive holds "
                + ("nothing" if found is None else f"{found.name[:200]!r}, or other fields")
            )
        self._checked.add(member.header_offset)
