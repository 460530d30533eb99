"""One mount, put together: the source under the archive, the image in it, and the file FUSE serves.

cli.py reads the command line into MountOptions and hands them here; the FUSE side (serve/) gets back a
ServedFile and, for a compressed archive, the background job. A read runs serve.fs → ServedFile.read
(built here) → image.mapper → the source. What a source can do is asked through its protocol
(sources.file.ByteSource); only what exists for compressed archives alone (seek index, chunk cache) asks
for a CompressedSource.
"""

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from tarfuse.errors import TarfuseError
from tarfuse.image.mapper import HOLE, ImageMapper
from tarfuse.image.open import Image, list_images, open_first_image, open_image
from tarfuse.serve.daemon import BackgroundJob
from tarfuse.serve.fs import BLOCKING_READERS, ServedFile
from tarfuse.sources import DEFAULT_CACHE_SIZE, compressed, remote
from tarfuse.sources.compressed import CompressedSource
from tarfuse.sources.compression import Compression
from tarfuse.sources.file import ArchiveFile, ByteSource

_MAX_REQUEST = 1 << 20  # FUSE reads are at most max_pages (256) pages long; larger ones get their own buffer
_REMOTE_SHARE = 4  # a compressed archive on a URL: a quarter of the cache for its compressed blocks


@dataclass
class MountOptions:
    """The -o options, split into ours and the ones handed to libfuse."""

    member: str | None = None
    uid: int | None = None
    gid: int | None = None
    umask: int = 0o222
    fsname: str | None = None
    readahead_kb: int = 4096  # measured: 1 MiB requests, several in flight (docs/benchmarks.md)
    cache_size: int = DEFAULT_CACHE_SIZE
    fuse: set[str] = field(default_factory=set)
    remote: list[str] = field(default_factory=list)  # header=, ca_file=, ... for http(s) archives
    index: str | None = None  # where a compressed archive's seek index is kept (default: index.py)
    noindex: bool = False  # keep no index on disk


@dataclass(frozen=True)
class Listing:
    """What `tarfuse --list` shows."""

    compression: Compression | None
    index: str | None  # the saved index that a mount would use, if any
    images: list[Image]


@dataclass
class Assembly:
    """A mount's parts, ready for the FUSE side."""

    source: ByteSource
    image: Image
    served: ServedFile
    background: BackgroundJob | None  # a compressed archive's indexing pass

    @property
    def workers(self) -> int:
        """FUSE worker tasks: one for a source whose reads never wait, else one per reader thread."""
        return BLOCKING_READERS if self.source.blocking else 1

    def before_fork(self) -> None:
        """Drop what does not survive fork(): a decoder's threads (the daemon opens its own)."""
        if isinstance(self.source, CompressedSource):
            self.source.drop_decoder()

    def close(self) -> None:
        self.source.close()  # rapidgzip aborts the interpreter if its threads outlive it


def open_source(path: str, options: MountOptions) -> ByteSource:
    """The archive as the tar reader must see it: a file or URL, decompressed if it is compressed.

    One cache budget, `-o cache_size`, whatever the layers: a compressed archive on a URL gives a quarter
    to the compressed blocks under the decompressor and the rest to decompressed chunks.
    """
    archive = remote.open_source(path, options.remote, options.cache_size)
    if not remote.is_url(path):
        return compressed.decompressed(archive, options.cache_size)
    blocks = options.cache_size // _REMOTE_SHARE
    source = compressed.decompressed(archive, options.cache_size - blocks)
    if source is not archive and isinstance(archive, remote.RemoteArchive):
        archive.resize_cache(blocks)
    return source


def list_archive(path: str, options: MountOptions) -> Listing:
    """Every candidate image, and for a compressed archive the saved index a mount would use."""
    compression = found = None
    with contextlib.closing(open_source(path, options)) as source:
        if isinstance(source, CompressedSource):
            from tarfuse.sources import index  # with pyzstd (its spill): only compressed archives need it

            compression = source.compression
            where = index_path(source, options)
            found = where if where is not None and index.use_saved_index(where, source) else None
        images = list_images(source.read_at, source.size)
    return Listing(compression, found, images)


def assemble(path: str, options: MountOptions) -> Assembly:
    """Open the archive and its image, and build the file to serve; on failure nothing stays open."""
    source = open_source(path, options)
    try:
        background = None
        if isinstance(source, CompressedSource):
            image, background = _open_compressed(source, options)
        else:
            image = open_image(source.read_at, source.size, options.member, source.pread_into)
        return Assembly(source, image, _served_file(image, source, options), background)
    except BaseException:
        source.close()
        raise


def index_path(source: CompressedSource, options: MountOptions) -> str | None:
    """Where the seek index of `source` is kept; None: nowhere (-o noindex, or no safe place)."""
    from tarfuse.sources import index

    if options.noindex:
        return None
    beside = isinstance(source.archive, ArchiveFile)  # a URL's index goes to the cache, never "beside" it
    return options.index or index.default_path(source.path, source.identity(), beside)


def _open_compressed(source: CompressedSource, options: MountOptions) -> tuple[Image, BackgroundJob | None]:
    """Open the image as soon as its headers are decompressed; index the rest in the background.

    With a complete index (a saved one, or xz's and seekable zstd's own) every header is cheap to reach:
    open as for a plain archive. Otherwise serve the first candidate, and let the background pass look for
    others. A stream with no restart point but its start gets the pass too, for its spill.
    """
    from tarfuse.sources import index

    where = index_path(source, options)
    if where is not None and (not source.size_known or source.needs_spill()):
        index.use_saved_index(where, source)  # gives the size, or serves from the spill
    complete = source.size_known
    if complete and not source.needs_spill():
        return open_image(source.read_at, source.size, options.member, source.pread_into), None
    opener = open_image if complete else open_first_image
    image = opener(source.read_at, source.size, options.member, source.pread_into)
    indexing = index.IndexingPass(
        source,
        image.name,
        where,
        scan=not complete,
        served_header=None if complete else image.member.header_offset,
    )
    return image, BackgroundJob(indexing.run, indexing.status, lambda: indexing.progress.done)


def _cached(mapper: ImageMapper, source: CompressedSource) -> Callable[[int, int], bool]:
    """Whether an image read needs no decompression: all holes, or all in the chunk cache."""

    def ready(offset: int, size: int) -> bool:
        return all(p == HOLE or source.cached(p, n) for p, n in mapper.plan(offset, size))

    return ready


def _served_file(image: Image, source: ByteSource, options: MountOptions) -> ServedFile:
    mapper = image.mapper
    # One buffer serves every request: handlers run one at a time on the trio loop, and pyfuse3 copies
    # the reply to the kernel before the next request is read (see ImageFs.read). Blocking sources are
    # read from several threads at once: each read gets its own buffer.
    buffer = memoryview(bytearray(0 if source.blocking else _MAX_REQUEST))

    def read(offset: int, size: int) -> memoryview:
        view = buffer[:size] if size <= len(buffer) else memoryview(bytearray(size))
        try:
            filled = mapper.read_into(view, offset)
        except TarfuseError:
            source.check_unchanged()  # a read cut short by a truncated archive: name the cause
            raise
        source.check_unchanged()  # after the read: a change before it or during it is caught
        return view[:filled]

    return ServedFile(
        name=os.path.basename(image.name.rstrip("/")) or "image",
        size=mapper.size,
        mtime_ns=image.member.mtime * 1_000_000_000,
        stored_bytes=image.stored_bytes,
        read=read,
        xattrs={
            "user.tarfuse.member": os.fsencode(image.name),
            "user.tarfuse.format": image.format.driver.encode(),
            "user.tarfuse.archive": os.fsencode(remote.display_name(source.path)),
        },
        uid=os.getuid() if options.uid is None else options.uid,
        gid=os.getgid() if options.gid is None else options.gid,
        umask=options.umask,
        blocking=source.blocking,
        ready=_cached(mapper, source) if isinstance(source, CompressedSource) else None,
        readers=source.readers,
    )
