"""Walk a tar archive's headers and merge GNU L/K, PAX x/g and old GNU sparse headers into Members.

All I/O goes through a `pread(size, offset)` callable, so the walk runs the same over a plain file or, later,
a decompressed view. Member data is never read, except the payloads that carry metadata (L/K/x/g) and the
`isextended` chain of old GNU sparse headers. Sparse maps are decoded later, by sparse.py, and only for the
member that is served. Must not import pyfuse3 or trio.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tarfuse import tarheader as th
from tarfuse.errors import BadHeader, TruncatedArchive

Pread = Callable[[int, int], bytes]  # (size, offset) -> bytes, like os.pread without the fd

_WINDOW = 64 * 1024  # headers of small members sit close together: read them in one go
_DIRECTORY = ord("5")
_NO_PAX: dict[str, str] = {}  # read only


@dataclass(frozen=True, slots=True)
class SparseSpec:
    """Where a member's sparse map is and in which dialect, before it is decoded.

    `variant` is "oldgnu", "pax0.0", "pax0.1" or "pax1.0". Old GNU keeps the map in the header block at
    `header_offset` and `extension_blocks` blocks after it; PAX 0.0/0.1 keep it in `pax_records`; PAX 1.0
    keeps it at the start of the member's data area.
    """

    variant: str
    header_offset: int
    extension_blocks: int = 0
    pax_records: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Member:
    """One archive entry, with every extended header applied."""

    name: str
    kind: str  # "file", "hardlink" or "other" (directories, symlinks, devices, ...)
    header_offset: int  # first header block of the entry, extended headers included
    data_offset: int  # first byte of data in the archive
    stored_size: int  # bytes of data in the archive (a PAX 1.0 sparse map included)
    real_size: int  # size of the extracted file
    mtime: int
    linkname: str = ""
    sparse: SparseSpec | None = None


def normalize_name(name: str) -> str:
    """Compare member names as tar -x would place them: no leading "/" or "./"."""
    while name.startswith(("./", "/")):
        name = name[2:] if name.startswith("./") else name[1:]
    return name.rstrip("/")


class _BlockReader:
    """Read header blocks through a small window, and payloads exactly, never past the archive end."""

    def __init__(self, pread: Pread, archive_size: int) -> None:
        self._pread = pread
        self.archive_size = archive_size
        self._window_offset = 0
        self._window = b""

    def block(self, offset: int) -> bytes:
        start = offset - self._window_offset
        if start < 0 or start + th.BLOCK_SIZE > len(self._window):
            self._window_offset = offset
            self._window = _read_upto(self._pread, min(_WINDOW, self.archive_size - offset), offset)
            start = 0
            if len(self._window) < th.BLOCK_SIZE:  # the file shrank, or a stream of unknown size ended
                raise TruncatedArchive("archive ends in the middle of a header block", offset)
        return self._window[start : start + th.BLOCK_SIZE]

    def read(self, size: int, offset: int) -> bytes:
        if offset + size > self.archive_size:
            raise TruncatedArchive(
                f"archive ends at {self.archive_size}, before the {size} bytes that should be here",
                offset,
            )
        return read_exact(self._pread, size, offset)


def _read_upto(pread: Pread, size: int, offset: int) -> bytes:
    """Read `size` bytes, fewer only at the end of the data (a decompressed stream's size may be unknown)."""
    parts = []
    done = 0
    while done < size and (chunk := pread(size - done, offset + done)):
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def read_exact(pread: Pread, size: int, offset: int) -> bytes:
    """Read exactly `size` bytes: loop on short reads, and call an early end of file a truncation."""
    data = pread(size, offset)
    if len(data) == size:
        return data
    parts = [data]
    done = len(data)
    while done < size:
        chunk = pread(size - done, offset + done)
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
    pax: list[tuple[str, str]] | None = None


def scan_members(pread: Pread, archive_size: int) -> Iterator[Member]:
    """Yield every member of the archive, in order; raise ArchiveError on anything malformed."""
    reader = _BlockReader(pread, archive_size)
    global_pax: dict[str, str] = {}
    offset = 0
    pending = _Pending(start=0)
    while True:
        if archive_size - offset < th.BLOCK_SIZE:
            _check_clean_end(offset, archive_size, pending)
            return
        block = reader.block(offset)
        if block == th.ZERO_BLOCK:  # end-of-archive marker (GNU tar stops at the first one too)
            _check_clean_end(offset, offset, pending)
            return
        header = th.parse_header(block, offset)
        data_offset = offset + th.BLOCK_SIZE
        flag = header.typeflag
        if flag in (th.GNU_LONGNAME, th.GNU_LONGLINK, th.PAX_LOCAL, th.SOLARIS_PAX, th.PAX_GLOBAL):
            payload = reader.read(header.size, data_offset)
            _take_extended(flag, payload, data_offset, pending, global_pax)
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
        offset = data_offset + _padded(member.stored_size)
        pending = _Pending(start=offset)


def _check_clean_end(offset: int, archive_size: int, pending: _Pending) -> None:
    if offset > archive_size:
        raise TruncatedArchive("archive ends inside the padding after a member's data", archive_size)
    if offset != archive_size:
        raise TruncatedArchive("archive ends in the middle of a header block", offset)
    if pending.long_name is not None or pending.long_link is not None or pending.pax is not None:
        raise TruncatedArchive("archive ends after an extended header, before its member", offset)


def _take_extended(
    flag: int, payload: bytes, offset: int, pending: _Pending, global_pax: dict[str, str]
) -> None:
    """Record an L/K/x/g payload for the member that follows."""
    if flag == th.GNU_LONGNAME:
        pending.long_name = th.decode_name(payload)
    elif flag == th.GNU_LONGLINK:
        pending.long_link = th.decode_name(payload)
    elif flag == th.PAX_GLOBAL:
        records = th.parse_pax_records(payload, offset)
        if any(key.startswith("GNU.sparse.") for key, _ in records):  # tarfile ignores them, GNU tar not
            raise BadHeader("GNU.sparse.* records in a global PAX header", offset)
        global_pax.update(records)
    else:
        pending.pax = (pending.pax or []) + th.parse_pax_records(payload, offset)


def _count_extension_blocks(reader: _BlockReader, header: th.Header, offset: int) -> int:
    """Follow an old GNU sparse header's `isextended` chain; return how many blocks it has.

    Like GNU tar, go on only while the map fills every slot: a map that ends early ends the chain.
    """
    count = 0
    extended = header.is_extended and len(header.sparse_entries) == th.OLD_GNU_SPARSE_ENTRIES
    while extended:
        count += 1
        block_offset = offset + count * th.BLOCK_SIZE
        if reader.archive_size - block_offset < th.BLOCK_SIZE:
            raise TruncatedArchive("archive ends inside a sparse extension block", block_offset)
        block = reader.block(block_offset)
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
        pax.update(pending.pax or [])
    else:
        pax = _NO_PAX  # most members have no PAX records: skip the copy
    name, linkname = _names(header, pending, pax, offset)
    stored_size = _pax_int(pax, "size", header.size, offset)
    sparse, real_size = _sparse_spec(header, pax, pending, offset, extension_blocks)
    return Member(
        name=name,
        kind=_kind(header.typeflag, name),
        header_offset=pending.start,
        data_offset=data_offset,
        stored_size=0 if header.typeflag == _DIRECTORY else stored_size,
        real_size=stored_size if real_size is None else real_size,
        mtime=_pax_mtime(pax, header.mtime, offset),
        linkname=linkname,
        sparse=sparse,
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
        return SparseSpec(variant, pending.start, pax_records=tuple(pending.pax or ())), real_size
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


def _kind(typeflag: int, name: str) -> str:
    if typeflag in th.REGULAR_TYPES:
        # "BSD tar uses the convention that a slash suffix means a directory" (GNU tar, extract.c)
        return "other" if name.endswith("/") else "file"
    if typeflag == th.GNU_SPARSE:
        return "file"
    if typeflag == th.HARDLINK:
        return "hardlink"
    return "other"


def _pax_sparse_variant(pax: dict[str, str], offset: int) -> str | None:
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


def _pax_mtime(pax: dict[str, str], default: int, offset: int) -> int:
    """PAX mtime is decimal seconds, possibly fractional and negative ("-12.5")."""
    value = pax.get("mtime")
    if value is None:
        return default
    whole, _, fraction = value.partition(".")
    if fraction and not (fraction.isascii() and fraction.isdigit()):
        raise BadHeader(f"PAX mtime={value[:40]!r} is not a number", offset)
    seconds = _pax_decimal("mtime", whole.removeprefix("-"), offset)
    return -seconds if whole.startswith("-") else seconds
