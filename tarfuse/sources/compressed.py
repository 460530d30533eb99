"""Random-access byte sources over compressed archives: gzip, bzip2, zstd and xz.

A `CompressedSource` offers the plain file's interface (`size`, `read_at`, `pread_into`, `check_unchanged`,
`close`) over the *decompressed* archive, so the tar reader, sparse maps and mapper run unchanged on top.
The decompressors are libraries made for seeking (docs/compressed.md says why these): they keep checkpoints
of decompressor state, made as the stream is first decompressed, so a later read decompresses only from the
nearest one; zstd is ours (zstdframes.py: frame starts). A stream with no restart point but its start (one
zstd frame, one xz block) is served, once the background pass has copied it, from its spill (spill.py).
Reads are served in whole chunks from a bounded cache of decompressed chunks.

Every decoder gets a share of the mount's decoder memory (-o decoder_memory; compression.decoder_share):
liblzma's memlimit, zstd's windowLogMax, and for rapidgzip a chunk size that its cache of decompressed
chunks fits in. A stream that needs more is refused with a line that names the limit and the option.

Library file objects are not thread-safe (seek + read), so each sits behind a lock. A local archive is
opened by path; any other source (remote.RemoteArchive) through a `PreadFile`, for the libraries that take
file objects.
"""

import contextlib
import gc
import io
import lzma
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, Protocol, TypeVar, cast

from tarfuse.errors import ArchiveError, CompressedArchive, CorruptCompressed, TarfuseError
from tarfuse.sources import DEFAULT_CACHE_SIZE
from tarfuse.sources.compression import (
    DEFAULT_DECODER_MEMORY,
    Compression,
    DecodeError,
    DecoderMemoryError,
    decoder_share,
    memory_refusal,
    sniff,
)
from tarfuse.sources.file import ArchiveFile, ByteSource, Identity, PreadFile

UNKNOWN_SIZE = 1 << 62  # the size until the stream's end is known: reads past the real end come back short
CHUNK_SIZE = 1 << 20  # the unit of decompression and of the cache
_ZERO_CHUNK = bytes(CHUNK_SIZE)  # the one copy the cache keeps of every chunk of zeros
# rapidgzip's chunk, and so its checkpoint spacing, in compressed bytes (its default is 4 MiB). It caches up
# to 16 decompressed chunks and decompresses a whole chunk to serve one byte of it: 2 MiB cut the daemon's
# peak RSS and the p95 of random reads, indexing as fast. Over http(s) a read fetches whole chunks, so 1 MiB
# there; locally 1 MiB made indexing 20 % slower (docs/compressed.md).
GZIP_CHUNK_SIZE = 2 << 20
GZIP_REMOTE_CHUNK_SIZE = 1 << 20
# rapidgzip's chunk for a stream that compresses very well (GzipRatioWatch): what it holds stays small.
GZIP_SMALLEST_CHUNK_SIZE = 192 << 10
_HIGH_RATIO = 4  # a span of the stream compressed better than this makes the chunks small
_RATIO_SAMPLE = 4 << 20  # the output of a span, or a chunk's worth of compressed input
_GZIP_PROBE = 256 << 10  # compressed bytes inflated at open to see how well the stream compresses

# What rapidgzip raises on a corrupt or cut stream (gzip and bzip2). Broad, so caught only around calls
# into it (_decoding); zstdframes.py and _XzDecoder catch their libraries' own.
_RAPIDGZIP_ERRORS: tuple[type[Exception], ...] = (ValueError, RuntimeError)


@contextmanager
def _decoding(errors: tuple[type[Exception], ...], prefix: str = "") -> Iterator[None]:
    """Raise what a library raises on a stream it cannot decode (`errors`) as DecodeError.

    Wrap only calls into the library: a ValueError from our own code is a bug, and must not pass for a
    corrupt archive.
    """
    try:
        yield
    except errors as exc:
        raise DecodeError(f"{prefix}{exc}") from exc


class Decoder(Protocol):
    """One library file object over the compressed file: seekable, not thread-safe.

    Data it cannot decode, and an index that does not fit the file, raise DecodeError; errors of the file
    underneath (OSError, a remote source's TarfuseError) pass as they are.
    """

    def read_at(self, offset: int, size: int) -> bytes: ...
    def compressed_position(self) -> int | None: ...  # bytes of the compressed file consumed, if known
    def complete_size(self) -> int | None: ...  # the decompressed size, once the index is complete
    def export_index(self) -> bytes | None: ...  # None: nothing worth keeping (xz keeps its own)
    def import_index(self, blob: bytes) -> None: ...
    def single_stream(self) -> bool: ...  # no restart point known but the start: one zstd frame or xz block
    def close(self) -> None: ...


class _SeekingDecoder:
    """A library file object with seek() and read(); subclasses add the index calls.

    `errors`: what the library raises on a stream it cannot decode, raised again as DecodeError.
    """

    def __init__(self, file: io.IOBase, errors: tuple[type[Exception], ...], prefix: str = "") -> None:
        self._file = file
        self._errors, self._prefix = errors, prefix

    def read_at(self, offset: int, size: int) -> bytes:
        with _decoding(self._errors, self._prefix):
            self._file.seek(offset)
            data = self._file.read(size)
        return bytes(data) if data else b""

    def single_stream(self) -> bool:
        return False  # gzip and bzip2: the libraries checkpoint inside the stream

    def close(self) -> None:
        self._file.close()


def release_freed_memory() -> None:
    """Give back to the system what a closed decoder freed: rapidgzip's threads allocate from malloc
    arenas of their own, which glibc keeps mapped after free() unless told (malloc_trim trims them all)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def gzip_chunk_for(chunk: int, share: int) -> int:
    """rapidgzip's chunk for a decoder whose share of the decoder memory is `share`: what it holds grows
    with its chunk, so a share smaller than the default's (a mount's compressed members divide the budget)
    makes the chunk smaller in proportion, down to GZIP_SMALLEST_CHUNK_SIZE."""
    default = decoder_share(DEFAULT_DECODER_MEMORY)
    if share >= default:
        return chunk
    return max(GZIP_SMALLEST_CHUNK_SIZE, chunk * share // default // 4096 * 4096)


class GzipRatioWatch:
    """Whether the gzip stream of one source compresses so well that rapidgzip must use small chunks.

    rapidgzip cuts a chunk at 16 chunk sizes of output, and holds up to ~19 of them (its cache and its
    prefetch): on a stream of ratio 4 or more that outgrows a decoder's share at its default chunk
    (measured on zeros, one decoder: 2 MiB and 1 MiB chunks 255 MiB, 256 KiB 136, 192 KiB 70 after
    random reads; rapidgzip 0.16 fails a cut stream with "block offset index is out of sync" at 96 and
    128 KiB, where it ends short at 192 KiB as at 2 MiB, so 192 KiB it is). The watch sees the start of
    the stream (probe) and every forward read of the source's decoders (compressed bytes consumed, bytes
    produced); once a span of _RATIO_SAMPLE output came from less than a quarter of it, `chunk_size`
    becomes GZIP_SMALLEST_CHUNK_SIZE for good, and every decoder of the source changes to it at its next
    read. A decoder that only seeks learns nothing itself: the
    pass, which reads the stream forward from its start, teaches it.
    """

    def __init__(self, chunk: int) -> None:
        self.chunk_size = chunk
        self._compressed, self._output = 0, 0  # the span so far

    def probe(self, head: bytes) -> None:
        """Look at the stream's first compressed bytes `head` before rapidgzip decodes a chunk: zlib
        inflates up to _RATIO_SAMPLE of them, 1 MiB at a time, member after member."""
        import zlib

        produced, rest = 0, head
        while rest and produced < _RATIO_SAMPLE:
            inflate = zlib.decompressobj(31)
            try:
                while rest and not inflate.eof and produced < _RATIO_SAMPLE:
                    produced += len(inflate.decompress(rest, 1 << 20))
                    rest = inflate.unconsumed_tail
            except zlib.error:
                return  # rapidgzip will say what is wrong with it
            rest = rest or inflate.unused_data
        self.saw(len(head) - len(rest), produced)

    def saw(self, compressed: int, produced: int) -> None:
        """A forward read consumed `compressed` more compressed bytes and produced `produced` bytes."""
        if self.chunk_size <= GZIP_SMALLEST_CHUNK_SIZE:
            return
        self._compressed += compressed
        self._output += produced
        if self._output < _RATIO_SAMPLE and self._compressed < self.chunk_size:
            return
        ratio = self._output / max(1, self._compressed)
        self._compressed, self._output = 0, 0
        if ratio > _HIGH_RATIO:
            self.chunk_size = GZIP_SMALLEST_CHUNK_SIZE


class _GzipDecoder(_SeekingDecoder):
    """rapidgzip: a checkpoint every chunk of input (GZIP_*CHUNK_SIZE), exported in gztool's index format.

    gztool's format keeps the 32 KiB windows compressed: a quarter of indexed_gzip's format, and 4x faster
    to import (10 ms for 1.3 MiB); rapidgzip reads either, so older index files still load. Reads feed the
    source's GzipRatioWatch; when it asks for a smaller chunk, the decoder opens rapidgzip again with it
    (losing its checkpoints: a forward pass decompresses up to where it was once more).
    """

    def __init__(self, path: "str | PreadFile", watch: GzipRatioWatch, serving: bool = False) -> None:
        """`serving`: the decoder that serves reads while the pass runs, with the smallest chunks from the
        start: it reads before the watch has learnt anything (the first chunk, at mount), and at random,
        where small chunks cost little; the pass's decoder, which replaces it, makes the saved index."""
        import rapidgzip  # only archives that need it pay for the import

        self._path, self._watch = path, watch
        self._index_format = rapidgzip.IndexFormat.GZTOOL
        self._index: bytes | None = None  # imported: given again to a decoder opened with a smaller chunk
        self._chunk = watch.chunk_size
        self._gz = self._open_rapidgzip()
        self._next = 0  # where a forward read would go on (-1: after a reopen, not yet known)
        super().__init__(self._gz, _RAPIDGZIP_ERRORS)

    def _open_rapidgzip(self) -> "io.IOBase":
        import rapidgzip

        with _decoding(_RAPIDGZIP_ERRORS):
            gz = rapidgzip.RapidgzipFile(self._path, parallelization=1, chunk_size=self._chunk)
            if self._index is not None:
                gz.import_index(io.BytesIO(self._index))
        return cast("io.IOBase", gz)

    def read_at(self, offset: int, size: int) -> bytes:
        if self._watch.chunk_size < self._chunk:
            self._reopen()
        forward, before = offset == self._next, self.compressed_position() or 0
        data = super().read_at(offset, size)
        if forward and data:
            self._watch.saw((self.compressed_position() or 0) - before, len(data))
        self._next = offset + len(data)
        return data

    def _reopen(self) -> None:
        self._gz.close()
        release_freed_memory()
        self._chunk = self._watch.chunk_size
        self._gz = self._file = self._open_rapidgzip()
        self._next = -1

    def compressed_position(self) -> int | None:
        return int(self._gz.tell_compressed()) // 8  # type: ignore[attr-defined]  # rapidgzip counts bits

    def complete_size(self) -> int | None:
        with _decoding(_RAPIDGZIP_ERRORS):
            complete = self._gz.block_offsets_complete()  # type: ignore[attr-defined]
            return int(self._gz.size()) if complete else None  # type: ignore[attr-defined]

    def export_index(self) -> bytes | None:
        out = io.BytesIO()
        with _decoding(_RAPIDGZIP_ERRORS):  # e.g. "All window sizes must be at least 32 KiB" (tiny streams)
            self._gz.export_index(out, self._index_format)  # type: ignore[attr-defined]
        return out.getvalue()

    def import_index(self, blob: bytes) -> None:
        with _decoding(_RAPIDGZIP_ERRORS):
            self._gz.import_index(io.BytesIO(blob))  # type: ignore[attr-defined]
        self._index = blob


class _OffsetsDecoder(_SeekingDecoder):
    """rapidgzip's bzip2 reader: the index is a {compressed bit: decompressed offset} map."""

    def __init__(self, file: io.IOBase, position_unit: int) -> None:
        super().__init__(file, _RAPIDGZIP_ERRORS)
        self._unit = position_unit

    def compressed_position(self) -> int | None:
        return int(self._file.tell_compressed()) // self._unit  # type: ignore[attr-defined]

    def complete_size(self) -> int | None:
        with _decoding(_RAPIDGZIP_ERRORS):
            complete = self._file.block_offsets_complete()  # type: ignore[attr-defined]
            return int(self._file.size()) if complete else None  # type: ignore[attr-defined]

    def export_index(self) -> bytes | None:
        import json  # gzip's index alone: a plain mount does not pay for it

        offsets = self._file.block_offsets()  # type: ignore[attr-defined]
        return json.dumps(sorted(offsets.items())).encode()

    def import_index(self, blob: bytes) -> None:
        import json

        with _decoding((ValueError,)):  # json.JSONDecodeError, UnicodeDecodeError: not an index
            pairs = json.loads(blob)
        if not all(isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p) for p in pairs):
            raise DecodeError("index entries are not pairs of integers")
        with _decoding(_RAPIDGZIP_ERRORS):
            self._file.set_block_offsets(dict(pairs))  # type: ignore[attr-defined]


def _open_bzip2(path: "str | PreadFile", share: int) -> Decoder:
    """rapidgzip's bzip2 reader: bzip2 blocks decompress to at most ~46 MB, whatever `share` says."""
    import rapidgzip

    with _decoding(_RAPIDGZIP_ERRORS):
        file = rapidgzip.IndexedBzip2File(path, parallelization=1)
    return _OffsetsDecoder(file, position_unit=8)


def _open_zstd(path: "str | PreadFile", share: int) -> Decoder:
    from tarfuse.sources.zstdframes import ZstdFrames

    return ZstdFrames(open(path, "rb", buffering=0) if isinstance(path, str) else path, share)


def _open_spill(file: BinaryIO) -> Decoder:
    """A decoder over the spill `file`, with a file position of its own: the same inode, not a name.
    Its frames are 1 MiB (spill.py): no window near any share."""
    return _open_zstd(f"/proc/self/fd/{file.fileno()}", decoder_share(DEFAULT_DECODER_MEMORY))


# python-xz makes each block's decoder as lzma.LZMADecompressor(format=FORMAT_XZ), with no memory limit:
# liblzma then allocates whatever dictionary the block header declares (4 GiB in a 156 KB file). Its
# module's name for the class is pointed at _limited_lzma, which adds the memlimit of the _XzDecoder whose
# read is running in this thread (each decoder reads in one thread at a time, under its source's lock).
_xz_share = threading.local()


def _limited_lzma(format: int = lzma.FORMAT_AUTO, memlimit: int | None = None) -> lzma.LZMADecompressor:
    limit = getattr(_xz_share, "value", None) if memlimit is None else memlimit
    return lzma.LZMADecompressor(format=format, memlimit=limit)


class _XzDecoder(_SeekingDecoder):
    """python-xz: seeks by the block index every xz file ends with; nothing to build or keep.

    One block decoder at a time (python-xz keeps eight by default, each with its dictionary), each made
    with liblzma's memlimit at the decoder's share: a block that declares a larger dictionary is refused.
    """

    def __init__(self, path: "str | PreadFile", share: int) -> None:
        import xz  # imported here, with its XZError: a plain mount does not pay ~15 ms for it
        import xz.block
        from xz.strategy import RollingBlockReadStrategy

        xz.block.LZMADecompressor = _limited_lzma  # type: ignore[attr-defined,assignment]
        self._share = share
        errors = (xz.XZError, lzma.LZMAError)  # python-xz wraps lzma's errors in its own, mostly
        strategy = RollingBlockReadStrategy(max_block_read_nb=1)
        with _decoding(errors, "xz: "):
            file = path if isinstance(path, str) else cast(BinaryIO, path)  # it reads, seeks
            self._xz = xz.open(file, block_read_strategy=strategy)
        super().__init__(self._xz, errors, "xz: ")

    def read_at(self, offset: int, size: int) -> bytes:
        _xz_share.value = self._share
        try:
            return super().read_at(offset, size)
        except DecodeError as exc:
            if "Memory usage limit" in str(exc):
                raise memory_refusal(
                    f"the xz block that holds decompressed byte {offset}", None, self._share
                ) from exc
            raise
        finally:
            _xz_share.value = None

    def compressed_position(self) -> int | None:
        return None

    def complete_size(self) -> int | None:
        return len(self._xz)

    def export_index(self) -> bytes | None:
        return None

    def import_index(self, blob: bytes) -> None:
        pass

    def single_stream(self) -> bool:
        return len(self._xz.block_boundaries) <= 1

    def close(self) -> None:
        """python-xz's file, streams and blocks refer to one another: dropped, their block decoder (with
        its dictionary, up to the decoder's share) would wait for the cyclic garbage collector, and a
        mount that opens decoder after decoder would hold one dictionary more each time until it ran."""
        super().close()
        self._file = self._xz = None  # type: ignore[assignment]
        gc.collect()


class _DictzipDecoder:
    """dictzip: gzip with each chunk's compressed size in its header (RA), so any chunk inflates on its own.

    Random access from the first read, with no pass and no index file; its reads are checked against the
    whole stream's CRC32 only once verify() has read it all (the chunks carry no checksum), which the
    background job of the mount does (index.VerifyPass).
    """

    def __init__(self, archive: ByteSource) -> None:
        from tarfuse.sources.dictzip import DictzipReader

        self._reader = DictzipReader(archive.read_at, archive.size)

    def read_at(self, offset: int, size: int) -> bytes:
        return self._reader.read_at(offset, size)

    def compressed_position(self) -> int | None:
        return None

    def complete_size(self) -> int | None:
        return self._reader.size

    def export_index(self) -> bytes | None:
        return None

    def import_index(self, blob: bytes) -> None:
        pass

    def single_stream(self) -> bool:
        return False

    def verify(self, stopped: Callable[[], bool]) -> bool:
        return self._reader.verify(stopped)

    def close(self) -> None:
        self._reader.close()


# The decoders of the compressions other than gzip (whose decoders share a GzipRatioWatch of their source):
# (path, the memory the decoder may claim) -> decoder.
DECODERS: dict[Compression, Callable[[str | PreadFile, int], Decoder]] = {
    "bzip2": _open_bzip2,
    "zstd": _open_zstd,
    "xz": _XzDecoder,
}


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


class CompressedSource:
    """The decompressed archive, read by position; `size` is UNKNOWN_SIZE until the stream's end is known."""

    blocking = True  # a read may decompress: the daemon serves cache misses from threads (fs.ServedFile)
    # ... from one thread: a miss waits for the one decoder anyway, and each thread that handled 1 MiB
    # chunks kept its own glibc malloc arena (peak RSS of a .tar.gz mount read through: 310-330 MiB with 8
    # threads, 150 with 1, at the same speed).
    readers = 1

    def __init__(
        self,
        archive: ByteSource,
        compression: Compression,
        cache_size: int = DEFAULT_CACHE_SIZE,
        decoder_memory: int = DEFAULT_DECODER_MEMORY,
    ) -> None:
        """`decoder_memory`: what this source's decoders (the pass's and the serving one) may claim."""
        self.path = archive.path
        self.archive = archive
        self.cache = ChunkCache(cache_size)
        share = decoder_share(decoder_memory)
        self._open_decoder: Callable[[str | PreadFile, bool], Decoder]  # (path, serving) -> decoder
        if compression == "gzip" and _has_random_access_table(archive):
            compression = "dictzip"
            self.readers = 4  # its reader is thread-safe and inflates outside its lock
            self._open_decoder = lambda _, __: _DictzipDecoder(archive)
        elif compression == "gzip":
            chunk = GZIP_CHUNK_SIZE if isinstance(archive, ArchiveFile) else GZIP_REMOTE_CHUNK_SIZE
            watch = GzipRatioWatch(gzip_chunk_for(chunk, share))
            watch.probe(archive.read_at(0, min(archive.size, _GZIP_PROBE)))
            self._open_decoder = lambda path, serving: _GzipDecoder(path, watch, serving)
        else:
            self._open_decoder = lambda path, _: DECODERS[compression](path, share)
        self.compression = compression
        self._lock = threading.Lock()  # guards _decoder: library objects are not thread-safe
        self._decoder: Decoder | None = None
        self._index: bytes | None = None  # a complete index to give every decoder this source opens
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

    def new_decoder(self, serving: bool = False) -> Decoder:
        """Open another decoder over the same file (the background pass has its own); `serving`: the one
        that serves reads until the pass's replaces it (adopt), for gzip with the smallest chunks."""
        if isinstance(self.archive, ArchiveFile):
            decoder = self._open_decoder(
                f"/proc/self/fd/{self.archive.fd}", serving
            )  # the very file we opened
        else:
            decoder = self._open_decoder(PreadFile(self.archive), serving)
        if self._index is not None:
            decoder.import_index(self._index)
        return decoder

    def _decoder_locked(self) -> Decoder:
        if self._decoder is None:
            if self._spill_file is None:
                self._decoder = self.new_decoder(serving=True)
            else:
                self._decoder = _open_spill(self._spill_file)
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
        decoder = _open_spill(file)
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

    def adopt(self, decoder: Decoder, size: int) -> None:
        """Serve from now on through `decoder`, whose index is complete (the background pass's)."""
        with self._lock:
            old, self._decoder, self._size = self._decoder, decoder, size
        if old is not None:
            old.close()
            release_freed_memory()

    def verify(self, stopped: Callable[[], bool] = lambda: False) -> bool:
        """Read a dictzip stream whole against its CRC32 (its chunks carry none), with a decoder of its own;
        raise CorruptCompressed if it fails; False if `stopped()` came first. Other formats are checked as
        the indexing pass decompresses them."""
        decoder = self.new_decoder()
        try:
            return not isinstance(decoder, _DictzipDecoder) or decoder.verify(stopped)
        except DecodeError as exc:
            raise CorruptCompressed(f"the {self.compression} stream fails its check: {exc}", None) from None
        finally:
            decoder.close()

    def mark_broken(self, error: ArchiveError) -> None:
        """Fail every later read with `error`: the stream was found corrupt, so no decompressed byte can be
        trusted, or what is served turned out not to be what tar -x extracts."""
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
            except DecoderMemoryError as exc:
                raise CompressedArchive(str(exc), start) from None
            except DecodeError as exc:
                what = f"the {self.compression} stream" if self._spill is None else f"the spill {self._spill}"
                raise CorruptCompressed(f"{what} cannot be decompressed: {exc}", start) from None
        self.cache.put(index, data)
        return data

    def read_at(self, offset: int, size: int) -> bytes:
        if self.compression == "dictzip":
            return self._read_random_access(offset, size)
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

    def _read_random_access(self, offset: int, size: int) -> bytes:
        """dictzip: its reader inflates only the chunks (~57 KiB) a read needs, from any thread, with a
        cache of its own; this source's 1 MiB chunks would inflate 18 of them for a 4 KiB read (measured:
        205 random 4 KiB reads/s that way, 2,985 straight)."""
        with self._lock:
            decoder = self._decoder_locked()
        try:
            return decoder.read_at(offset, max(0, min(size, self.size - offset)))
        except DecodeError as exc:
            raise CorruptCompressed(f"the dictzip stream cannot be decompressed: {exc}", offset) from None

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
        self.drop_decoder()
        if self._spill_file is not None:
            self._spill_file.close()
        self.archive.close()

    def __enter__(self) -> "CompressedSource":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _has_random_access_table(archive: ByteSource) -> bool:
    """Whether a gzip file is dictzip: its header's RA table (a broken one is CorruptCompressed)."""
    from tarfuse.sources import dictzip

    try:
        return (
            dictzip.parse_header(archive.read_at(0, min(dictzip.HEADER_READ_SIZE, archive.size))) is not None
        )
    except DecodeError as exc:
        raise CorruptCompressed(f"the dictzip table cannot be used: {exc}", 0) from None


Source = TypeVar("Source", bound=ByteSource)


def decompressed(
    archive: Source, cache_size: int = DEFAULT_CACHE_SIZE, decoder_memory: int = DEFAULT_DECODER_MEMORY
) -> Source | CompressedSource:
    """The archive as the tar reader must see it: itself, or a decompressed view chosen by its magic number.

    On failure the archive is closed.
    """
    try:
        compression = sniff(archive.read_at(0, 8))
        if compression is None:
            return archive
        return CompressedSource(archive, compression, cache_size, decoder_memory)
    except BaseException:
        archive.close()
        raise
