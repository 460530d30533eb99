"""Random-access byte sources over compressed archives: gzip, bzip2, zstd and xz.

A `CompressedSource` offers the plain file's interface (`size`, `pread`, `pread_into`, `check_unchanged`,
`close`) over the *decompressed* archive, so the tar reader, sparse maps and mapper run unchanged on top.
The decompressors are libraries made for seeking (docs/compressed.md says why these): they keep checkpoints
of decompressor state, made as the stream is first decompressed, so a later read decompresses only from the
nearest one. Reads are served in whole chunks from a bounded cache of decompressed chunks.

Library file objects are not thread-safe (seek + read), so each sits behind a lock. A local archive is
opened by path; any other source (remote.RemoteArchive) through a `PreadFile`, for the libraries that take
file objects. Must not import pyfuse3 or trio.
"""

import io
import json
import lzma
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import BinaryIO, Protocol, TypeVar, cast

from xz.common import XZError

from tarfuse import detect
from tarfuse.errors import CompressedArchive, CorruptCompressed, TarfuseError
from tarfuse.source import ArchiveFile, ByteSource, PreadFile

UNKNOWN_SIZE = 1 << 62  # the size until the stream's end is known: reads past the real end come back short
CHUNK_SIZE = 1 << 20  # the unit of decompression and of the cache
DEFAULT_CACHE_SIZE = 32 << 20

_SKIPPABLE_FIRST = frozenset(bytes([0x50 + i]) for i in range(16))  # zstd skippable frames: 0x184D2A5?
# What the libraries raise on a corrupt or cut stream: rapidgzip and indexed_zstd raise ValueError or
# RuntimeError, python-xz its own XZError or lzma's.
DECODE_ERRORS: tuple[type[Exception], ...] = (ValueError, RuntimeError, EOFError, lzma.LZMAError, XZError)


def sniff(head: bytes) -> str | None:
    """Name the compression from the first bytes ("gzip", "bzip2", "xz", "zstd"), or None for plain tar.

    Raises:
        CompressedArchive: a compression tarfuse cannot serve (lz4, lzip, compress).
    """
    if head[:1] in _SKIPPABLE_FIRST and head[1:4] == b"\x2a\x4d\x18":  # pzstd starts with a skippable frame
        return "zstd"
    if (found := detect.compression_of(head)) is None:
        return None
    name, command = found
    if name not in DECODERS:
        raise CompressedArchive(
            f"the archive is {name}-compressed, which tarfuse cannot serve; decompress it "
            f"first ({command} ARCHIVE), or recompress it with gzip, zstd, xz or bzip2",
            0,
        )
    return name


class Decoder(Protocol):
    """One library file object over the compressed file: seekable, not thread-safe."""

    def read_at(self, offset: int, size: int) -> bytes: ...
    def compressed_position(self) -> int | None: ...  # bytes of the compressed file consumed, if known
    def complete_size(self) -> int | None: ...  # the decompressed size, once the index is complete
    def export_index(self) -> bytes | None: ...  # None: nothing worth keeping (xz keeps its own)
    def import_index(self, blob: bytes) -> None: ...
    def close(self) -> None: ...


class _SeekingDecoder:
    """A library file object with seek() and read(); subclasses add the index calls."""

    def __init__(self, file: io.IOBase) -> None:
        self._file = file

    def read_at(self, offset: int, size: int) -> bytes:
        self._file.seek(offset)
        data = self._file.read(size)
        return bytes(data) if data else b""

    def close(self) -> None:
        self._file.close()


class _GzipDecoder(_SeekingDecoder):
    """rapidgzip: checkpoints every few MiB, exported in the indexed_gzip/gztool index format."""

    def __init__(self, path: "str | PreadFile") -> None:
        import rapidgzip  # only archives that need it pay for the import

        self._gz = rapidgzip.RapidgzipFile(path, parallelization=1)
        super().__init__(self._gz)

    def compressed_position(self) -> int | None:
        return int(self._gz.tell_compressed()) // 8  # rapidgzip counts bits

    def complete_size(self) -> int | None:
        return int(self._gz.size()) if self._gz.block_offsets_complete() else None

    def export_index(self) -> bytes | None:
        out = io.BytesIO()
        self._gz.export_index(out)
        return out.getvalue()

    def import_index(self, blob: bytes) -> None:
        self._gz.import_index(io.BytesIO(blob))


class _OffsetsDecoder(_SeekingDecoder):
    """indexed_zstd and rapidgzip's bzip2 reader: the index is a {compressed bit or byte: offset} map."""

    def __init__(self, file: io.IOBase, position_unit: int) -> None:
        super().__init__(file)
        self._unit = position_unit

    def compressed_position(self) -> int | None:
        return int(self._file.tell_compressed()) // self._unit  # type: ignore[attr-defined]

    def complete_size(self) -> int | None:
        complete = self._file.block_offsets_complete()  # type: ignore[attr-defined]
        return int(self._file.size()) if complete else None  # type: ignore[attr-defined]

    def export_index(self) -> bytes | None:
        offsets = self._file.block_offsets()  # type: ignore[attr-defined]
        return json.dumps(sorted(offsets.items())).encode()

    def import_index(self, blob: bytes) -> None:
        pairs = json.loads(blob)
        if not all(isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p) for p in pairs):
            raise ValueError("index entries are not pairs of integers")
        self._file.set_block_offsets(dict(pairs))  # type: ignore[attr-defined]


def _open_bzip2(path: "str | PreadFile") -> Decoder:
    import rapidgzip

    return _OffsetsDecoder(rapidgzip.IndexedBzip2File(path, parallelization=1), position_unit=8)


def _open_zstd(path: "str | PreadFile") -> Decoder:
    import indexed_zstd

    if not isinstance(path, str):  # indexed_zstd takes a path or an fd, not a file object
        raise CompressedArchive(
            "zstd-compressed archives can only be read from a local file (indexed_zstd opens paths, not "
            "file objects); download it first, or recompress it with gzip, xz or bzip2",
            0,
        )

    return _OffsetsDecoder(indexed_zstd.IndexedZstdFile(path), position_unit=1)


class _XzDecoder(_SeekingDecoder):
    """python-xz: seeks by the block index every xz file ends with; nothing to build or keep."""

    def __init__(self, path: "str | PreadFile") -> None:
        import xz

        self._xz = xz.open(path if isinstance(path, str) else cast(BinaryIO, path))  # it reads, seeks
        super().__init__(self._xz)

    def compressed_position(self) -> int | None:
        return None

    def complete_size(self) -> int | None:
        return len(self._xz)

    def export_index(self) -> bytes | None:
        return None

    def import_index(self, blob: bytes) -> None:
        pass


DECODERS: dict[str, Callable[[str | PreadFile], Decoder]] = {
    "gzip": _GzipDecoder,
    "bzip2": _open_bzip2,
    "zstd": _open_zstd,
    "xz": _XzDecoder,
}


class ChunkCache:
    """A bounded LRU of decompressed chunks, shared by threads."""

    def __init__(self, capacity: int) -> None:
        self._slots = max(1, capacity // CHUNK_SIZE)
        self._chunks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0

    def get(self, index: int) -> bytes | None:
        with self._lock:
            chunk = self._chunks.get(index)
            if chunk is not None:
                self._chunks.move_to_end(index)
            return chunk

    def __contains__(self, index: int) -> bool:
        return index in self._chunks

    def put(self, index: int, chunk: bytes) -> None:
        with self._lock:
            self.misses += 1
            self._chunks[index] = chunk
            while len(self._chunks) > self._slots:
                self._chunks.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()


class CompressedSource:
    """The decompressed archive, read by position; `size` is UNKNOWN_SIZE until the stream's end is known."""

    blocking = True  # a read may decompress: the daemon serves cache misses from threads (fs.ServedFile)

    def __init__(self, archive: ByteSource, compression: str, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.path = archive.path
        self.compression = compression
        self.archive = archive
        self.cache = ChunkCache(cache_size)
        self._open_decoder = DECODERS[compression]
        self._lock = threading.Lock()  # guards _decoder: library objects are not thread-safe
        self._decoder: Decoder | None = None
        self._index: bytes | None = None  # a complete index to give every decoder this source opens
        self._size: int | None = None
        self._broken: CorruptCompressed | None = None
        with self._lock:
            try:
                self._size = self._decoder_locked().complete_size()
            except DECODE_ERRORS as exc:
                raise CorruptCompressed(f"the {compression} stream cannot be opened: {exc}", 0) from None

    @property
    def size(self) -> int:
        return UNKNOWN_SIZE if self._size is None else self._size

    @property
    def size_known(self) -> bool:
        return self._size is not None

    def new_decoder(self) -> Decoder:
        """Open another decoder over the same file (the background pass has its own)."""
        if isinstance(self.archive, ArchiveFile):
            decoder = self._open_decoder(f"/proc/self/fd/{self.archive.fd}")  # the very file we opened
        else:
            decoder = self._open_decoder(PreadFile(self.archive))
        if self._index is not None:
            decoder.import_index(self._index)
        return decoder

    def _decoder_locked(self) -> Decoder:
        if self._decoder is None:
            self._decoder = self.new_decoder()
        return self._decoder

    def load_index(self, blob: bytes, size: int) -> None:
        """Give this source a complete index (from an index file); raise ValueError if it is unusable."""
        with self._lock:
            decoder = self._decoder_locked()
            decoder.import_index(blob)
            self._index, self._size = blob, size

    def adopt(self, decoder: Decoder, size: int) -> None:
        """Serve from now on through `decoder`, whose index is complete (the background pass's)."""
        with self._lock:
            old, self._decoder, self._size = self._decoder, decoder, size
        if old is not None:
            old.close()

    def mark_broken(self, error: CorruptCompressed) -> None:
        """Fail every later read: the stream was found corrupt, so no decompressed byte can be trusted."""
        self._broken = error

    def drop_decoder(self) -> None:
        """Close the decoder (and its threads) before a fork; the next read opens a new one."""
        with self._lock:
            if self._decoder is not None:
                self._decoder.close()
                self._decoder = None

    def cached(self, offset: int, size: int) -> bool:
        """Whether [offset, offset + size) is in the cache, so reading it costs no decompression."""
        return all(i in self.cache for i in range(offset // CHUNK_SIZE, -(-(offset + size) // CHUNK_SIZE)))

    def chunk(self, index: int) -> bytes:
        """The decompressed chunk `index` (short at the end of the stream, empty past it)."""
        found = self.cache.get(index)
        if found is not None:
            return found
        start = index * CHUNK_SIZE
        if self._size is not None and start >= self._size:
            return b""
        with self._lock:
            found = self.cache.get(index)  # another thread may have decompressed it while we waited
            if found is not None:
                return found
            decoder = self._decoder_locked()
            try:
                data = decoder.read_at(start, CHUNK_SIZE)
            except TarfuseError:  # the source failed (a remote read): the decoder may be left unusable
                decoder.close()
                self._decoder = None
                raise
            except DECODE_ERRORS as exc:
                raise CorruptCompressed(
                    f"the {self.compression} stream cannot be decompressed: {exc}", start
                ) from None
        self.cache.put(index, data)
        return data

    def pread(self, size: int, offset: int) -> bytes:
        parts = []
        end = min(offset + size, self.size)
        while offset < end:
            index, skip = divmod(offset, CHUNK_SIZE)
            chunk = self.chunk(index)[skip : skip + end - offset]
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
        return b"".join(parts)

    def pread_into(self, buffer: memoryview, offset: int) -> int:
        data = self.pread(len(buffer), offset)
        buffer[: len(data)] = data
        return len(data)

    def check_unchanged(self) -> None:
        """Raise if the archive file changed, or if the stream was found corrupt since."""
        self.archive.check_unchanged()
        if self._broken is not None:
            raise self._broken

    def close(self) -> None:
        self.drop_decoder()
        self.archive.close()

    def __enter__(self) -> "CompressedSource":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


Source = TypeVar("Source", bound=ByteSource)


def decompressed(archive: Source, cache_size: int = DEFAULT_CACHE_SIZE) -> Source | CompressedSource:
    """The archive as the tar reader must see it: itself, or a decompressed view chosen by its magic number.

    On failure the archive is closed.
    """
    try:
        compression = sniff(archive.pread(8, 0))
        if compression is None:
            return archive
        return CompressedSource(archive, compression, cache_size)
    except BaseException:
        archive.close()
        raise
