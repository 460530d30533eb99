"""Random access to dictzip files: gzip whose header indexes chunks that inflate on their own.

dictzip (dictd's compressor; QEMU's old `dzip:` block driver read the same files) writes one gzip member
(RFC 1952) whose FEXTRA field starts with an 'RA' subfield, every number 2 bytes little-endian:

    SI1 'R', SI2 'A', LEN = 6 + 2 * CHCNT, VER = 1, CHLEN, CHCNT, then CHCNT compressed sizes

FNAME follows (the input's base name, empty with -n; FCOMMENT and FHCRC are never written, but are legal).
It deflates CHLEN input bytes at a time and ends each with Z_FULL_FLUSH, so chunk i starts on a byte
boundary with an empty window, at the end of the header plus the compressed sizes of the chunks before
it, and a raw inflater decodes it alone. After the last chunk come the final empty block that Z_FINISH
writes (2 bytes, 03 00) and the gzip trailer: CRC32 and ISIZE (the size mod 2**32) of the whole input.
Sources: cheusov/dictd:dictzip/dictzip.c (dict_data_zip), libdictd/data.c (dict_read_header,
dict_data_read_), dictzip/dictzip.h (CHLEN is 58315); checked against dictzip 1.13.0 (Debian).

The tool neither refuses large inputs nor writes more RA subfields: past 32,762 chunks (1,910,516,030
bytes) its 16-bit XLEN and LEN wrap and the file it writes is unreadable, by gzip too. parse_header says so.

What a read checks: each chunk inflates, with no reference before its start, to exactly its length,
consuming exactly its compressed bytes, and ends on a block boundary. dictzip keeps no checksum per chunk:
a flipped bit in stored (incompressible) data, or one that turns a literal into another, passes those
checks, and only the CRC32 of the whole file catches it. verify() inflates every chunk once against that
CRC32 and keeps each chunk's own, so every later inflation is checked byte for byte.

No FUSE or event loop, no logging: everything that is wrong with the file raises DictzipError, and
DictzipSource, the reader as a source, says it as CorruptCompressed.
"""

import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

from tarfuse.errors import ArchiveError, CorruptCompressed
from tarfuse.sources.compression import Compression, DecodeError
from tarfuse.sources.file import Background, ByteSource, Identity, SourceDefaults, StreamOfArchive

ReadAt = Callable[[int, int], bytes]  # (offset, size) -> bytes of the compressed file, short only at its end

HEADER_READ_SIZE = 128 << 10  # parse_header's input: 12 + XLEN (< 64 KiB) and ~64 KiB of name and comment
CACHE_SIZE = 8 << 20  # inflated chunks kept by default: 143 of dictzip's 58315 bytes

_FHCRC, _FEXTRA, _FNAME, _FCOMMENT, _RESERVED = 0x02, 0x04, 0x08, 0x10, 0xE0  # gzip FLG bits
_EXTRA_START = 12  # the fixed 10-byte header, then XLEN
_TRAILER_SIZE = 8
_FLUSH_MARKER = b"\x00\x00\xff\xff"  # the empty stored block that ends a Z_FULL_FLUSH
_FINAL_EMPTY_BLOCK = b"\x03\x00"  # a final, empty fixed-Huffman block: what Z_FINISH adds after a flush
_MAX_TAIL = 64  # deflate bytes allowed between the last chunk and the trailer; dictzip writes 2
_WRAP_HINT = (
    "; dictzip writes such a header for an input over 1,910,516,030 bytes (32,762 chunks), "
    "where its 16-bit lengths wrap: the file is unreadable, by gzip too"
)


class DictzipError(DecodeError):
    """The dictzip file is corrupt, cut short or inconsistent; `offset` is in the compressed file."""

    def __init__(self, reason: str, offset: int) -> None:
        self.reason, self.offset = reason, offset
        super().__init__(f"dictzip: {reason} (compressed byte {offset})")


@dataclass(frozen=True, slots=True)
class RandomAccess:
    """The RA table: chunk i is compressed bytes [offsets[i], offsets[i + 1]).

    Every chunk inflates to chunk_length bytes but the last, which holds 1 to chunk_length.
    """

    chunk_length: int
    offsets: tuple[int, ...]  # chunk_count + 1 entries: each chunk's start, then the end of the last

    @property
    def data_offset(self) -> int:
        """Where the deflate data starts: the end of the gzip header."""
        return self.offsets[0]

    @property
    def chunk_count(self) -> int:
        return len(self.offsets) - 1


def parse_header(head: bytes) -> RandomAccess | None:
    """Read the RA table from the first HEADER_READ_SIZE bytes of a gzip file (all of it, if shorter).

    None if there is no RA subfield, or one of another version (QEMU also read a version 99 with 32-bit
    fields, from a pigz variant): the stream is still plain gzip, which the caller can serve, only slower.
    An RA field of version 1 that is inconsistent raises DictzipError instead: the file says it is dictzip
    and its table is corrupt, or was written by dictzip past its limit. Served as plain gzip, such a file
    fails later, or serves bytes the table disagrees with; the error names the field and its offset now.
    A `head` shorter than the header reads as a file cut short.
    """
    if len(head) < _EXTRA_START or head[:3] != b"\x1f\x8b\x08":  # magic, CM = deflate
        return None
    flags = head[3]
    if flags & _RESERVED or not flags & _FEXTRA:
        return None
    found = _find_ra(head)
    if found is None:
        return None
    table = _parse_ra(head, found)
    if table is None:
        return None
    chunk_length, sizes = table
    data_offset = _skip_names(head, flags, _EXTRA_START + int.from_bytes(head[10:12], "little"))
    return RandomAccess(chunk_length, tuple(accumulate(sizes, initial=data_offset)))


def _find_ra(head: bytes) -> int | None:
    """The offset of the RA subfield in the extra field (RFC 1952 2.3.1.1: SI1 SI2 LEN data), or None."""
    xlen = int.from_bytes(head[10:12], "little")
    end = _EXTRA_START + xlen
    if xlen == 0 and head[12:14] == b"RA" and int.from_bytes(head[14:16], "little") == 0xFFFC:
        raise DictzipError(f"the gzip extra field is 0 bytes long, but an RA field follows{_WRAP_HINT}", 10)
    if len(head) < end:
        if head[12:14] == b"RA":
            raise DictzipError(
                f"truncated: the gzip extra field ends at byte {end}, the file at {len(head)}", 10
            )
        return None
    found = None
    pos = _EXTRA_START
    while pos + 4 <= end:
        length = int.from_bytes(head[pos + 2 : pos + 4], "little")
        if head[pos : pos + 2] == b"RA":
            if pos + 4 + length > end:
                raise DictzipError(
                    f"the RA subfield's {length} bytes run past the extra field's end {end}", pos
                )
            if found is not None:
                raise DictzipError(f"a second RA subfield (the first is at byte {found})", pos)
            found = pos
        pos += 4 + length
    return found


def _parse_ra(head: bytes, pos: int) -> tuple[int, tuple[int, ...]] | None:
    """(chunk length, compressed sizes) from the RA subfield at `pos`; None for a version other than 1."""
    length = int.from_bytes(head[pos + 2 : pos + 4], "little")
    if length < 6:
        raise DictzipError(f"the RA subfield is {length} bytes, less than its 6 fixed ones", pos)
    version, chunk_length, count = struct.unpack_from("<3H", head, pos + 4)
    if version != 1:
        return None
    if chunk_length == 0:
        raise DictzipError("the RA chunk length is 0", pos + 6)
    if length != 6 + 2 * count:
        hint = _WRAP_HINT if (6 + 2 * count) % 0x10000 == length else ""
        raise DictzipError(
            f"the RA subfield is {length} bytes, but {count} chunks need {6 + 2 * count}{hint}", pos
        )
    return chunk_length, struct.unpack_from(f"<{count}H", head, pos + 10)


def _skip_names(head: bytes, flags: int, pos: int) -> int:
    """Where the deflate data starts: past FNAME, FCOMMENT and FHCRC, whichever are there."""
    for flag, field in ((_FNAME, "file name"), (_FCOMMENT, "comment")):
        if flags & flag:
            nul = head.find(b"\0", pos)
            if nul < 0:  # the bound: whatever of HEADER_READ_SIZE the extra field leaves
                raise DictzipError(f"the gzip {field} does not end within the first {len(head)} bytes", pos)
            pos = nul + 1
    if flags & _FHCRC:
        if len(head) < pos + 2:
            raise DictzipError(f"truncated: the gzip header CRC16 ends at byte {pos + 2}", pos)
        if int.from_bytes(head[pos : pos + 2], "little") != zlib.crc32(head[:pos]) & 0xFFFF:
            raise DictzipError("the gzip header's CRC16 does not match it", pos)
        pos += 2
    return pos


class DictzipReader:
    """The decompressed bytes of a dictzip file, inflating only the chunks a read needs.

    Threads may share it: the cache of inflated chunks is the only mutable state, behind a lock held for
    bookkeeping only, so chunks inflate in parallel (zlib releases the GIL); two threads missing the same
    chunk may each inflate it once. Memory: the cache holds at most max(1, cache_size // chunk_length)
    chunks (a chunk is at most 64 KiB: CHLEN is 16-bit), the table ~40 bytes a chunk (1.3 MB at dictzip's
    most, 32,762 chunks), verify()'s CRC32s 4 bytes a chunk; a read also holds what it returns.
    """

    def __init__(self, read_at: ReadAt, compressed_size: int, *, cache_size: int = CACHE_SIZE) -> None:
        """Read the header, the trailer and the last chunk, which gives the size.

        Raises:
            DictzipError: not dictzip, or the table does not fit the file, the last chunk or ISIZE.
        """
        self._read = read_at
        table = parse_header(self._read_exact(0, min(HEADER_READ_SIZE, compressed_size)))
        if table is None:
            raise DictzipError("not a dictzip file: no RA field of version 1 in the gzip header", 0)
        self._table = table
        self._trailer_offset = compressed_size - _TRAILER_SIZE
        self._check_layout()
        self._crc, isize = struct.unpack("<II", self._read_exact(self._trailer_offset, _TRAILER_SIZE))
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = max(1, cache_size // table.chunk_length)
        self._chunk_crcs: array[int] | None = None  # set by verify()
        self.size = self._measure(isize)  # the decompressed size

    def _check_layout(self) -> None:
        """The chunks end before the trailer, followed only by the stream's last few bytes."""
        end = self._table.offsets[-1]
        if end > self._trailer_offset:
            raise DictzipError(
                f"truncated or corrupt: the RA table's chunks end at byte {end}, "
                f"past the gzip trailer at {self._trailer_offset}",
                self._table.data_offset,
            )
        if self._trailer_offset - end > _MAX_TAIL:
            raise DictzipError(
                f"{self._trailer_offset - end} bytes follow the RA table's last chunk before the gzip "
                f"trailer (at most {_MAX_TAIL}; dictzip writes 2)",
                end,
            )

    def _measure(self, isize: int) -> int:
        """The decompressed size, from the last chunk's length; checked against the trailer's ISIZE."""
        count, length = self._table.chunk_count, self._table.chunk_length
        if count:
            last = self._inflate(count - 1)
            if not last:
                raise DictzipError(
                    f"the last chunk, {count - 1}, inflates to nothing", self._table.offsets[-2]
                )
        else:  # dictzip's table for an empty input: the stream must hold nothing
            start = self._table.data_offset
            if self._inflate_bytes("the stream", start, self._read_to_trailer(start)):
                raise DictzipError("the RA table has no chunks, but the stream holds data", start)
            last = b""
        size = max(count - 1, 0) * length + len(last)
        if size % (1 << 32) != isize:
            raise DictzipError(
                f"the RA table gives {size} bytes, the gzip ISIZE {isize}", self._trailer_offset + 4
            )
        if count:
            self._cache[count - 1] = last
        return size

    def read_at(self, offset: int, size: int) -> bytes:
        """The decompressed bytes [offset, offset + size), short only at the end of the file."""
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset or size: {offset}, {size}")
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        length = self._table.chunk_length
        first, last = offset // length, (end - 1) // length
        if first == last:
            return self._chunk(first)[offset - first * length : end - first * length]
        parts = [memoryview(self._chunk(i)) for i in range(first, last + 1)]
        parts[0] = parts[0][offset - first * length :]
        parts[-1] = parts[-1][: end - last * length]
        return b"".join(parts)

    def verify(self, stopped: Callable[[], bool] = lambda: False) -> bool:
        """Inflate every chunk once against the trailer's CRC32; later inflations are checked by chunk.

        Returns False, unchecked, if `stopped()` turns true on the way (an unmount must not wait for a
        whole remote file).

        Reads the whole compressed file (docs/benchmarks.md has the time it takes): for the caller to run
        once, in the background or before serving, as it decides. Until it has run, reads are checked for
        structure only, which misses a flipped bit in stored data or in a literal (module docstring).

        Raises:
            DictzipError: a chunk is corrupt, or the data's CRC32 is not the trailer's.
        """
        crc, crcs = 0, array("I")
        for i in range(self._table.chunk_count):
            if stopped():
                return False
            data = self._load(i)
            crcs.append(zlib.crc32(data))
            crc = zlib.crc32(data, crc)
        if crc != self._crc:
            raise DictzipError(
                f"the data's CRC32 is {crc:08x}, the gzip trailer's {self._crc:08x}", self._trailer_offset
            )
        self._chunk_crcs = crcs
        return True

    @property
    def verified(self) -> bool:
        """Whether verify() has passed, so that every inflation is checked against its chunk's CRC32."""
        return self._chunk_crcs is not None

    def close(self) -> None:
        """Drop the cached chunks; the compressed file is the caller's to close."""
        with self._lock:
            self._cache.clear()

    def _chunk(self, i: int) -> bytes:
        """Chunk i inflated, from the cache if it is there (least recently used goes first)."""
        with self._lock:
            data = self._cache.get(i)
            if data is not None:
                self._cache.move_to_end(i)
                return data
        data = self._load(i)
        with self._lock:
            self._cache[i] = data
            while len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return data

    def _load(self, i: int) -> bytes:
        """Chunk i inflated and checked: its exact length, and its CRC32 once verify() has run."""
        data = self._inflate(i)
        last_start = (self._table.chunk_count - 1) * self._table.chunk_length
        expected = self._table.chunk_length if i < self._table.chunk_count - 1 else self.size - last_start
        if len(data) != expected:
            raise DictzipError(
                f"chunk {i} inflates to {len(data)} bytes, not {expected}", self._table.offsets[i]
            )
        crcs = self._chunk_crcs
        if crcs is not None and zlib.crc32(data) != crcs[i]:
            raise DictzipError(f"chunk {i} no longer inflates to what verify() read", self._table.offsets[i])
        return data

    def _inflate(self, i: int) -> bytes:
        """Chunk i inflated alone; the last one runs to the trailer, through the stream's final block."""
        start = self._table.offsets[i]
        if i == self._table.chunk_count - 1:
            return self._inflate_bytes(f"chunk {i}", start, self._read_to_trailer(start))
        raw = self._read_exact(start, self._table.offsets[i + 1] - start)
        if not raw.endswith(_FLUSH_MARKER):  # Z_FULL_FLUSH's mark: the chunk ends on a block boundary
            raise DictzipError(f"chunk {i} does not end with a full flush (00 00 ff ff)", start)
        return self._inflate_bytes(f"chunk {i}", start, raw + _FINAL_EMPTY_BLOCK)

    def _inflate_bytes(self, what: str, start: int, raw: bytes) -> bytes:
        """Inflate `raw`, which must end the deflate stream exactly, to at most one chunk's length.

        A fresh raw inflater has no window: a reference to data before the chunk fails here, so a chunk
        that inflates never depends on another one. The final block appended to a chunk (or the stream's
        own) must end the stream on the last byte: a chunk that ends early or mid-block fails.
        """
        limit = self._table.chunk_length
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(raw, limit + 1)  # bounded: a hostile chunk may inflate to 1000x
        except zlib.error as exc:
            raise DictzipError(f"{what} does not inflate: {exc}", start) from exc
        if len(data) > limit:
            raise DictzipError(f"{what} inflates to more than the chunk length {limit}", start)
        if not inflater.eof or inflater.unused_data:
            raise DictzipError(f"{what} does not end where the RA table says", start)
        return data

    def _read_to_trailer(self, start: int) -> bytes:
        return self._read_exact(start, self._trailer_offset - start)

    def _read_exact(self, offset: int, size: int) -> bytes:
        data = self._read(offset, size)
        if len(data) != size:
            raise DictzipError(f"truncated: {len(data)} of {size} bytes read", offset)
        return data


def has_random_access_table(archive: ByteSource) -> bool:
    """Whether a gzip file is dictzip: its header's RA table (a broken one is CorruptCompressed)."""
    try:
        return parse_header(archive.read_at(0, min(HEADER_READ_SIZE, archive.size))) is not None
    except DecodeError as exc:
        raise CorruptCompressed(f"the dictzip table cannot be used: {exc}", 0) from None


class DictzipSource(StreamOfArchive, SourceDefaults):
    """A dictzip file's decompressed bytes, at random from the first read: no pass, no index file.

    Its reads are checked against the whole stream's CRC32 only once verify() has read it all (the chunks
    carry no checksum), which the mount's background job does (VERIFY). Its reader inflates only the
    chunks (~57 KiB) a read needs, from any thread, with a cache of its own: the 1 MiB chunks of a
    CompressedSource would inflate 18 of them for a 4 KiB read (docs/benchmarks.md, "Figures behind the
    code").
    """

    blocking = True
    readers = 4  # its reader is thread-safe and inflates outside its lock
    size_known = True
    compression: "Compression | None" = "dictzip"
    background = Background.VERIFY

    def __init__(self, archive: ByteSource) -> None:
        self.path = archive.path
        self.archive = archive
        self.index_home = archive.index_home
        try:
            self._reader = DictzipReader(archive.read_at, archive.size)
        except DecodeError as exc:
            raise CorruptCompressed(f"the dictzip stream cannot be opened: {exc}", 0) from None
        self.size = self._reader.size
        self._broken: ArchiveError | None = None

    def read_at(self, offset: int, size: int) -> bytes:
        try:
            return self._reader.read_at(offset, max(0, min(size, self.size - offset)))
        except DecodeError as exc:
            raise CorruptCompressed(f"the dictzip stream cannot be decompressed: {exc}", offset) from None

    def pread_into(self, buffer: memoryview, offset: int) -> int:
        data = self.read_at(offset, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def verify(self, stopped: Callable[[], bool] = lambda: False) -> bool:
        """Read the stream whole against its CRC32; raise CorruptCompressed if it fails; False if
        `stopped()` came first."""
        try:
            return self._reader.verify(stopped)
        except DecodeError as exc:
            raise CorruptCompressed(f"the dictzip stream fails its check: {exc}", None) from None

    def mark_broken(self, error: ArchiveError) -> None:
        """Fail every later read with `error`: the stream failed its check."""
        self._broken = error

    def check_unchanged(self) -> None:
        self.archive.check_unchanged()
        if self._broken is not None:
            raise self._broken

    def identity(self) -> Identity:
        return self.archive.identity()

    def close(self) -> None:
        self._reader.close()
        self.archive.close()

    def __enter__(self) -> "DictzipSource":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
