"""Walk a tar archive's headers and merge GNU L/K, PAX x/g and old GNU sparse headers into Members.

All I/O goes through a `read_at(offset, size)` callable, so the walk runs the same over a plain file, a
decompressed stream or a URL. Member data is never read, except the payloads that carry metadata (L/K/x/g)
and the `isextended` chain of old GNU sparse headers, each within a bound (MAX_* below). Sparse maps are
decoded later, by sparse.py, and only for the member that is served.
"""

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from tarfuse.errors import BadHeader, CorruptSparseMap, TruncatedArchive
from tarfuse.tar import header as th

# (offset, size) -> bytes, short only at the end of the source. Every positional read in the package takes
# this order; only the calls to os.pread itself keep the OS's (size, offset).
ReadAt = Callable[[int, int], bytes]
MemberKind = Literal["file", "hardlink", "symlink", "other"]  # "other": directories, devices, FIFOs, ...
SparseVariant = Literal["oldgnu", "pax0.0", "pax0.1", "pax1.0"]

# Bounds on what is read whole, or kept, for metadata. A header can claim any size up to 2**88, and a
# compressed archive is no check: 512 MiB of one repeated byte is 16 KB of zstd. Each bound is far above
# what real tools write, and an archive past one is refused with the bound in the message.
MAX_LONG_NAME_SIZE = 1 << 20  # a GNU 'L'/'K' payload. Linux paths end at PATH_MAX (4 KiB), and GNU tar
# cannot extract a longer name; libarchive ("Special header too large") and Go's archive/tar refuse more.
MAX_PAX_SIZE = 8 << 20  # the 'x' payloads of one member together, and each 'g' payload. Real ones hold
# paths, times, xattrs (Linux: at most 64 KiB a value) and GNU tar's PAX 0.0/0.1 sparse maps (20-60 bytes
# an extent: 8 MiB is 140,000 extents or more); libarchive 3.6 and Go refuse any over 1 MiB.
MAX_SPARSE_ENTRIES = 1 << 21  # 2,097,152 map entries in any dialect: twice the million-extent map of the
# benchmarks (docs/benchmarks.md), 48 MiB as a SparseMap. GNU tar writes one entry per run of data.
_MAX_EXTENSION_BLOCKS = -(-(MAX_SPARSE_ENTRIES - th.OLD_GNU_SPARSE_ENTRIES) // th.EXTENSION_ENTRIES)
MAX_MTIME = (2**63 - 1) // 10**9  # seconds whose nanoseconds fit FUSE's signed 64-bit st_mtime_ns: 292 years

_WINDOW = 64 * 1024  # headers of small members sit close together: read them in one go
_NO_PAX: dict[str, str] = {}  # read only
_EXTENDED = frozenset((th.GNU_LONGNAME, th.GNU_LONGLINK, th.PAX_LOCAL, th.SOLARIS_PAX, th.PAX_GLOBAL))
# The PAX keywords the walk reads; the other records are dropped once parsed, so a header's memory ends
# with it (GNU.sparse.offset/numbytes and GNU.sparse.map are read again by sparse.py, for the served member).
_PAX_KEYS = frozenset(("path", "linkpath", "size", "mtime")) | {
    f"GNU.sparse.{key}"
    for key in ("name", "major", "minor", "realsize", "size", "map", "offset", "numblocks")
}
# Type flags whose size field is not data (hard link, symlink, character and block device, directory, FIFO).
# GNU tar 1.34 extracts no data for them: read_header sets a hard link's size to 0 ("links 0 size on tape",
# src/list.c), and the extractors of 2-6 read none, so the next header follows at once. (Its `tar -t` does
# skip the size of 2, 3, 4 and 6, and then loses the member after.) tarfile's _proc_builtin skips data only
# for regular and unknown types. bsdtar (header_common) agrees for a size in the header, but in an archive
# with PAX headers it reads data for a hard link, and for a PAX `size` record on any of them. '7'
# (contiguous) is a regular file, and a GNU 'D' (directory dump) carries its list of names as data: all
# three skip that, and so does the walk, as for every other type.
_NO_DATA = frozenset(b"123456")
_PAX_TIME = re.compile(r"(-?)([0-9]+)(?:\.[0-9]*)?")  # "-12.75"; [0-9], not \d, which takes other digits


@dataclass(frozen=True, slots=True)
class SparseSpec:
    """Where a member's sparse map is and in which dialect, before it is decoded.

    `variant` is "oldgnu", "pax0.0", "pax0.1" or "pax1.0". Old GNU keeps the map in the header block at
    `header_offset` and `extension_blocks` blocks after it; PAX 0.0/0.1 keep it in the records of the 'x'
    payloads at `pax_payloads` (offset, size each), which sparse.py reads again for the member it serves
    rather than every member keeping them; PAX 1.0 keeps it at the start of the member's data area.
    """

    variant: SparseVariant
    header_offset: int
    extension_blocks: int = 0
    pax_payloads: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Member:
    """One archive entry, with every extended header applied."""

    name: str
    kind: MemberKind
    header_offset: int  # first header block of the entry, extended headers included
    data_offset: int  # first byte of data in the archive
    stored_size: int  # bytes of data in the archive (a PAX 1.0 sparse map included)
    real_size: int  # size of the extracted file
    mtime: int  # whole seconds, within ±MAX_MTIME
    linkname: str = ""
    sparse: SparseSpec | None = None
    # What was wrong with metadata that does not change the bytes served (an mtime that is not a number,
    # or out of range), and what is served instead: one line each, for the CLI to log once.
    warnings: tuple[str, ...] = ()


def normalize_name(name: str) -> str:
    """Compare member names as tar -x would place them: no leading "/" or "./"."""
    while name.startswith(("./", "/")):
        name = name[2:] if name.startswith("./") else name[1:]
    return name.rstrip("/")


class _HeaderReader:
    """Read header blocks through a small window, and extended headers' payloads whole, never past the
    archive end: the walk's only reader (member data is not read here)."""

    def __init__(self, read_at: ReadAt, archive_size: int) -> None:
        self._read_at = read_at
        self.archive_size = archive_size
        self._window_offset = 0
        self._window = b""

    def block(self, offset: int) -> bytes:
        """The block at `offset`; b"" if the data ends at or before it (a stream of unknown size ended)."""
        start = offset - self._window_offset
        if start < 0 or start + th.BLOCK_SIZE > len(self._window):
            self._window_offset = offset
            self._window = _read_upto(self._read_at, offset, min(_WINDOW, self.archive_size - offset))
            start = 0
            if 0 < len(self._window) < th.BLOCK_SIZE:  # the file shrank, or a stream of unknown size ended
                raise TruncatedArchive("archive ends in the middle of a header block", offset)
        return self._window[start : start + th.BLOCK_SIZE]

    def read(self, offset: int, size: int) -> bytes | bytearray:
        """Read a metadata payload whole, in one buffer even when the reads come back short."""
        if offset + size > self.archive_size:
            raise TruncatedArchive(
                f"archive ends at {self.archive_size}, before the {size} bytes that should be here",
                offset,
            )
        data = self._read_at(offset, size)
        if len(data) == size:
            return data
        payload = bytearray(size)  # filled in place: a list of parts and their join would hold it twice
        with memoryview(payload) as view:
            done = len(data)
            view[:done] = data
            while done < size:
                if not (chunk := self._read_at(offset + done, size - done)):
                    raise TruncatedArchive(f"archive file ends before the {size} bytes expected here", offset)
                view[done : done + len(chunk)] = chunk
                done += len(chunk)
        return payload


def _read_upto(read_at: ReadAt, offset: int, size: int) -> bytes:
    """Read `size` bytes, fewer only at the end of the data (a decompressed stream's size may be unknown)."""
    parts = []
    done = 0
    while done < size and (chunk := read_at(offset + done, size - done)):
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def read_exact(read_at: ReadAt, offset: int, size: int) -> bytes:
    """Read exactly `size` bytes: loop on short reads, and call an early end of file a truncation."""
    data = read_at(offset, size)
    if len(data) == size:
        return data
    parts = [data]
    done = len(data)
    while done < size:
        chunk = read_at(offset + done, size - done)
        if not chunk:
            raise TruncatedArchive(f"archive file ends before the {size} bytes expected here", offset)
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def _padded(size: int) -> int:
    return -(-size // th.BLOCK_SIZE) * th.BLOCK_SIZE


@dataclass
class _Pending:
    """Extended headers seen so far that apply to the next real header."""

    start: int
    long_name: str | None = None
    long_link: str | None = None
    pax: dict[str, str] | None = None  # the records in _PAX_KEYS, the last of each keyword
    pax_payloads: tuple[tuple[int, int], ...] = ()  # (offset, size) of each 'x' payload
    pax_size: int = 0  # their sizes added up, against MAX_PAX_SIZE


def scan_members(read_at: ReadAt, archive_size: int, start: int = 0) -> Iterator[Member]:
    """Yield every member of the archive, in order, from the entry whose headers begin at `start`; raise
    ArchiveError on anything malformed."""
    reader = _HeaderReader(read_at, archive_size)
    global_pax: dict[str, str] = {}
    offset = start
    pending = _Pending(start=start)
    ignored: tuple[Member, int] | None = None  # the member before, if its size field was not data
    previous: Member | None = None  # the last thing walked over, if a member: its data was not read
    read_end = 0  # where the last bytes that were read end: the archive goes on at least that far
    while True:
        if archive_size - offset < th.BLOCK_SIZE:
            _check_clean_end(offset, archive_size, pending)
            return
        block = reader.block(offset)
        if not block:  # `archive_size` was an upper bound (a stream of unknown size): the data ended
            _check_stream_end(read_at, offset, previous, read_end, pending)
            return
        if block == th.ZERO_BLOCK:  # end-of-archive marker (GNU tar stops at the first one too)
            _check_clean_end(offset, offset, pending)
            return
        header = _parse_header(block, offset, ignored)
        data_offset = offset + th.BLOCK_SIZE
        if header.typeflag in _EXTENDED:
            _take_extended(reader, header, offset, pending, global_pax)
            previous, read_end = None, data_offset + header.size
            offset = data_offset + _padded(header.size)
            continue
        extension_blocks = _count_extension_blocks(reader, header, offset)
        data_offset += extension_blocks * th.BLOCK_SIZE
        member = _make_member(header, offset, data_offset, extension_blocks, pending, global_pax)
        if member.data_offset + member.stored_size > archive_size:
            raise TruncatedArchive(
                f"member {member.name!r} needs {member.stored_size} bytes of data but the archive "
                f"ends at {archive_size}",
                member.header_offset,
            )
        yield member
        ignored = None
        if header.typeflag in _NO_DATA and (claimed := _claimed_size(header, pending, global_pax, offset)):
            ignored = (member, claimed)
        previous, read_end = member, data_offset
        offset = data_offset + _padded(member.stored_size)
        pending = _Pending(start=offset)


def _check_stream_end(
    read_at: ReadAt, offset: int, previous: Member | None, read_end: int, pending: _Pending
) -> None:
    """Where data of unknown size ended, found at the header expected at `offset`: say it as for a file.

    Either the data ends right there (a tar without end-of-archive blocks, as _check_clean_end decides), or
    before it, in bytes the walk skipped: the data of the member before, or the padding after it.
    """
    if offset == 0 or read_at(offset - 1, 1):
        _check_clean_end(offset, offset, pending)
        return
    if previous is not None:
        data_end = previous.data_offset + previous.stored_size
        if previous.stored_size and not read_at(data_end - 1, 1):
            raise TruncatedArchive(
                f"member {previous.name[:200]!r} needs {previous.stored_size} bytes of data but the archive "
                "ends before them",
                previous.header_offset,
            )
        read_end = data_end
    what = "a member's data" if previous is not None else "an extended header"
    raise TruncatedArchive(f"archive ends inside the padding after {what}", read_end)


def _claimed_size(header: th.Header, pending: _Pending, global_pax: dict[str, str], offset: int) -> int:
    """The size that the header, or a PAX record, gives a member (which may not be its data size)."""
    pax = pending.pax if pending.pax and "size" in pending.pax else global_pax
    return _pax_int(pax, "size", header.size, offset)


def _parse_header(block: bytes, offset: int, ignored: tuple[Member, int] | None) -> th.Header:
    """parse_header, saying so when the header before had a size that the walk did not take as data."""
    try:
        return th.parse_header(block, offset)
    except BadHeader as exc:
        if ignored is None:
            raise
        member, size = ignored
        raise BadHeader(
            f"{exc.reason}, after {member.name[:200]!r}, whose size of {size} bytes GNU tar does not read "
            "as data for its type (bsdtar may, in an archive with PAX headers)",
            offset,
        ) from None


def _check_clean_end(offset: int, archive_size: int, pending: _Pending) -> None:
    if offset > archive_size:
        raise TruncatedArchive("archive ends inside the padding after a member's data", archive_size)
    if offset != archive_size:
        raise TruncatedArchive("archive ends in the middle of a header block", offset)
    if pending.long_name is not None or pending.long_link is not None or pending.pax is not None:
        raise TruncatedArchive("archive ends after an extended header, before its member", offset)


def _take_extended(
    reader: _HeaderReader, header: th.Header, offset: int, pending: _Pending, global_pax: dict[str, str]
) -> None:
    """Read an L/K/x/g payload, within its bound, and record it for the member that follows."""
    flag = header.typeflag
    data_offset = offset + th.BLOCK_SIZE
    payload = reader.read(data_offset, _payload_size(header, offset, pending))
    if flag == th.GNU_LONGNAME:
        pending.long_name = th.decode_name(payload)
    elif flag == th.GNU_LONGLINK:
        pending.long_link = th.decode_name(payload)
    elif flag == th.PAX_GLOBAL:
        records = th.parse_pax_records(payload, data_offset)
        if any(key.startswith("GNU.sparse.") for key, _ in records):  # tarfile ignores them, GNU tar not
            raise BadHeader("GNU.sparse.* records in a global PAX header", data_offset)
        global_pax.update((key, value) for key, value in records if key in _PAX_KEYS)
    else:
        records = th.parse_pax_records(payload, data_offset)
        pending.pax = pending.pax if pending.pax is not None else {}
        pending.pax.update((key, value) for key, value in records if key in _PAX_KEYS)
        pending.pax_payloads += ((data_offset, header.size),)
        pending.pax_size += header.size


def _payload_size(header: th.Header, offset: int, pending: _Pending) -> int:
    """The size of an extended header's payload; refuse one past its bound before reading it."""
    size, together = header.size, ""
    if header.typeflag in (th.GNU_LONGNAME, th.GNU_LONGLINK):
        what, limit = f"GNU long name ('{chr(header.typeflag)}')", MAX_LONG_NAME_SIZE
    elif header.typeflag == th.PAX_GLOBAL:
        what, limit = "global PAX header", MAX_PAX_SIZE
    elif pending.pax_size:  # several 'x' headers before one member add up
        what, limit, together = "PAX extended headers", MAX_PAX_SIZE, " together"
        size += pending.pax_size
    else:
        what, limit = "PAX extended header", MAX_PAX_SIZE
    if size > limit:
        raise BadHeader(
            f"{what}: {size} bytes{together}, past tarfuse's limit of {limit} bytes ({limit >> 20} MiB)",
            offset,
        )
    return header.size


def _count_extension_blocks(reader: _HeaderReader, header: th.Header, offset: int) -> int:
    """Follow an old GNU sparse header's `isextended` chain; return how many blocks it has.

    Like GNU tar, go on only while the map fills every slot: a map that ends early ends the chain.
    """
    count = 0
    extended = header.is_extended and len(header.sparse_entries) == th.OLD_GNU_SPARSE_ENTRIES
    while extended:
        if count == _MAX_EXTENSION_BLOCKS:
            raise CorruptSparseMap(
                f"old GNU sparse map goes on past {_MAX_EXTENSION_BLOCKS} extension blocks: tarfuse reads "
                f"at most {MAX_SPARSE_ENTRIES} map entries",
                offset,
            )
        count += 1
        block_offset = offset + count * th.BLOCK_SIZE
        if reader.archive_size - block_offset < th.BLOCK_SIZE:
            raise TruncatedArchive("archive ends inside a sparse extension block", block_offset)
        if not (block := reader.block(block_offset)):
            raise TruncatedArchive("archive ends inside a sparse extension block", block_offset)
        extended = block[504] != 0 and th.sparse_slots_full(block, th.EXTENSION_ENTRIES)
    return count


def _make_member(
    header: th.Header,
    offset: int,
    data_offset: int,
    extension_blocks: int,
    pending: _Pending,
    global_pax: dict[str, str],
) -> Member:
    if global_pax or pending.pax:
        pax = dict(global_pax)
        pax.update(pending.pax or ())
    else:
        pax = _NO_PAX  # most members have no PAX records: skip the copy
    name, linkname = _names(header, pending, pax, offset)
    stored_size = _pax_int(pax, "size", header.size, offset)
    if header.typeflag in _NO_DATA:  # see _NO_DATA: the size is not skipped, whatever it says
        stored_size = 0
    sparse, real_size = _sparse_spec(header, pax, pending, offset, extension_blocks)
    mtime, warnings = _mtime(header.mtime, pax.get("mtime"), name, offset)
    return Member(
        name=name,
        kind=_kind(header.typeflag, name),
        header_offset=pending.start,
        data_offset=data_offset,
        stored_size=stored_size,
        real_size=stored_size if real_size is None else real_size,
        mtime=mtime,
        linkname=linkname,
        sparse=sparse,
        warnings=warnings,
    )


def _sparse_spec(
    header: th.Header, pax: dict[str, str], pending: _Pending, offset: int, extension_blocks: int
) -> tuple[SparseSpec | None, int | None]:
    """Where the member's sparse map is, and its real size; (None, None) for a member that is not sparse."""
    if header.typeflag == th.GNU_SPARSE and header.is_gnu:
        return SparseSpec("oldgnu", offset, extension_blocks=extension_blocks), header.real_size
    if (variant := _pax_sparse_variant(pax, offset)) is not None:
        if not header.is_ustar:  # GNU tar reads PAX sparse records only with POSIX magic, tarfile always
            raise BadHeader(f"PAX sparse records for a header without POSIX magic ({variant})", offset)
        real_size = _pax_int(pax, "GNU.sparse.realsize", 0, offset) or _pax_int(
            pax, "GNU.sparse.size", 0, offset
        )
        return SparseSpec(variant, pending.start, pax_payloads=pending.pax_payloads), real_size
    if "GNU.sparse.size" in pax or "GNU.sparse.realsize" in pax:
        # GNU tar takes either as the size of the data to extract, sparse member or not; tarfile ignores them
        raise BadHeader("GNU.sparse.size or GNU.sparse.realsize for a member without a sparse map", offset)
    return None, None


def _names(header: th.Header, pending: _Pending, pax: dict[str, str], offset: int) -> tuple[str, str]:
    """The member's name and link target; GNU.sparse.name wins over path, sparse member or not (GNU tar)."""
    name = pending.long_name if pending.long_name is not None else header.name
    name = pax.get("GNU.sparse.name", pax.get("path", name))
    linkname = pax.get("linkpath", pending.long_link or header.linkname)
    if "\0" in name or "\0" in linkname:  # only a PAX value can hold one; GNU tar would cut the name there
        raise BadHeader(f"member name {name[:200]!r} has a NUL byte", offset)
    return name, linkname


def _kind(typeflag: int, name: str) -> MemberKind:
    if typeflag in th.REGULAR_TYPES:
        # "BSD tar uses the convention that a slash suffix means a directory" (GNU tar, extract.c)
        return "other" if name.endswith("/") else "file"
    if typeflag == th.GNU_SPARSE:
        return "file"
    if typeflag == th.HARDLINK:
        return "hardlink"
    if typeflag == th.SYMLINK:
        return "symlink"
    return "other"


def _pax_sparse_variant(pax: dict[str, str], offset: int) -> SparseVariant | None:
    """Name the PAX sparse dialect (GNU tar manual, "Storing Sparse Files"), or None."""
    if "GNU.sparse.major" in pax:  # GNU tar reads a map from the data for any major > 0, 0.x records or not
        if pax["GNU.sparse.major"] == "1" and pax.get("GNU.sparse.minor") == "0":
            return "pax1.0"
        raise BadHeader(
            f"unknown PAX sparse format {pax['GNU.sparse.major']}.{pax.get('GNU.sparse.minor')}",
            offset,
        )
    if "GNU.sparse.map" in pax:
        return "pax0.1"
    if "GNU.sparse.offset" in pax or "GNU.sparse.numblocks" in pax:
        return "pax0.0"
    return None


def _pax_int(pax: dict[str, str], key: str, default: int, offset: int) -> int:
    value = pax.get(key)
    return default if value is None else _pax_decimal(key, value, offset)


def _pax_decimal(key: str, value: str, offset: int) -> int:
    try:
        return th.parse_decimal(value)
    except BadHeader as exc:
        raise BadHeader(f"PAX {key}: {exc.reason}", offset) from None


def _mtime(
    header_mtime: int | None, pax_mtime: str | None, name: str, offset: int
) -> tuple[int, tuple[str, ...]]:
    """The mtime to serve, in whole seconds, and a warning if the archive's could not be used.

    An mtime does not change the bytes served, so one that is not a number, or that FUSE cannot carry,
    does not refuse the image: a bad PAX mtime falls back to the header's, a bad header mtime to 0, with
    one warning. GNU tar does the same for a PAX mtime it cannot read ("Malformed extended header: invalid
    mtime=--1") or that is out of range, though it reads "999xxx9324" as 999, and uses -1 for a bad header
    field; bsdtar and tarfile use 0 for a PAX mtime they cannot parse.
    """
    header_seconds = _usable(header_mtime)
    if pax_mtime is None:
        if header_seconds is not None:
            return header_seconds, ()
        problem = f"the header's mtime is {_why(header_mtime)}"
    else:
        pax_seconds = _pax_seconds(pax_mtime)
        if (usable := _usable(pax_seconds)) is not None:
            return usable, ()
        problem = f"PAX mtime={pax_mtime[:40]!r} is {_why(pax_seconds)}"
        if header_seconds is not None:
            return header_seconds, (_warning(name, offset, problem, f"the header's mtime {header_seconds}"),)
    return 0, (_warning(name, offset, problem, "0 (1970-01-01)"),)


def _pax_seconds(value: str) -> int | None:
    """Whole seconds of a PAX time: decimal, maybe fractional and negative ("-12.75" is -12); None if not."""
    if (match := _PAX_TIME.fullmatch(value)) is None:
        return None
    seconds = int(match[2].lstrip("0")[:21] or "0")  # 21 digits are out of range already; int() refuses 4300
    return -seconds if match[1] else seconds


def _usable(seconds: int | None) -> int | None:
    return seconds if seconds is not None and -MAX_MTIME <= seconds <= MAX_MTIME else None


def _why(seconds: int | None) -> str:
    return "not a number" if seconds is None else f"out of range (more than {MAX_MTIME} s from 1970)"


def _warning(name: str, offset: int, problem: str, used: str) -> str:
    return f"member {name[:200]!r}: {problem}; serving {used} as its mtime, at archive offset {offset}"
