"""Build tar archives block by block, including broken ones that no real tar program writes.

The builders return bytes. Field offsets follow POSIX ustar and the GNU tar manual ("Basic Tar Format",
"Storing Sparse Files"); no builder uses tarfuse's parser, so the tests do not check it against itself.
`with_tarfile` builds the well-formed archives that stdlib tarfile writes; `open_bytes` serves an archive
held in memory.
"""

import io
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any

from tarfuse.image.open import Image, open_image
from tarfuse.tar.archive import ReadAt

BLOCK = 512
END = bytes(2 * BLOCK)  # end-of-archive marker: two zero blocks

USTAR = b"ustar\x0000"  # magic + version of POSIX ustar and pax
GNU = b"ustar  \x00"  # magic + version of GNU and old GNU
V7 = bytes(8)  # no magic at all

Extent = tuple[int, int]  # (offset in the image, length)


def _b(text: str | bytes) -> bytes:
    return text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text


def octal(value: int, width: int) -> bytes:
    """`value` as zero-padded octal digits and a NUL, as GNU tar writes numbers."""
    digits = b"%0*o" % (width - 1, value)
    if len(digits) != width - 1:
        raise ValueError(f"{value} needs more than {width - 1} octal digits")
    return digits + b"\0"


def base256(value: int, width: int) -> bytes:
    """GNU base-256: 0x80 then big-endian for a positive value, two's complement for a negative one."""
    if value < 0:
        raw = value.to_bytes(width, "big", signed=True)
        if raw[0] != 0xFF:
            raise ValueError(f"{value} does not fit {width} bytes of base-256")
        return raw
    return b"\x80" + value.to_bytes(width - 1, "big")


def number(value: int, width: int) -> bytes:
    """Octal where it fits, base-256 otherwise (what GNU tar does in the gnu format)."""
    if 0 <= value < 8 ** (width - 1):
        return octal(value, width)
    return base256(value, width)


def checksum(block: bytes | bytearray, *, signed: bool = False) -> int:
    """The header checksum, counting the checksum field as eight spaces; `signed` as old Sun tar did."""
    raw = block[:148] + b" " * 8 + block[156:BLOCK]
    if signed:
        return sum(b - 256 if b >= 0x80 else b for b in raw)
    return sum(raw)


def set_checksum(block: bytes | bytearray, *, signed: bool = False, value: int | None = None) -> bytes:
    """Write the checksum field ("%06o\\0 " like GNU tar); `value` forces a chosen (wrong) one."""
    out = bytearray(block)
    if value is None:
        value = checksum(out, signed=signed)
    out[148:156] = b"%06o\0 " % value if value >= 0 else b"-%05o\0 " % -value
    return bytes(out)


def header(
    name: str | bytes = "file",
    *,
    size: int = 0,
    typeflag: bytes = b"0",
    mtime: int = 1_700_000_000,
    mode: int = 0o644,
    linkname: str | bytes = "",
    magic: bytes = USTAR,
    prefix: str | bytes = "",
    fields: dict[int, bytes] | None = None,
    signed: bool = False,
    chksum: int | None = None,
) -> bytes:
    """One header block. `fields` overwrites raw bytes at given offsets before the checksum is set."""
    block = bytearray(BLOCK)

    def put(offset: int, value: bytes, width: int) -> None:
        if len(value) > width:
            raise ValueError(f"{value!r} is longer than the {width}-byte field at {offset}")
        block[offset : offset + len(value)] = value

    put(0, _b(name), 100)
    put(100, octal(mode, 8), 8)
    put(108, octal(0, 8), 8)
    put(116, octal(0, 8), 8)
    put(124, number(size, 12), 12)
    put(136, number(mtime, 12), 12)
    put(156, typeflag, 1)
    put(157, _b(linkname), 100)
    put(257, magic, 8)
    put(345, _b(prefix), 155)
    for offset, value in (fields or {}).items():
        block[offset : offset + len(value)] = value
    return set_checksum(block, signed=signed, value=chksum)


def pad(data: bytes) -> bytes:
    """`data` padded with zeros to a whole number of blocks."""
    return data + bytes(-len(data) % BLOCK)


def file_member(name: str | bytes, data: bytes = b"", **header_fields: Any) -> bytes:
    """A regular file: header, then its data padded to a block."""
    return header(name, size=len(data), **header_fields) + pad(data)


def archive(*members: bytes, end: bool = True) -> bytes:
    """Members back to back, with the end-of-archive marker unless `end` is false."""
    return b"".join(members) + (END if end else b"")


def gnu_long(text: str | bytes, typeflag: bytes = b"L") -> bytes:
    """A GNU long name ('L') or long link ('K') header and its NUL-terminated payload."""
    payload = _b(text) + b"\0"
    return header("././@LongLink", size=len(payload), typeflag=typeflag, magic=GNU) + pad(payload)


def pax_record(key: str, value: str | bytes) -> bytes:
    """One "<length> key=value\\n" record; the length counts its own digits."""
    body = b" " + key.encode() + b"=" + _b(value) + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def pax_payload(records: Iterable[tuple[str, str | bytes]]) -> bytes:
    return b"".join(pax_record(key, value) for key, value in records)


def pax_header(
    records: Iterable[tuple[str, str | bytes]] | bytes,
    *,
    typeflag: bytes = b"x",
    name: str = "PaxHeaders/file",
    size: int | None = None,
) -> bytes:
    """A PAX extended header ('x', or 'g' for global); `records` may be a raw, possibly broken payload."""
    payload = records if isinstance(records, bytes) else pax_payload(records)
    declared = len(payload) if size is None else size
    return header(name, size=declared, typeflag=typeflag) + pad(payload)


def sparse_entries(extents: Sequence[Extent], slots: int) -> bytes:
    """`slots` old GNU (offset, numbytes) slots of 12 + 12 bytes; unused slots stay zero."""
    if all(0 <= n < 8**11 for extent in extents for n in extent):  # octal, quickly for big maps
        raw = b"".join([b"%011o\0%011o\0" % extent for extent in extents])
    else:
        raw = b"".join(number(offset, 12) + number(length, 12) for offset, length in extents)
    return raw + bytes(24 * slots - len(raw))


def old_gnu_sparse(
    name: str | bytes,
    extents: Sequence[Extent],
    real_size: int,
    data: bytes,
    *,
    stored_size: int | None = None,
    extension_flags: Sequence[bool] | None = None,
) -> bytes:
    """An old GNU type 'S' member: 4 slots in the header, then 21-slot extension blocks, then data.

    `data` is the extents' bytes packed back to back. `extension_flags` overrides the `isextended` flag of
    the header and of each extension block (to build broken chains).
    """
    head, rest = list(extents[:4]), list(extents[4:])
    chunks = [rest[i : i + 21] for i in range(0, len(rest), 21)]
    flags = list(extension_flags) if extension_flags is not None else [True] * len(chunks) + [False]
    size = len(data) if stored_size is None else stored_size
    fields = {
        386: sparse_entries(head, 4),
        482: b"\1" if flags[0] else b"\0",
        483: number(real_size, 12),
    }
    out = [header(name, size=size, typeflag=b"S", magic=GNU, fields=fields)]
    for i, chunk in enumerate(chunks):
        block = bytearray(sparse_entries(chunk, 21) + bytes(BLOCK - 21 * 24))
        block[504] = 1 if flags[i + 1] else 0
        out.append(bytes(block))
    out.append(pad(data))
    return b"".join(out)


def pax10_map(extents: Sequence[Extent]) -> bytes:
    """The PAX 1.0 map that precedes the data: count, then offset and size lines, padded to a block."""
    lines = [str(len(extents))] + [f"{n}" for extent in extents for n in extent]
    return pad(("\n".join(lines) + "\n").encode())


def pax10_sparse(
    name: str,
    extents: Sequence[Extent],
    real_size: int,
    data: bytes,
    *,
    map_bytes: bytes | None = None,
    extra: Sequence[tuple[str, str]] = (),
    stored_size: int | None = None,
) -> bytes:
    """A PAX 1.0 sparse member as GNU tar writes it (pseudo name in the header, real one in the PAX).

    `stored_size` claims that many bytes of data after the map, whatever `data` holds.
    """
    map_part = pax10_map(extents) if map_bytes is None else map_bytes
    body = map_part + data
    records = [
        ("GNU.sparse.major", "1"),
        ("GNU.sparse.minor", "0"),
        ("GNU.sparse.name", name),
        ("GNU.sparse.realsize", str(real_size)),
        *extra,
    ]
    pseudo = "GNUSparseFile.0/" + name.rsplit("/", 1)[-1]
    size = len(body) if stored_size is None else len(map_part) + stored_size
    return pax_header(records) + header(pseudo, size=size) + pad(body)


def pax0_sparse(
    name: str,
    extents: Sequence[Extent],
    real_size: int,
    data: bytes,
    *,
    version: str = "0.1",
    extra: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A PAX 0.0 (repeated offset/numbytes records) or 0.1 (one GNU.sparse.map) sparse member."""
    records = [("GNU.sparse.size", str(real_size)), ("GNU.sparse.numblocks", str(len(extents)))]
    if version == "0.1":
        records.append(("GNU.sparse.map", ",".join(f"{o},{n}" for o, n in extents)))
    else:
        for offset, length in extents:
            records += [("GNU.sparse.offset", str(offset)), ("GNU.sparse.numbytes", str(length))]
    return pax_header([*records, *extra]) + header(name, size=len(data)) + pad(data)


def read_at_of(data: bytes) -> ReadAt:
    """A `read_at(offset, size)` over bytes in memory, like os.pread on a file holding them."""

    def read_at(offset: int, size: int) -> bytes:
        return data[offset : offset + size]

    return read_at


def endless(head: bytes, unit: bytes, *, budget: int) -> ReadAt:
    """A `read_at` over `head`, then `unit` over and over: an archive of any size, made as it is read.

    Reading more than `budget` bytes in all fails the test with AssertionError, before the bytes are
    made: code that reads what it should refuse unread fails here, instead of exhausting memory or time.
    """
    done = 0

    def read_at(offset: int, size: int) -> bytes:
        nonlocal done
        done += size
        if done > budget:
            raise AssertionError(f"read {done} bytes in all, more than the {budget} this archive allows")
        out = head[offset : offset + size]
        start = max(offset, len(head)) - len(head)  # into the repeated part
        if (rest := size - len(out)) > 0:
            skip = start % len(unit)
            out += (unit * (-(-(skip + rest) // len(unit))))[skip : skip + rest]
        return out

    return read_at


def with_tarfile(*entries: tarfile.TarInfo | tuple[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An archive written by stdlib tarfile: (name, data) pairs are regular files, TarInfos go as they are."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def tarinfo(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    """A TarInfo without data: a directory, link, device or FIFO."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, linkname, 1_700_000_000
    return info


def open_bytes(data: bytes, wanted: str | None = None) -> Image:
    """open_image over an archive held in memory."""
    return open_image(read_at_of(data), len(data), wanted)


SPARSE_VARIANTS = ("oldgnu", "pax0.0", "pax0.1", "pax1.0")


def gnu_map(extents: Sequence[Extent], real_size: int) -> list[Extent]:
    """The map GNU tar writes: the extents, then (real_size, 0) if the file ends in a hole."""
    end = extents[-1][0] + extents[-1][1] if extents else 0
    return [*extents, (real_size, 0)] if end < real_size else list(extents)


def sparse_member(
    variant: str,
    name: str,
    extents: Sequence[Extent],
    real_size: int,
    data: bytes,
    *,
    end_entry: bool = True,
    stored_size: int | None = None,
) -> bytes:
    """A sparse member in one of the four GNU dialects, its map as GNU tar writes it.

    That is `extents`, then (real_size, 0) if the file ends in a hole, unless `end_entry` is false.
    `stored_size` (old GNU and PAX 1.0) claims that many bytes of data, whatever `data` holds.
    """
    entries = gnu_map(extents, real_size) if end_entry else list(extents)
    if variant == "oldgnu":
        return old_gnu_sparse(name, entries, real_size, data, stored_size=stored_size)
    if variant == "pax1.0":
        return pax10_sparse(name, entries, real_size, data, stored_size=stored_size)
    return pax0_sparse(name, entries, real_size, data, version=variant.removeprefix("pax"))
