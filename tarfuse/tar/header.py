"""Decode one 512-byte tar header block, and PAX extended-header payloads.

Pure functions: bytes in, values out; no I/O. Field positions follow POSIX ustar (IEEE 1003.1-1988) and the
GNU tar manual's "Basic Tar Format" (old GNU sparse fields live where ustar keeps `prefix`).
"""

import itertools
import re
import zlib
from dataclasses import dataclass, replace

from tarfuse.errors import BadHeader

BLOCK_SIZE = 512
ZERO_BLOCK = bytes(BLOCK_SIZE)

# Type flags (POSIX, GNU tar manual "Basic Tar Format").
REGULAR_TYPES = frozenset(b"0\x007")  # '0', NUL (v7) and '7' (contiguous) are all plain files
HARDLINK = ord("1")
SYMLINK = ord("2")
GNU_LONGNAME = ord("L")
GNU_LONGLINK = ord("K")
GNU_SPARSE = ord("S")
PAX_LOCAL = ord("x")
PAX_GLOBAL = ord("g")
SOLARIS_PAX = ord("X")  # Solaris tar's older spelling of 'x'

GNU_MAGIC = b"ustar  \0"  # "ustar" + two spaces + NUL: GNU and old GNU formats
USTAR_MAGIC = b"ustar\x00"  # POSIX ustar and pax, followed by version "00"

OLD_GNU_SPARSE_ENTRIES = 4  # in-header sparse slots of an old GNU 'S' header
EXTENSION_ENTRIES = 21  # sparse slots in each old GNU extension block
SPARSE_ENTRY_SIZE = 24  # 12 bytes offset + 12 bytes numbytes
MAX_DECIMAL_DIGITS = 20  # 2**64 has 20: a longer PAX number is no size, offset or time

_OCTAL = re.compile(rb" *([0-7]+) *")
# Old GNU sparse slots as GNU tar fills them: used ones first, each field "%011o\0", then all-NUL ones.
_GNU_SLOTS = re.compile(rb"((?:[0-7]{11}\0)*)\0*")
# A PAX record: "<length> <keyword>=<value>\n", length in decimal counting the whole record.
_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")


@dataclass(slots=True)
class Header:
    """The fields of one header block that tarfuse needs, decoded.

    Not frozen: a scan makes one per member, and a frozen dataclass takes three times as long to build.
    """

    name: str
    size: int  # bytes of data that follow the header in the archive, before padding
    mtime: int | None  # None if the field is not a number: archive.py warns and serves another mtime
    typeflag: int  # a byte value, e.g. ord("0")
    linkname: str
    is_gnu: bool  # GNU/old GNU magic: the bytes after 345 are GNU fields, not a ustar prefix
    is_ustar: bool = False  # POSIX magic "ustar\0": the only headers whose PAX sparse records GNU tar reads
    sparse_entries: tuple[tuple[int, int], ...] = ()  # old GNU 'S': in-header (offset, numbytes)
    is_extended: bool = False  # old GNU 'S': extension blocks follow the header
    real_size: int = 0  # old GNU 'S': size of the expanded file


def decode_name(raw: bytes | bytearray) -> str:
    """Turn a NUL-terminated header string into str; bytes that are not UTF-8 survive round trips."""
    if len(raw) <= BLOCK_SIZE:  # a header field: split is the fastest way
        return _text(raw.split(b"\0", 1)[0])
    end = raw.find(0)  # a GNU long name's payload: a memoryview, not a copy of up to a megabyte
    return str(raw if end < 0 else memoryview(raw)[:end], "utf-8", "surrogateescape")


def parse_number(field: bytes) -> int:
    """Decode a numeric header field: NUL/space-padded octal, or GNU base-256."""
    if field[:1] == b"\x80":  # base-256, positive: the remaining bytes, big-endian
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":  # base-256, negative: two's complement over the whole field
        return int.from_bytes(field, "big", signed=True)
    text = field.split(b"\0", 1)[0]
    if text.isdigit() and b"8" not in text and b"9" not in text:  # what tar writes: the fast path
        return int(text, 8)
    if not text.strip(b" "):
        # GNU tar skips one leading NUL ("buggy tar of unknown vintage", list.c from_header) and reads the
        # digits after it; tarfile reads 0. Which size a member has must not depend on the reader.
        if field[:1] == b"\0" and field[1:].lstrip(b" ")[:1].isdigit():
            raise BadHeader(f"number after a leading NUL: {field!r}")
        return 0
    # int(x, 8) alone would accept "1_7", "+17" and "-1"; tarfile.nti(b"0000001_7\0") == 15.
    if (match := _OCTAL.fullmatch(text)) is None:
        raise BadHeader(f"not an octal number: {field!r}")
    return int(match[1], 8)


def parse_decimal(text: str) -> int:
    """Decode a PAX decimal value: ASCII digits only, leading zeros allowed, at most 20 significant."""
    # isdigit() alone accepts digits of other scripts ("\u0663"), and so would int().
    if not (text.isascii() and text.isdigit()):
        raise BadHeader(f"{text[:40]!r} is not a decimal number")
    digits = text.lstrip("0") or "0"
    if len(digits) > MAX_DECIMAL_DIGITS:  # also keeps int() from its 4300-digit ValueError
        raise BadHeader(f"decimal number {text[:40]}... is absurdly large")
    return int(digits)


def checksum_ok(block: bytes) -> bool:
    """Check the header checksum, accepting both the unsigned (POSIX) and the signed (old Sun) sum."""
    try:
        stored = parse_number(block[148:156])
    except BadHeader:
        return False
    unsigned = _byte_sum(block) - sum(block[148:156]) + 8 * 0x20  # the field counts as eight spaces
    if stored == unsigned:
        return True
    high_bytes = sum(1 for b in block if b >= 0x80) - sum(1 for b in block[148:156] if b >= 0x80)
    return stored == unsigned - 256 * high_bytes


def _byte_sum(block: bytes) -> int:
    """sum(block), five times faster: Adler-32's low half is 1 + the byte sum modulo 65521, exact for 256
    bytes (at most 65280)."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def parse_header(block: bytes, offset: int) -> Header:
    """Decode a header block found at archive `offset`; raise BadHeader if it is not one."""
    if not checksum_ok(block):
        raise BadHeader("bad header checksum (not a tar header, or a corrupt one)", offset)
    try:
        return _parse_fields(block)
    except BadHeader as exc:
        raise BadHeader(f"bad header: {exc.reason}", offset) from None


def _parse_fields(block: bytes) -> Header:
    magic = block[257:265]
    is_gnu = magic == GNU_MAGIC
    name = block[0:100]
    if magic[:6] == USTAR_MAGIC and block[345] != 0:  # ustar: path = prefix + "/" + name
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    typeflag = block[156]
    size = parse_number(block[124:136])
    if size < 0:  # base-256 can say so; the next header would then be behind this one, forever
        raise BadHeader(f"negative size {size}")
    header = Header(
        name=decode_name(name),
        size=size,
        mtime=_lenient_number(block[136:148]),
        typeflag=typeflag,
        linkname=decode_name(block[157:257]),
        is_gnu=is_gnu,
        is_ustar=magic[:6] == USTAR_MAGIC,
    )
    if typeflag == GNU_SPARSE and is_gnu:  # GNU tar reads 'S' as a plain file under any other magic
        return _with_old_gnu_sparse(header, block)
    return header


def _lenient_number(field: bytes) -> int | None:
    """A number field that does not change the bytes served (mtime): None rather than BadHeader.

    GNU tar warns ("Archive contains 'x' where numeric time_t value expected") and extracts the file.
    """
    try:
        return parse_number(field)
    except BadHeader:
        return None


def _with_old_gnu_sparse(header: Header, block: bytes) -> Header:
    """Add the in-header sparse map of an old GNU 'S' header (offsets 386..495)."""
    entries = parse_sparse_entries(block[386:482], OLD_GNU_SPARSE_ENTRIES)
    if (real_size := parse_number(block[483:495])) < 0:
        raise BadHeader(f"negative real size {real_size}")
    return replace(header, sparse_entries=entries, is_extended=block[482] != 0, real_size=real_size)


def parse_sparse_entries(raw: bytes, count: int) -> tuple[tuple[int, int], ...]:
    """Decode `count` old GNU (offset, numbytes) slots, up to the first unused one."""
    numbers = parse_sparse_numbers(raw, count)
    return tuple(zip(numbers[0::2], numbers[1::2], strict=True))


def parse_sparse_numbers(raw: bytes, count: int) -> list[int]:
    """Decode `count` old GNU slots into a flat [offset, numbytes, offset, ...], up to the first unused one.

    A slot is unused when its numbytes field starts with NUL, as GNU tar decides (src/sparse.c,
    oldgnu_add_sparse); its offset field does not matter.
    """
    region = raw[: count * SPARSE_ENTRY_SIZE]
    match = _GNU_SLOTS.fullmatch(region)
    if match is not None and len(match[1]) % SPARSE_ENTRY_SIZE == 0:
        # Fast path for the "%011o\0" fields that GNU tar writes: a million-extent map has two million.
        return list(map(int, match[1].split(b"\0")[:-1], itertools.repeat(8)))
    numbers: list[int] = []
    for i in range(0, len(region), SPARSE_ENTRY_SIZE):
        if region[i + 12] == 0:  # unused slot: GNU tar leaves the rest zero-filled
            break
        numbers += (parse_number(region[i : i + 12]), parse_number(region[i + 12 : i + 24]))
    return numbers


def sparse_slots_full(raw: bytes, count: int) -> bool:
    """True if all `count` old GNU slots in `raw` are used, so that the map may go on in another block.

    GNU tar reads the next extension block only then, whatever `isextended` says (src/sparse.c,
    oldgnu_get_sparse_info): after a map that ends early, the data starts at once.
    """
    return all(raw[i + 12] != 0 for i in range(0, count * SPARSE_ENTRY_SIZE, SPARSE_ENTRY_SIZE))


def parse_extension_block(block: bytes) -> tuple[list[int], bool]:
    """Decode an old GNU sparse extension block: 21 slots as flat numbers, then `isextended` at 504."""
    return parse_sparse_numbers(block, EXTENSION_ENTRIES), block[504] != 0


def parse_pax_records(payload: bytes | bytearray, offset: int) -> list[tuple[str, str]]:
    """Split a PAX extended header payload into ordered (keyword, value) records.

    A list, not a dict: PAX sparse 0.0 repeats GNU.sparse.offset/numbytes, and order matters.
    `offset` is where the payload starts in the archive, for error messages. Each keyword is made a str
    once per payload: a PAX 0.0 map repeats two of them hundreds of thousands of times.
    """
    records = []
    keywords: dict[bytes, str] = {}
    pos = 0
    end = len(payload)
    while pos < end:
        if payload[pos] == 0:  # NUL padding after the last record
            break
        match = _PAX_LENGTH.match(payload, pos)
        if match is None:
            raise BadHeader("PAX record does not start with a length", offset + pos)
        length = int(match[1])
        record_end = pos + length
        if length <= len(match[0]) or record_end > end or payload[record_end - 1] != 0x0A:
            raise BadHeader(f"PAX record length {length} does not fit its record", offset + pos)
        keyword, sep, value = payload[match.end() : record_end - 1].partition(b"=")
        if not sep or not keyword or b"\0" in keyword:  # GNU tar: "missing equal sign" at a NUL
            raise BadHeader("PAX record has no keyword=value", offset + pos)
        if (text := keywords.get(key := bytes(keyword))) is None:  # bytes: a bytearray is no dict key
            text = keywords[key] = _text(keyword)
        records.append((text, _text(value)))
        pos = record_end
    return records


def _text(raw: bytes | bytearray) -> str:
    return raw.decode("utf-8", "surrogateescape")
