"""Random-access byte sources over compressed archives: gzip, bzip2, zstd and xz.

A `CompressedSource` offers the plain file's interface (`size`, `read_at`, `pread_into`, `check_unchanged`,
`close`) over the *decompressed* archive, so the tar reader, sparse maps and mapper run unchanged on top.
The decompressors (decoders.py) are libraries made for seeking (docs/compressed.md says why these): they
keep checkpoints of decompressor state, made as the stream is first decompressed, so a later read
decompresses only from the nearest one. A stream with no restart point but its start (one zstd frame, one
xz block) is served, once the background pass has copied it, from its spill (spill.py). Reads are served in
whole chunks from a bounded cache of decompressed chunks. dictzip, random access from its first read, is
a source of its own (dictzip.DictzipSource); `decompressed` chooses.
"""

import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from tarfuse.errors import ArchiveError, CompressedArchive, CorruptCompressed, TarfuseError
from tarfuse.sources import DEFAULT_CACHE_SIZE
from tarfuse.sources.compression import (
    DEFAULT_DECODER_MEMORY,
    Compression,
    DecodeError,
    DecoderMemoryError,
    decoder_share,
    sniff,
)
from tarfuse.sources.decoders import Decoder, open_spill, opener, release_freed_memory
from tarfuse.sources.file import (
    Background,
    ByteSource,
    Identity,
    IndexHome,
    PreadFile,
    SourceDefaults,
    StreamOfArchive,
)
from tarfuse.sources.gztable import LazyWindows

UNKNOWN_SIZE = 1 << 62  # the size until the stream's end is known: reads past the real end come back short
CHUNK_SIZE = 1 << 20  # the unit of decompression and of the cache
_ZERO_CHUNK = bytes(CHUNK_SIZE)  # the one copy the cache keeps of every chunk of zeros


class ChunkCache:
    """A bounded LRU of decompressed chunks, shared by threads."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # bytes (-o cache_size, or its share)
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
        if len(chunk) == CHUNK_SIZE and chunk == _ZERO_CHUNK:  # a zero-filled image: no memory per chunk
            chunk = _ZERO_CHUNK
        with self._lock:
            self.misses += 1
            self._chunks[index] = chunk
            while len(self._chunks) > self._slots:
                self._chunks.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()

    def resize(self, capacity: int) -> None:
        """Keep at most `capacity` bytes from now on (mount.py shares one budget among the layers)."""
        with self._lock:
            self.capacity, self._slots = capacity, max(1, capacity // CHUNK_SIZE)
            while len(self._chunks) > self._slots:
                self._chunks.popitem(last=False)


class CompressedSource(StreamOfArchive, SourceDefaults):
    """The decompressed archive, read by position; `size` is UNKNOWN_SIZE until the stream's end is known."""

    blocking = True  # a read may decompress: the daemon serves misses from threads (ServedFile.blocking)
    # ... from one thread: a miss waits for the one decoder anyway, and each thread that handled 1 MiB
    # chunks kept its own glibc malloc arena (docs/benchmarks.md, "Figures behind the code").
    readers = 1
    background = Background.INDEX

    def __init__(
        self,
        archive: ByteSource,
        compression: Compression,
        cache_size: int = DEFAULT_CACHE_SIZE,
        decoder_memory: int = DEFAULT_DECODER_MEMORY,
    ) -> None:
        """`cache_size`: bytes of decompressed chunks kept; `decoder_memory`: what this source's decoders
        (the pass's and the serving one) may claim."""
        self.path = archive.path
        self.archive = archive
        self.compression: Compression | None = compression
        self.index_home: IndexHome = archive.index_home  # the index is of the archive under it
        self.cache = ChunkCache(cache_size)
        self.cache_capacity = cache_size
        local = archive.local_fd is not None
        head = lambda n: archive.read_at(0, min(archive.size, n))  # noqa: E731
        self._open_decoder = opener(compression, decoder_share(decoder_memory), local, head)
        self._lock = threading.Lock()  # guards _decoder: library objects are not thread-safe
        self._decoder: Decoder | None = None
        self._index: bytes | None = None  # a complete index to give every decoder this source opens
        self._lazy: LazyWindows | None = None  # ... or one whose windows come as reads need them
        self._spill: str | None = None  # serve from this seekable copy (spill.py) rather than the archive
        self._spill_file: BinaryIO | None = None  # ... read through this file, open while it is served
        self._size: int | None = None
        self._broken: ArchiveError | None = None
        with self._lock:
            try:
                self._size = self._decoder_locked().complete_size()
            except DecodeError as exc:
                raise CorruptCompressed(f"the {compression} stream cannot be opened: {exc}", 0) from None

    @property
    def size(self) -> int:
        return UNKNOWN_SIZE if self._size is None else self._size

    @property
    def size_known(self) -> bool:
        return self._size is not None

    def identity(self) -> Identity:
        """The compressed archive's: a local file's device, inode, size and mtime; a URL's name, size,
        ETag and Last-Modified."""
        return self.archive.identity()

    @property
    def spill(self) -> str | None:
        """The spill that reads are served from, if any (its path, or /proc/self/fd/N if unnamed)."""
        return self._spill

    def spill_size(self) -> int | None:
        """The length of the spill served from, if any (tarfuse --status)."""
        file = self._spill_file
        if file is None:
            return None
        try:
            return os.fstat(file.fileno()).st_size
        except (OSError, ValueError):  # closed under us by close()
            return None

    def new_decoder(self, serving: bool = False) -> Decoder:
        """Open another decoder over the same file (the background pass has its own); `serving`: the one
        that serves reads until the pass's replaces it (adopt), for gzip with the smallest chunks."""
        fd = self.archive.local_fd
        file = PreadFile(self.archive) if fd is None else f"/proc/self/fd/{fd}"  # the very file we opened
        decoder = self._open_decoder(file, serving)
        if self._index is not None:
            decoder.import_index(self._index)
        return decoder

    def _decoder_locked(self) -> Decoder:
        if self._decoder is None:
            if self._spill_file is None:
                self._decoder = self.new_decoder(serving=True)
            else:
                self._decoder = open_spill(self._spill_file)
        return self._decoder

    def needs_spill(self) -> bool:
        """Whether a backwards read would decompress from the start: no spill, one zstd frame or xz block."""
        with self._lock:
            return self._spill is None and self._decoder_locked().single_stream()

    def serve_spill(self, path: str, size: int, file: BinaryIO, check_start: bool = False) -> None:
        """Serve from now on from the spill `file` (shown as `path`); raise DecodeError if it is not right.

        The source owns `file` once this returns (it is closed with the source) and reads it through its
        descriptor, never by name: the file checked or written is the file read. Wrong: it does not hold
        `size` bytes, or, with `check_start`, its first chunk is not what the archive decompresses to (a
        cheap check against an archive rewritten with its size and mtime kept, or a spill of another).
        """
        decoder = open_spill(file)
        try:
            if (found := decoder.complete_size()) != size:  # a spill has its seek table, which gives the size
                raise DecodeError(f"it holds {found} bytes, not {size}")
            if check_start and self._spill is None:
                self._check_spill_start(decoder)
        except BaseException:
            decoder.close()
            raise
        with self._lock:
            old, self._decoder, self._size = self._decoder, decoder, size
            old_file, self._spill, self._spill_file = self._spill_file, path, file
        if old is not None:
            old.close()
        if old_file is not None:
            old_file.close()

    def _check_spill_start(self, spill: Decoder) -> None:
        """Raise DecodeError unless the spill's first chunk is the archive's (decompressed from its start)."""
        expected = self.chunk(0)  # from the archive: no spill is served yet; cached for the headers
        if spill.read_at(0, len(expected)) != expected:
            raise DecodeError(f"its first {len(expected)} bytes are not the archive's")

    def load_index(self, blob: bytes, size: int) -> None:
        """Give this source a complete index (from an index file); raise DecodeError if it is unusable."""
        with self._lock:
            decoder = self._decoder_locked()
            decoder.import_index(blob)
            self._index, self._size = blob, size

    def load_lazy_index(self, windows: LazyWindows, size: int) -> None:
        """Give this source a gzip index whose windows come as reads need them (a published index's,
        gztable.py): before each chunk is decompressed, the decoder gets the points it needs."""
        with self._lock:
            self._lazy, self._size = windows, size
            self._use_index_locked(windows.covering(0, CHUNK_SIZE) or windows.blob())

    def _use_index_locked(self, blob: bytes) -> None:
        """Decode with `blob` from now on: the decoder is opened again with it (rapidgzip keeps the points
        it had), which a DecodeError of the import says is unusable."""
        self._index = blob
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self._decoder_locked()

    def adopt(self, decoder: Decoder, size: int) -> None:
        """Serve from now on through `decoder`, whose index is complete (the background pass's)."""
        with self._lock:
            old, self._decoder, self._size = self._decoder, decoder, size
        if old is not None:
            old.close()
            release_freed_memory()

    def mark_broken(self, error: ArchiveError) -> None:
        """Fail every later read with `error`: the stream was found corrupt, so no decompressed byte can be
        trusted, or what is served turned out not to be what tar -x extracts."""
        self._broken = error

    def before_fork(self) -> None:
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
            try:
                if self._lazy is not None and (blob := self._lazy.covering(start, start + CHUNK_SIZE)):
                    self._use_index_locked(blob)  # the points this chunk needs, fetched (gztable.py)
                data = self._decoder_locked().read_at(start, CHUNK_SIZE)
            except TarfuseError:  # the source failed (a remote read): the decoder may be left unusable
                if self._decoder is not None:
                    self._decoder.close()
                self._decoder = None
                raise
            except DecoderMemoryError as exc:
                raise CompressedArchive(str(exc), start) from None
            except DecodeError as exc:
                what = f"the {self.compression} stream" if self._spill is None else f"the spill {self._spill}"
                raise CorruptCompressed(f"{what} cannot be decompressed: {exc}", start) from None
        self.cache.put(index, data)
        return data

    def read_at(self, offset: int, size: int) -> bytes:
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
        data = self.read_at(offset, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def check_unchanged(self) -> None:
        """Raise if the archive file changed, or if the stream was found corrupt since."""
        self.archive.check_unchanged()
        if self._broken is not None:
            raise self._broken

    def close(self) -> None:
        self.before_fork()
        if self._spill_file is not None:
            self._spill_file.close()
        self.archive.close()

    def __enter__(self) -> "CompressedSource":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


if TYPE_CHECKING:
    from tarfuse.sources.dictzip import DictzipSource

Source = TypeVar("Source", bound=ByteSource)


def decompressed(
    archive: Source, cache_size: int = DEFAULT_CACHE_SIZE, decoder_memory: int = DEFAULT_DECODER_MEMORY
) -> "Source | CompressedSource | DictzipSource":
    """The archive as the tar reader must see it: itself, or a decompressed view chosen by its magic number
    (a gzip stream with dictzip's table of chunks is read at random at once). `cache_size`: what the
    decompressed view may keep of the mount's cache budget. On failure the archive is closed.
    """
    try:
        compression = sniff(archive.read_at(0, 8))
        if compression is None:
            return archive
        if compression == "gzip":
            from tarfuse.sources import dictzip  # only a gzip stream may be dictzip

            if dictzip.has_random_access_table(archive):
                return dictzip.DictzipSource(archive)
        return CompressedSource(archive, compression, cache_size, decoder_memory)
    except BaseException:
        archive.close()
        raise
