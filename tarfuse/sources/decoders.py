"""The decompression libraries behind a CompressedSource, each as a `Decoder`: gzip and bzip2 (rapidgzip),
zstd (zstdframes.py), xz (python-xz), and the spill's zstd.

Every decoder gets a share of the mount's decoder memory (-o decoder_memory; compression.decoder_share):
liblzma's memlimit, zstd's windowLogMax, and for rapidgzip a chunk size that its cache of decompressed
chunks fits in. A stream that needs more is refused with a line that names the limit and the option.
Library file objects are not thread-safe (seek + read): their CompressedSource holds a lock around them.
"""

import contextlib
import gc
import io
import lzma
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, Protocol, cast

from tarfuse.sources.compression import (
    DEFAULT_DECODER_MEMORY,
    Compression,
    DecodeError,
    decoder_share,
    memory_refusal,
)
from tarfuse.sources.file import PreadFile

# rapidgzip's chunk, and so its checkpoint spacing, in compressed bytes (its default is 4 MiB). It caches up
# to 16 decompressed chunks and decompresses a whole chunk to serve one byte of it: a smaller chunk cut the
# daemon's peak RSS and the p95 of random reads, indexing as fast. Over http(s) a read fetches whole
# chunks, so smaller still there; locally that made indexing slower (docs/compressed.md).
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
    prefetch): on a stream of ratio 4 or more that outgrows a decoder's share at its default chunk. The
    smallest chunk is the smallest that held (rapidgzip 0.16 fails a cut stream with "block offset index
    is out of sync" below it, where it ends short at it as at 2 MiB; the peaks by chunk size are in
    docs/benchmarks.md, "Figures behind the code"). The watch sees the start of
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


def open_spill(file: BinaryIO) -> Decoder:
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


# The decoders of the compressions other than gzip (whose decoders share a GzipRatioWatch of their source):
# (path, the memory the decoder may claim) -> decoder.
DECODERS: dict[Compression, Callable[[str | PreadFile, int], Decoder]] = {
    "bzip2": _open_bzip2,
    "zstd": _open_zstd,
    "xz": _XzDecoder,
}


def opener(
    compression: Compression, share: int, local: bool, head: Callable[[int], bytes]
) -> Callable[["str | PreadFile", bool], Decoder]:
    """How a source opens its decoders: (the file, whether it serves reads) -> a Decoder.

    `share`: the memory each may claim; `local`: the file is on this machine (gzip's chunk is larger);
    `head(n)`: the first n compressed bytes, which tell gzip how well the stream compresses.
    """
    if compression == "gzip":
        watch = GzipRatioWatch(gzip_chunk_for(GZIP_CHUNK_SIZE if local else GZIP_REMOTE_CHUNK_SIZE, share))
        watch.probe(head(_GZIP_PROBE))
        return lambda path, serving: _GzipDecoder(path, watch, serving)
    return lambda path, _: DECODERS[compression](path, share)
