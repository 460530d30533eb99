"""A gzip seek index whose windows are fetched as reads need them: what a fleet's hosts read of a
published index (index.py).

rapidgzip exports its index in gztool's format: a header, then for each seek point its decompressed and
compressed offsets and its 32 KiB window (zlib-compressed), then the decompressed size. Every host that
fetched the whole of it would fetch every window, a few percent of the archive for data that compresses
well. So the index file also carries a table of the points (`table_of`): where each window is in the blob,
how long, and a digest of it. A host reads the table, then before each chunk it decompresses fetches the
windows of the points that chunk needs (`LazyWindows.covering`), checks each against its digest, and
hands rapidgzip an index of the points loaded so far. rapidgzip decodes from one point to the next, so
the point after the chunk is loaded too: it bounds the decoding, and its own window is real.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from tarfuse.errors import CorruptCompressed

_MAGIC = b"\0" * 8 + b"gzipindx"
_HEAD = struct.Struct(">QQ")  # points, points allocated
_POINT = struct.Struct(">QQII")  # decompressed offset, compressed offset, bits, window length
_ROW = struct.Struct(">QQIQI16s")  # out, in, bits, window position in the blob, its length, its digest
_TAIL = 8  # the decompressed size, after the points
WINDOW_MAX = 64 * 1024  # bytes of one compressed 32 KiB window, at most (zlib adds little to 32 KiB)
SPAN_MAX = 8 * 1024 * 1024  # bytes of windows fetched for one chunk, at most
# Seek points whose windows the index's header carries again (`ends_of`): every mount reads the stream's end
# (the tar's last headers, or with a member list its image's last sector, which format detection reads),
# and the chunk there needs the last point or the last two.
END_POINTS = 2


@dataclass(frozen=True, slots=True)
class Point:
    out: int
    into: int
    bits: int
    position: int  # of its window in the blob
    length: int
    digest: bytes

    def window_in(self, blob: bytes) -> bytes:
        """Its window, cut from `blob` (a gztool blob, or the start of one)."""
        return blob[self.position : self.position + self.length]


def table_of(blob: bytes) -> bytes | None:
    """The table of a gztool blob's points (rows of _ROW, then its tail), or None if it is not one."""
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _HEAD.size + _TAIL:
        return None
    count, _ = _HEAD.unpack_from(blob, len(_MAGIC))
    position, rows = len(_MAGIC) + _HEAD.size, []
    for _ in range(count):
        if position + _POINT.size > len(blob) - _TAIL:
            return None
        out, into, bits, length = _POINT.unpack_from(blob, position)
        window = blob[position + _POINT.size : position + _POINT.size + length]
        rows.append(_ROW.pack(out, into, bits, position + _POINT.size, length, _digest(window)))
        position += _POINT.size + length
    if position != len(blob) - _TAIL:
        return None
    return b"".join(rows) + blob[position:]


def ends_of(table: bytes, blob: bytes) -> bytes:
    """The windows of the table's last END_POINTS points, one after another, copied out of the blob.

    A host that fetched the index's header has them at once: the stream's end, which every mount reads,
    then costs no request of the index's windows, only one of the archive's last chunk.
    """
    points, _ = parse_table(table, len(blob))
    return b"".join(point.window_in(blob) for point in points[-END_POINTS:])


def parse_table(table: bytes, blob_length: int) -> tuple[list[Point], bytes]:
    """The points of a table read from someone else's index, and its tail; CorruptCompressed if the
    table is not one: rows that do not fit, offsets that go backwards, windows outside the blob."""
    count, rest = divmod(len(table) - _TAIL, _ROW.size)
    if len(table) < _TAIL or rest:
        raise CorruptCompressed("the index's table of seek points is damaged", None)
    points = [Point(*_ROW.unpack_from(table, i * _ROW.size)) for i in range(count)]
    for before, point in zip([None, *points], points, strict=False):
        # Windows one after another inside the blob: together no longer than the index file, which is
        # bounded (index.PUBLISHED_MAX), so what a host ever holds of them is too.
        inside = (
            point.position + point.length <= blob_length and point.length <= WINDOW_MAX and point.bits < 8
        )
        forward = before is None or (
            point.out > before.out
            and point.into > before.into
            and point.position >= before.position + before.length
        )
        if not (inside and forward):
            raise CorruptCompressed("the index's table of seek points is damaged", None)
    if not points or points[0].out != 0:
        raise CorruptCompressed("the index's table of seek points does not start at the stream's start", None)
    return points, table[count * _ROW.size :]


class LazyWindows:
    """The points of a table, their windows fetched as the chunks that need them are decompressed.

    `fetch(position, length)` reads that much of the blob (a ranged request of the published index).
    Thread-safe; the windows loaded stay (a boot reads a few places; a whole-image read loads them all,
    which is the whole index, as without a table).
    """

    def __init__(
        self,
        points: list[Point],
        tail: bytes,
        fetch: Callable[[int, int], bytes],
        head: bytes = b"",
        ends: bytes = b"",
    ) -> None:
        """`head`: the start of the blob, already at hand (what came with the index's header): the
        windows wholly inside it are taken from it. `ends`: the last points' windows (`ends_of`), from
        the header. Both are checked as fetched windows are."""
        self._points, self._tail, self._fetch = points, tail, fetch
        self._outs = [point.out for point in points]
        self._windows: dict[int, bytes] = {}
        self._lock = threading.Lock()
        for i, point in enumerate(points):
            if point.position + point.length > len(head):
                break
            self._take(i, point.window_in(head))
        if ends:
            last = range(max(len(points) - END_POINTS, 0), len(points))
            if len(ends) != sum(points[i].length for i in last):
                raise CorruptCompressed("the published index's windows of its last points are damaged", None)
            at = 0
            for i in last:
                self._take(i, ends[at : at + points[i].length])
                at += points[i].length

    def covering(self, start: int, end: int) -> bytes | None:
        """A gztool blob of every point loaded, once the points that decompressing [start, end) needs
        are (from the last at or before `start` to the first at or after `end`); None if none was
        missing. Raises CorruptCompressed if a fetched window is not the one the table names."""
        first = max(bisect.bisect_right(self._outs, start) - 1, 0)
        last = min(bisect.bisect_left(self._outs, end), len(self._points) - 1)
        with self._lock:
            missing = [i for i in range(first, last + 1) if i not in self._windows]
            if not missing:
                return None
            low, high = self._points[missing[0]], self._points[missing[-1]]
            length = high.position + high.length - low.position
            if length > SPAN_MAX:
                raise CorruptCompressed(
                    f"the published index asks for {length} bytes of windows for one chunk", None
                )
            span = self._fetch(low.position, length)
            for i in missing:
                point = self._points[i]
                self._take(
                    i, span[point.position - low.position : point.position - low.position + point.length]
                )
            return self._blob()

    def _take(self, i: int, window: bytes) -> None:
        point = self._points[i]
        if len(window) != point.length or _digest(window) != point.digest:
            raise CorruptCompressed(
                f"the published index's window of seek point {i} is not the one its table names", None
            )
        self._windows[i] = window

    @property
    def points(self) -> list[Point]:
        return self._points

    def window(self, i: int) -> bytes:
        """Point `i`'s window, fetched (with the next point's) if it is not loaded yet."""
        self.covering(self._outs[i], self._outs[i] + 1)
        with self._lock:
            return self._windows[i]

    def blob(self) -> bytes:
        """A gztool blob of the points loaded so far."""
        with self._lock:
            return self._blob()

    def _blob(self) -> bytes:
        loaded = sorted(self._windows)
        parts = [_MAGIC, _HEAD.pack(len(loaded), len(loaded))]
        for i in loaded:
            point, window = self._points[i], self._windows[i]
            parts += [_POINT.pack(point.out, point.into, point.bits, len(window)), window]
        return b"".join([*parts, self._tail])


# A published index's first seek point after the stream's start is checked (`decompresses_right`): the
# CHECK_LENGTH bytes after it (as far as its window reaches) decompressed from it, with its window, from
# the CHECK_INPUT compressed bytes after it, against the stream decompressed from its start. Only if those
# lie within the first CHECK_REACH bytes, the span a remote archive's first cold fetch brings
# (http/archive.py), so that the check costs no request; a point further in follows data that hardly
# compresses, which deflate stores in blocks that refer to no window.
CHECK_LENGTH = 32 * 1024
CHECK_INPUT = 64 * 1024
CHECK_REACH = 1536 * 1024
_WINDOW = 32 * 1024  # deflate's window: what a seek point's window decompresses to, at most
_PIECE = 256 * 1024  # decompressed bytes zlib may make at a time


def point_to_check(points: list[Point]) -> int | None:
    """Which seek point of a published index a mount checks, if any (see CHECK_REACH)."""
    return 1 if len(points) > 1 and points[1].into + CHECK_INPUT <= CHECK_REACH else None


def decompresses_right(span: bytes, point: Point, window: bytes) -> bool:
    """Whether decompressing from `point` with its (zlib-compressed) `window`, as an index of gztool's
    format is used (zran.c: the point's `bits` of the byte before it, then the bytes from it), gives the
    CHECK_LENGTH bytes the stream gives there decompressed from its start. `span`: the stream's first
    bytes, at least to point.into + CHECK_INPUT."""
    unpacker = zlib.decompressobj()
    try:  # none at all: the data after the point refers to none (stored blocks, a member's start)
        dictionary = unpacker.decompress(window, _WINDOW) if window else b""
    except zlib.error:
        return False
    if (window and (not unpacker.eof or unpacker.unconsumed_tail)) or point.into < 1:
        return False
    after = span[point.into : point.into + CHECK_INPUT]
    if point.bits:  # the point starts inside the byte before it: its top `bits` bits come first
        bits = span[point.into - 1] >> (8 - point.bits) | int.from_bytes(after, "little") << point.bits
        after = bits.to_bytes(len(after) + 1, "little")
    try:
        found = zlib.decompressobj(-15, zdict=dictionary).decompress(after, CHECK_LENGTH)
    except zlib.error:
        return False
    expected = inflated(span, point.out, CHECK_LENGTH)
    return expected is not None and found == expected


def inflated(stream: bytes, start: int, length: int) -> bytes | None:
    """The `length` decompressed bytes at `start` of the gzip `stream` (its first bytes), decompressed
    from its beginning with zlib: what a seek point's window must lead to, whatever an index says. None if
    the stream ends first, or is damaged. The decompressed bytes before `start` are made a piece at a time
    and dropped.
    """
    decompressor, made, kept, data = zlib.decompressobj(31), 0, bytearray(), stream
    while made < start + length:
        if not data:
            return None
        try:
            out = decompressor.decompress(data, _PIECE)
        except zlib.error:  # damaged, or the zeros some tools pad a file with after its last member
            return None
        data = decompressor.unconsumed_tail
        if decompressor.eof:  # a gzip file of several members (pigz --independent, bgzip): the next
            data = decompressor.unused_data  # all that follows the member (the tail may hold it too)
            decompressor = zlib.decompressobj(31)
        kept += out[max(start - made, 0) :] if made + len(out) > start else b""
        made += len(out)
    return bytes(kept[:length])


def _digest(window: bytes) -> bytes:
    return hashlib.sha256(window).digest()[:16]
