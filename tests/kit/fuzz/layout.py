"""Where things are in a tar archive, found without trusting it; the edits and values mutations share.

`walk` finds header blocks, old GNU extension blocks, PAX and long-name payloads, PAX 1.0 maps and member
data, and the members themselves (where each one's headers start, its name), and stops quietly at the first
block that is no header. The helpers below it re-sign a header, replace a payload (fixing the header's size
field, usually), and make the odd numbers mutations write.
"""

import random
import re
from dataclasses import dataclass

from kit import tarbuilder as tb
from tarfuse.errors import BadHeader
from tarfuse.tar.header import checksum_ok, parse_number

BLOCK = tb.BLOCK
ZERO_BLOCK = bytes(BLOCK)
_PAX_FLAGS = frozenset(b"xXg")
_LONG_FLAGS = frozenset(b"LK")
_MAX_HEADERS = 2000  # the walk gives up after this many: mutations only need the first ones
_MAX_MAP_LINES = 20_001
IMAGE_SUFFIX = ".img"  # every seed names its disk image so (seeds.py)


@dataclass(frozen=True, slots=True)
class Span:
    """`size` bytes at archive `offset`, belonging to the header block at `header`."""

    header: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One member: where its headers start (a PAX or long-name header before its own), its name, its data."""

    start: int
    data: Span  # its own header block (data.header) and its data area
    name: str  # from a PAX path or GNU.sparse.name record, a GNU long name, or the header's name fields
    typeflag: int

    @property
    def end(self) -> int:
        """Where the next member's headers start."""
        return self.data.offset + padded(self.data.size)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where things are in an archive, as far as its headers can be believed."""

    size: int
    headers: tuple[int, ...] = ()  # every header block, extended headers included
    sparse_headers: tuple[int, ...] = ()  # old GNU 'S' headers
    extension_blocks: tuple[int, ...] = ()  # old GNU sparse extension blocks
    pax: tuple[Span, ...] = ()  # 'x', 'X' and 'g' payloads
    long_names: tuple[Span, ...] = ()  # 'L' and 'K' payloads
    maps: tuple[Span, ...] = ()  # PAX 1.0 map text (up to its last newline) at the start of member data
    data: tuple[Span, ...] = ()  # member data areas
    entries: tuple[Entry, ...] = ()  # the members, one per data area
    end: int | None = None  # the first zero block, if the walk got there

    def image(self) -> Entry | None:
        """The first file, sparse file or hard link named like a disk image: the one a seed serves."""
        return next(
            (e for e in self.entries if e.name.endswith(IMAGE_SUFFIX) and e.typeflag in b"0\x0017S"), None
        )

    def boundaries(self) -> list[tuple[int, str]]:
        """Offsets where a truncation is most interesting, each with a label."""
        points = [(h, "header start") for h in self.headers]
        points += [(e, "extension block") for e in self.extension_blocks]
        for kind, spans in (("PAX payload", self.pax), ("long name", self.long_names), ("data", self.data)):
            for span in spans:
                points += [(span.offset, f"{kind} start"), (span.offset + span.size, f"{kind} end")]
                points.append((span.offset + padded(span.size), f"{kind} padding end"))
        points += [(m.offset + m.size, "PAX 1.0 map end") for m in self.maps]
        points += [(m.offset + m.size // 2, "PAX 1.0 map middle") for m in self.maps if m.size > 1]
        if self.end is not None:
            points += [(self.end, "end-of-archive marker"), (self.end + BLOCK, "second end block")]
        return points


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def walk(data: bytes | bytearray) -> Layout:
    """Find the structure of `data`, stopping quietly at the first block that is no header."""
    headers: list[int] = []
    sparse_headers: list[int] = []
    extension_blocks: list[int] = []
    spans: dict[str, list[Span]] = {"pax": [], "long_names": [], "maps": [], "data": []}
    entries: list[Entry] = []
    offset, end, pax10_next = 0, None, False
    start, name = None, None  # where the current member's headers began; its name from one of them
    while offset + BLOCK <= len(data) and len(headers) < _MAX_HEADERS:
        block = bytes(data[offset : offset + BLOCK])
        if block == ZERO_BLOCK:
            end = offset
            break
        if (size := _header_size(block)) is None:
            break
        headers.append(offset)
        start = offset if start is None else start
        body = offset + BLOCK
        flag = block[156]
        if flag == ord("S"):
            sparse_headers.append(offset)
            extended = block[482] != 0
            while extended and body + BLOCK <= len(data):
                extension_blocks.append(body)
                extended, body = data[body + 504] != 0, body + BLOCK
        span = Span(offset, body, min(size, len(data) - body))  # a claimed size: what is really there
        if flag in _PAX_FLAGS:
            spans["pax"].append(span)
            payload = bytes(data[body : body + size])
            pax10_next = flag != ord("g") and b"GNU.sparse.major=1\n" in payload
            if flag == ord("g"):
                start = None  # a global header belongs to no member
            else:
                name = _pax_name(payload) or name
        elif flag in _LONG_FLAGS:
            spans["long_names"].append(span)
            if flag == ord("L"):
                text = bytes(data[body : body + min(size, 4096)]).split(b"\0", 1)[0]
                name = text.decode("utf-8", "replace")
        else:
            spans["data"].append(span)
            entries.append(Entry(start, span, name or _header_name(block), flag))
            if pax10_next and size:
                spans["maps"].append(Span(offset, body, _map_text_size(data[body : body + size])))
            pax10_next, start, name = False, None, None
        offset = body + padded(size)
    return Layout(
        len(data),
        tuple(headers),
        tuple(sparse_headers),
        tuple(extension_blocks),
        **{key: tuple(value) for key, value in spans.items()},
        entries=tuple(entries),
        end=end,
    )


def _header_name(block: bytes) -> str:
    """The name fields of a header: a POSIX ustar prefix and name joined; GNU headers have no prefix."""
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0" and (prefix := block[345:500].split(b"\0", 1)[0]):
        name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_name(payload: bytes) -> str | None:
    """The name a PAX payload gives its member: GNU.sparse.name (sparse 0.1/1.0) over path."""
    found = dict(record_parts(r) for r in split_records(payload)[0])
    value = found.get("GNU.sparse.name", found.get("path"))
    return None if value is None else value.decode("utf-8", "replace")


def _header_size(block: bytes) -> int | None:
    if not checksum_ok(block):
        return None
    try:
        size = parse_number(block[124:136])
    except BadHeader:
        return None
    return size if size >= 0 else None


def _map_text_size(area: bytes | bytearray) -> int:
    """Length of a PAX 1.0 map: the count line and 2 * count lines (as much of them as is there)."""
    first = area.find(b"\n", 0, 64)
    count = int(area[:first]) if first > 0 and area[:first].isdigit() else 0
    lines, pos = 1 + 2 * min(count, _MAX_MAP_LINES), 0
    for _ in range(lines):
        pos = area.find(b"\n", pos, min(len(area), 1 << 20)) + 1
        if pos == 0:
            return len(area)
    return pos


# ---- values ----------------------------------------------------------------------------------------

_GARBAGE_NUMBERS = [
    b"12389",
    b"0x1f",
    b"-1",
    b"+17",
    b"1_7",
    b"1 2",
    b"\xff\xfe",
    b"",
    b"1e9",
    b"0o17",
    b"\t17",
    b"\x80",
    b"\xff",
    b"17\xff",
]


def fit(raw: bytes, width: int) -> bytes:
    return raw[:width].ljust(width, b"\0")


def number_field(width: int, rng: random.Random, archive_size: int) -> tuple[bytes, str]:
    """A value for a numeric header field of `width` bytes: garbage, odd spacing, base-256, or plausible."""
    kind = rng.choice(["garbage", "spaces", "base256", "negative", "huge", "plausible", "plausible"])
    if kind == "garbage":
        raw = rng.choice([*_GARBAGE_NUMBERS, b"7" * width, b" " * width, b"8" * (width - 1)])
        return fit(raw, width), f"garbage {raw[:width]!r}"
    if kind == "spaces":
        digits = b"%o" % rng.randrange(0, 8 ** min(width - 3, 6))
        raw = b" " * rng.randrange(0, 3) + digits + rng.choice([b" ", b"  ", b"\0", b" \0", b"\0 "])
        return fit(raw, width), f"spaced {raw!r}"
    if kind == "base256":
        value = rng.choice([0, 1, 2 ** (8 * (width - 1)) - 1, 2**63 - 1, 2**63, 2**64, archive_size, 2**33])
        value = min(value, 2 ** (8 * (width - 1)) - 1)
        return b"\x80" + value.to_bytes(width - 1, "big"), f"base-256 {value}"
    if kind == "negative":
        value = rng.choice([-1, -512, -(2**63), -(2 ** (8 * width - 1))])
        return value.to_bytes(width, "big", signed=True), f"base-256 {value}"
    if kind == "huge":
        return b"7" * (width - 1) + b"\0", f"octal max {'7' * (width - 1)}"
    value = rng.choice(
        [0, 1, 511, 512, 513, archive_size, archive_size - 512, rng.randrange(0, 2 * archive_size)]
    )
    value = max(value, 0)
    return tb.number(value, width), f"{value}"


def decimal_text(rng: random.Random, archive_size: int) -> str:
    """A value for a PAX or PAX-sparse decimal: plausible, huge, negative or not a number."""
    return rng.choice(
        [
            str(rng.randrange(0, 2 * archive_size + 2)),
            str(archive_size),
            "0",
            "-1",
            "99999999999",
            str(2**63),
            str(2**64),
            "9" * 25,
            "0" * 30 + "7",
            "",
            " 5",
            "1e3",
            "0x10",
            "12.5",
            "\u0663",
        ]
    )


# ---- helpers shared by the mutations ------------------------------------------------------------------


def resign(buf: bytearray, header: int, rng: random.Random, probability: float = 0.85) -> str:
    """Recompute the checksum of the header at `header`, usually; say which happened."""
    if header + BLOCK > len(buf) or rng.random() >= probability:
        return " (stale checksum)"
    buf[header : header + BLOCK] = tb.set_checksum(buf[header : header + BLOCK])
    return ""


def replace_area(buf: bytearray, span: Span, old_size: int, new: bytes, rng: random.Random) -> str:
    """Replace `old_size` bytes at span.offset (the whole area, padded) with `new`, fixing the header size.

    Everything after moves; the header's size field follows the change, unless chance decides it stays.
    """
    area_end = span.offset + padded(span.size)
    delta = padded(len(new) + span.size - old_size) - padded(span.size)
    buf[span.offset : area_end] = tb.pad(new + bytes(buf[span.offset + old_size : span.offset + span.size]))
    note = ""
    if rng.random() < 0.85:
        buf[span.header + 124 : span.header + 136] = tb.number(span.size + len(new) - old_size, 12)
    else:
        note = " (header size not updated)"
    return note + resign(buf, span.header, rng, 0.95) + f" ({delta:+d} bytes)"


def pick(rng: random.Random, items: tuple[int, ...] | tuple[Span, ...]) -> int | Span | None:
    return rng.choice(items) if items else None


# ---- PAX record framing ---------------------------------------------------------------------------------

_RECORD = re.compile(rb"([0-9]+) ")


def split_records(payload: bytes) -> tuple[list[bytes], bytes]:
    """Cut a PAX payload into whole records, as far as their lengths hold; return them and the rest."""
    records, pos = [], 0
    while pos < len(payload):
        match = _RECORD.match(payload, pos)
        if match is None or len(match[1]) > 12:
            break
        length = int(match[1])
        if length <= len(match[0]) or pos + length > len(payload):
            break
        records.append(payload[pos : pos + length])
        pos += length
    return records, payload[pos:]


def record_parts(record: bytes) -> tuple[str, bytes]:
    """The keyword (latin-1) and value of a well-framed record."""
    body = record.split(b" ", 1)[1][:-1]
    key, _, value = body.partition(b"=")
    return key.decode("latin-1"), value


def frame(key: str, value: str | bytes) -> bytes:
    return tb.pax_record(key, value) if key.isascii() else b""
