"""One mount, put together: the source under the archive, the image in it, and the file FUSE serves.

cli.py reads the command line into MountOptions and hands them here; the FUSE side (serve/) gets back a
ServedFile and, for a compressed archive, the background job. A read runs serve.fs → ServedFile.read
(built here) → image.mapper → the source. What a source can do is asked through its protocol
(sources.file.ByteSource); only what exists for compressed archives alone (seek index, chunk cache) asks
for a CompressedSource.
"""

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from tarfuse.errors import (
    ArchiveError,
    CompressedArchive,
    CorruptCompressed,
    NoImage,
    TarfuseError,
    UsageError,
)
from tarfuse.image import bare, links
from tarfuse.image.detect import HEAD_SIZE, has_image_suffix
from tarfuse.image.mapper import HOLE, ImageMapper
from tarfuse.image.open import Image, list_files, list_images, open_first_image, open_image
from tarfuse.printable import printable
from tarfuse.serve.daemon import BackgroundJob
from tarfuse.serve.fs import BLOCKING_READERS, ServedFile
from tarfuse.sources import DEFAULT_CACHE_MAX, DEFAULT_CACHE_SIZE, compressed, remote
from tarfuse.sources.compressed import CompressedSource
from tarfuse.sources.compression import DEFAULT_DECODER_MEMORY, Compression, compression_of, sniff
from tarfuse.sources.file import ArchiveFile, ByteSource
from tarfuse.sources.member import MemberSource
from tarfuse.tar import sparse
from tarfuse.tar.files import Candidate

_PROGRESS_EVERY = 5.0  # seconds between progress lines while a stream is decompressed for its size
_REMOTE_SHARE = 4  # a compressed archive on a URL: a quarter of the cache for its compressed blocks
# -o max_ratio: a stream decompressed for its size before the mount is refused past this many times its
# compressed size (and index.RATIO_FLOOR). gzip cannot pass ~1,030; images with data stay far below; a
# blank file system compressed by bzip2 or zstd goes beyond (docs/compressed.md).
DEFAULT_MAX_RATIO = 10_000
MAX_WORKERS = 64  # -o workers=: more processes than this is a typo, not a plan
# The default -o workers: one process per CPUS_PER_WORKER CPUs this process may run on, at least one and at
# most DEFAULT_WORKERS_MAX. A request costs the server about as much CPU as it costs the reader's side,
# so a worker is kept busy by about one CPU of readers, and the VM being served needs CPUs of its own.
# On 2 vCPUs, where this gives 1, two processes served 4 readers slower than one (more context switches
# per request, and nothing idle to run them on). On bigger hosts the formula is a paper estimate. Figures:
# docs/benchmarks.md, "Serving from several processes".
CPUS_PER_WORKER = 4
DEFAULT_WORKERS_MAX = 8
# The most files one mount serves (-o all, or every disk image on a directory mount point). Each costs
# about 1.6 KB while served: 100,000 from a plain local tar stay under the 256 MiB ceiling
# (tests/test_many_files.py measures it); beside a compressed or remote archive's chunk cache and
# decoders, a quarter of that. The archive's 250,000 members (tar.files.MAX_MEMBERS) would not fit: past
# the bound, the mount is refused before the files are opened.
MAX_SERVED_FILES = 100_000
MAX_SERVED_FILES_CACHED = 25_000


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
    all_files: bool = False  # -o all: every regular file, not only the disk images
    nonempty: bool = False  # -o nonempty: mount over a file that has bytes of its own
    workers: int | None = None  # -o workers=N: processes serving the mount (None: Assembly.processes)
    max_ratio: int = DEFAULT_MAX_RATIO  # -o max_ratio=N: bound of the wait for a stream's size (0: none)
    spill_max: int | None = None  # -o spill_max=SIZE: the longest spill (None: spill.default_limit)
    cache_max: int = DEFAULT_CACHE_MAX  # -o cache_max=SIZE: what the cache directory may hold
    decoder_memory: int = DEFAULT_DECODER_MEMORY  # -o decoder_memory=SIZE: all decoders' windows, together


@dataclass(frozen=True)
class Listing:
    """What `tarfuse --list` shows."""

    compression: Compression | None
    index: str | None  # the saved index that a mount would use, if any
    images: list[Image]


def default_workers(cpus: int) -> int:
    """The -o workers default for a process that may run on `cpus` CPUs (taskset and cpusets count)."""
    return max(1, min(DEFAULT_WORKERS_MAX, cpus // CPUS_PER_WORKER))


@dataclass
class Assembly:
    """A mount's parts, ready for the FUSE side: one served file per image (several: a multi-disk archive
    on a directory mount point), the sources under them, and the background job."""

    archive: ByteSource  # the archive as the tar reader sees it (decompressed if compressed)
    images: list[Image]
    served: list[ServedFile]
    background: BackgroundJob | None  # a compressed archive's indexing pass
    members: list[CompressedSource] = field(default_factory=list)  # compressed members, decompressed
    notes: tuple[str, ...] = ()  # what the command should tell the user
    symlinks: list[tuple[str, str]] = field(default_factory=list)  # -o all: (path, target) in the mount

    @property
    def image(self) -> Image:
        return self.images[0]

    @property
    def tasks(self) -> int:
        """FUSE worker tasks: one if no read ever waits, else one per reader thread."""
        return BLOCKING_READERS if any(s.blocking for s in self.served) else 1

    @property
    def shareable(self) -> bool:
        """Whether several processes can serve the mount: every read a stateless pread through a fixed map.

        A compressed archive's chunk cache and indexing pass, and an http(s) archive's block cache and
        connections, live in one process: copies in several would each fill their own.
        """
        return self.background is None and not self.members and not any(s.blocking for s in self.served)

    def processes(self, asked: int | None) -> int:
        """How many processes serve the mount: `asked` (-o workers), else the default; 1 if not shareable."""
        if not self.shareable:
            return 1
        return default_workers(len(os.sched_getaffinity(0))) if asked is None else asked

    def before_serving(self) -> str | None:
        """In each process that serves, once it serves (after any fork): a local archive's read lease,
        which spares every read its fstat (ArchiveFile.watch_for_writers); what came of it, to log."""
        if isinstance(self.archive, ArchiveFile):
            return self.archive.watch_for_writers()
        return None

    def before_fork(self) -> None:
        """Drop what does not survive fork(): a decoder's threads (the daemon opens its own)."""
        for source in (*self.members, self.archive):
            if isinstance(source, CompressedSource):
                source.drop_decoder()

    def close(self) -> None:
        for source in (*self.members, self.archive):  # rapidgzip aborts if its threads outlive it
            source.close()


def open_source(
    path: str, options: MountOptions, say: Callable[[str], None] = lambda line: None
) -> ByteSource:
    """The archive as the tar reader must see it: a file or URL, decompressed if it is compressed.

    One cache budget, `-o cache_size`, whatever the layers: a compressed archive on a URL gives a quarter
    to the compressed blocks under the decompressor and the rest to decompressed chunks. `say` hears
    whose rights opened a local archive, if not the caller's (sources/opening.py).
    """
    archive = remote.open_source(path, options.remote, options.cache_size)
    if isinstance(archive, ArchiveFile) and archive.opened_as is not None:
        say(archive.opened_as)
    if not remote.is_url(path):
        return compressed.decompressed(archive, options.cache_size, options.decoder_memory)
    blocks = options.cache_size // _REMOTE_SHARE
    source = compressed.decompressed(archive, options.cache_size - blocks, options.decoder_memory)
    if source is not archive and isinstance(archive, remote.RemoteArchive):
        archive.resize_cache(blocks)
    return source


def list_archive(path: str, options: MountOptions, say: Callable[[str], None] = lambda line: None) -> Listing:
    """Every candidate image, and for a compressed archive the saved index a mount would use."""
    compression = found = None
    with contextlib.closing(open_source(path, options, say)) as source:
        head = source.read_at(0, bare.TAR_HEAD)
        if not bare.is_tar(head):  # the stream is the image: what a mount would serve
            image, _ = _open_bare(path, source, head, options, say)
            compression = source.compression if isinstance(source, CompressedSource) else None
            return Listing(compression, None, [image])
        if isinstance(source, CompressedSource):
            from tarfuse.sources import index  # with pyzstd (its spill): only compressed archives need it

            compression = source.compression
            where = index_path(source, options)
            found = where if where is not None and index.use_saved_index(where, source) else None
        images = list_images(source.read_at, source.size, most=_most_served(source), listing=True)
    return Listing(compression, found, images)


def assemble(
    path: str, options: MountOptions, several: bool = False, say: Callable[[str], None] = lambda line: None
) -> Assembly:
    """Open the archive and its images, and build the files to serve; on failure nothing stays open.

    The layers compose: a file or URL, maybe decompressed; then a tar, whose chosen member may itself be
    compressed (disk.raw.xz: decompressed again, and served as disk.raw), or no tar at all, the whole
    stream being the image. With `several` (a directory mount point, no -o member=), every candidate
    image of the tar is served, at its path. `say` hears of a wait (a stream whose size only its end
    tells, a compressed multi-disk archive read whole before it is served).
    """
    source = open_source(path, options, say)
    members: list[CompressedSource] = []
    try:
        notes: tuple[str, ...] = ()
        head = source.read_at(0, bare.TAR_HEAD)
        if not bare.is_tar(head):
            image, background = _open_bare(path, source, head, options, say)
            if not isinstance(source, CompressedSource) and not remote.is_url(path):
                notes = (
                    f"{printable(path)} is a {image.format} image itself, not an archive: serving it as it "
                    "is (QEMU, qemu-img and losetup -r can open it without tarfuse)",
                )
            served = [_served_file(image, source, options, bare=True)]
            return Assembly(source, [image], served, background, notes=notes)
        found_links: list[tuple[str, str]] = []
        later: _LaterCopy | None = None  # the served member, if a later one of its name may replace it
        if options.all_files and options.member is None and several:
            if isinstance(source, CompressedSource) and not source.size_known:
                say(f"{source.path}: -o all: reading the compressed archive whole, to find every file in it")
            images, found_links = list_files(
                source.read_at, source.size, source.pread_into, _most_served(source)
            )
            if not images:
                raise NoImage("-o all: the archive holds no regular files", None)
            background = None
            if isinstance(source, CompressedSource) and source.compression == "dictzip":
                background = _dictzip_check(source)
        else:
            later = _LaterCopy(source) if isinstance(source, CompressedSource) else None
            images, background = _open_tar(source, options, several and options.member is None, say, later)
        opened: list[Image] = []
        served = []
        share = _member_cache_share(source, images, options)
        decoders = _member_decoder_memory(source, images, options)
        for image in images:
            unwrapped = _open_compressed_member(source, image, options, say, share, decoders)
            if unwrapped is None:
                opened.append(image)
                one = len(images) == 1
                served.append(_served_file(image, source, options, one, later if one else None))
                continue
            inner, whole, member_job = unwrapped
            members.append(inner)
            background = _one_after_another(background, member_job)
            opened.append(whole)
            served.append(_served_file(whole, inner, options, bare=len(images) == 1))
        # tar -x makes `etc/passwd -> /etc/passwd` or `../../x` as they are; a mount that others may
        # browse must not offer a path out of it, nor one that the links it serves add up to.
        symlinks, left_out = links.symlinks_inside([file.name for file in served], found_links)
        notes += links.notes_on(left_out)
        return Assembly(source, opened, served, background, members, notes, symlinks)
    except BaseException:
        for inner in members:
            inner.close()
        source.close()
        raise


def _open_tar(
    source: ByteSource,
    options: MountOptions,
    several: bool,
    say: Callable[[str], None],
    later: "_LaterCopy | None" = None,
) -> tuple[list[Image], BackgroundJob | None]:
    """The image of a tar, or with `several` every candidate image, where their headers are cheap to reach.

    A plain tar's headers are read whole anyway. A compressed one's are cheap only with a complete index:
    without one, finding a second disk means decompressing the whole archive before serving the first, so
    the first candidate is served as soon as its header decodes (as for one disk), the background pass
    logs the others and keeps the index, and the next mount serves them all.
    """
    if isinstance(source, CompressedSource):
        where = None if source.compression == "dictzip" else _with_saved_index(source, options)
        if several and source.size_known and not source.needs_spill():
            images = list_images(source.read_at, source.size, source.pread_into, _most_served(source))
            if images:  # one scan: with none, open_image below says why
                return images, _dictzip_check(source) if source.compression == "dictzip" else None
        image, background = _open_compressed(source, options, where, later)
        return [image], background
    if several:
        images = list_images(source.read_at, source.size, source.pread_into, _most_served(source))
        if images:  # one scan: with none, open_image below says why
            return images, None
    return [open_image(source.read_at, source.size, options.member, source.pread_into)], None


def _most_served(source: ByteSource) -> int:
    """How many files a mount of `source` may serve: fewer beside a cache (MAX_SERVED_FILES)."""
    return MAX_SERVED_FILES if isinstance(source, ArchiveFile) else MAX_SERVED_FILES_CACHED


def _open_bare(
    path: str, source: ByteSource, head: bytes, options: MountOptions, say: Callable[[str], None]
) -> tuple[Image, BackgroundJob | None]:
    """A stream that is no tar: an image given as it is, or compressed without a tar around it."""
    if options.member is not None:
        raise UsageError(f"-o member= names a member of a tar archive, and {path} is none")
    compression = source.compression if isinstance(source, CompressedSource) else None
    name = bare.served_name(path, compression)
    job = None
    if isinstance(source, CompressedSource):
        _refuse_compressed_again(head, "the decompressed stream")
        bare.check_image(name, source.read_at(0, HEAD_SIZE))  # before a wait for the size, not after
        job = _whole_stream_ready(source, options, say)
    stamp = source.identity()[3]  # a local file's (device, inode, size, mtime_ns), from its descriptor
    mtime = stamp // 1_000_000_000 if isinstance(stamp, int) and not remote.is_url(path) else 0
    return bare.open_whole(source.read_at, source.size, name, mtime, source.pread_into), job


def _member_cache_share(source: ByteSource, images: list[Image], options: MountOptions) -> int:
    """One cache budget for every layer: the compressed members among `images` share it with the archive
    (half for the archive's own chunks if it is compressed), each getting this much."""
    count = sum(_member_compression(image) is not None for image in images)
    if not count:
        return options.cache_size
    budget = options.cache_size
    if isinstance(source, CompressedSource):
        budget //= 2
        source.cache.resize(budget)
    return budget // count


def _member_decoder_memory(source: ByteSource, images: list[Image], options: MountOptions) -> int:
    """One decoder budget for the mount (-o decoder_memory), split before the members' decoders are built:
    a compressed archive keeps half for its own, and each compressed member among `images` gets this much
    of the rest for its two. A share too small for a member's window or dictionary refuses that stream."""
    count = max(1, sum(_member_compression(image) is not None for image in images))
    return options.decoder_memory // (2 if isinstance(source, CompressedSource) else 1) // count


def _member_compression(image: Image) -> Compression | None:
    """The compression of a member named like a compressed image (disk.raw.xz) whose bytes agree."""
    stripped = bare.strip_compression_suffix(image.name)
    by_name = stripped != image.name and has_image_suffix(stripped)
    by_content = "-compressed" in image.format.detail  # image.open: what its first bytes decompress to
    if not (by_name or by_content):  # README.gz is served as tar -x writes it
        return None
    return sniff(image.mapper.read(0, 8))  # named .xz but not compressed: served as tar -x writes it


def _open_compressed_member(
    archive: ByteSource,
    image: Image,
    options: MountOptions,
    say: Callable[[str], None],
    cache_size: int,
    decoder_memory: int,
) -> tuple[CompressedSource, Image, BackgroundJob | None] | None:
    """The member chosen, decompressed, if it is named like a compressed image and its bytes agree;
    `cache_size` and `decoder_memory`: its shares of the mount's budgets."""
    compression = _member_compression(image)
    if compression is None:
        return None
    name = bare.strip_compression_suffix(image.name)
    member = MemberSource(
        archive, image.mapper.read_into, image.mapper.size, image.name, image.member.header_offset
    )
    inner = CompressedSource(member, compression, cache_size, decoder_memory)
    try:
        _refuse_compressed_again(inner.read_at(0, 8), f"member {image.name!r} decompressed")
        job = _whole_stream_ready(inner, options, say)
        whole = bare.open_whole(inner.read_at, inner.size, name, image.member.mtime, inner.pread_into)
    except BaseException:
        inner.close()
        raise
    return inner, whole, job


def _refuse_compressed_again(head: bytes, what: str) -> None:
    """Two layers of compression are served (a compressed member of a compressed tar); more are refused."""
    if (found := compression_of(head)) is not None:
        raise CompressedArchive(f"{what} is {found[0]}-compressed again: decompress it first ({found[1]})", 0)


def _whole_stream_ready(
    source: CompressedSource, options: MountOptions, say: Callable[[str], None], wait: bool = True
) -> BackgroundJob | None:
    """Make a stream servable as one image: its exact size known, and its background job if any.

    A tar's size needs no knowing (its headers say where things end); an image's does, before the first
    stat: QEMU and losetup take st_size once. xz, seekable zstd, dictzip and a saved index give it at once.
    gzip says it only modulo 4 GiB, a one-frame zstd may not say it: then the stream is decompressed once,
    here, before the mount (timed in docs/compressed.md), and the index kept makes the next mount immediate.
    """
    from tarfuse.sources import index

    if source.compression == "dictzip":
        return _dictzip_check(source)
    where = _with_saved_index(source, options)
    if source.size_known and not source.needs_spill():
        return None
    waits = not source.size_known and wait
    indexing = index.IndexingPass(
        source,
        source.path,
        where,
        scan=False,
        spill_max=options.spill_max,
        max_ratio=options.max_ratio if waits else 0,
    )
    if not waits:  # only its spill or index to make: in the background, as for a tar
        return BackgroundJob(indexing.run, indexing.status, lambda: indexing.progress.done)
    say(f"{source.path}: the {source.compression} stream does not say its size: decompressing it once")
    indexing.quiet = True
    waiting = threading.Thread(
        target=indexing.run, args=(threading.Event(),), name="tarfuse-size", daemon=True
    )
    waiting.start()
    while True:
        waiting.join(_PROGRESS_EVERY)
        if not waiting.is_alive():
            break
        say(indexing.status())
    source.check_unchanged()  # the pass found it corrupt
    if not source.size_known:
        raise CorruptCompressed(f"the size of the {source.compression} stream could not be learned", None)
    return None


def _dictzip_check(source: CompressedSource) -> BackgroundJob:
    """A dictzip stream's background job: its CRC32, read whole once (index.VerifyPass says why)."""
    from tarfuse.sources import index

    checking = index.VerifyPass(source)
    return BackgroundJob(checking.run, checking.status, lambda: checking.progress.done)


def _one_after_another(first: BackgroundJob | None, then: BackgroundJob | None) -> BackgroundJob | None:
    """Two background jobs in one thread (the archive's pass, then its compressed member's)."""
    if first is None or then is None:
        return first or then

    def run(stop: threading.Event) -> None:
        first.run(stop)
        if not stop.is_set():
            then.run(stop)

    return BackgroundJob(run, lambda: first.status() if not first.done() else then.status(), then.done)


def index_path(source: CompressedSource, options: MountOptions) -> str | None:
    """Where the seek index of `source` is kept; None: nowhere (-o noindex, or no safe place)."""
    from tarfuse.sources import index

    if options.noindex:
        return None
    if options.index is not None and not isinstance(source.archive, MemberSource):
        return options.index  # the archive's: a compressed member's goes to the cache, keyed by identity
    beside = isinstance(source.archive, ArchiveFile)  # a URL's index goes to the cache, never "beside" it
    return index.default_path(source.path, source.identity(), beside)


def _with_saved_index(source: CompressedSource, options: MountOptions) -> str | None:
    """Where the index of `source` is kept, once a saved one there is loaded if the source still needs it
    (it gives the size, or serves from the spill); None: nowhere."""
    from tarfuse.sources import index

    where = index_path(source, options)
    if where is not None:  # in the cache directory: hold its entry there, and keep the directory bounded
        index.keep_cache_bounded(where, source, options.cache_max)
    if where is not None and (not source.size_known or source.needs_spill()):
        index.use_saved_index(where, source)
    return where


def _open_compressed(
    source: CompressedSource, options: MountOptions, where: str | None, later: "_LaterCopy | None" = None
) -> tuple[Image, BackgroundJob | None]:
    """Open the image as soon as its headers are decompressed; index the rest in the background. `where`:
    the index's place, from _with_saved_index (which loaded a saved one); `later`: what lets the pass
    serve a later member of the image's name instead, while nothing of the first was read.

    With a complete index (a saved one, or xz's and seekable zstd's own) every header is cheap to reach:
    open as for a plain archive. Otherwise serve the first candidate, and let the background pass look for
    others. A stream with no restart point but its start gets the pass too, for its spill.
    """
    from tarfuse.sources import index

    if source.compression == "dictzip":  # random access from its header's table: no pass, no index file
        return open_image(source.read_at, source.size, options.member, source.pread_into), _dictzip_check(
            source
        )
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
        replace=None if later is None else later.replace,
        spill_max=options.spill_max,
    )
    return image, BackgroundJob(indexing.run, indexing.status, lambda: indexing.progress.done)


def _inside(name: str) -> str:
    """A member's path as a path under the mount point: no empty, "." or ".." component."""
    return "/".join(part for part in name.split("/") if part not in ("", ".", ".."))


def _cached(mapper: "ImageMapper | _LaterCopy", source: CompressedSource) -> Callable[[int, int], bool]:
    """Whether an image read needs no decompression: all holes, or all in the chunk cache."""

    def ready(offset: int, size: int) -> bool:
        return all(p == HOLE or source.cached(p, n) for p, n in mapper.plan(offset, size))

    return ready


def _served_file(
    image: Image,
    source: ByteSource,
    options: MountOptions,
    bare: bool = True,
    later: "_LaterCopy | None" = None,
) -> ServedFile:
    """The file FUSE serves for `image`: named by its base name (`bare`), or by its path in the archive,
    without "." and ".." (tar -x strips a leading "../" too), for several images. Read through `later`
    if given (a later member of its name may replace it while unseen)."""
    mapper = image.mapper if later is None else later.serving(image.mapper)
    reads = _CheckedReads(mapper, source)

    return ServedFile(
        name=(os.path.basename(image.name.rstrip("/")) if bare else _inside(image.name)) or "image",
        size=mapper.size,
        mtime_ns=image.member.mtime * 1_000_000_000,
        stored_bytes=image.stored_bytes,
        read=reads.read,
        contents=reads,
        xattrs=_Xattrs(
            image.name, _shared_bytes(image.format.driver), _shared_bytes(remote.display_name(source.path))
        ),
        uid=os.getuid() if options.uid is None else options.uid,
        gid=os.getgid() if options.gid is None else options.gid,
        umask=options.umask,
        blocking=source.blocking,
        ready=_cached(mapper, source) if isinstance(source, CompressedSource) else None,
        readers=source.readers,
    )


@functools.lru_cache(maxsize=64)
def _shared_bytes(text: str) -> bytes:
    """One bytes object for a value that every file of a mount carries (the archive, a format)."""
    return os.fsencode(text)


class _Xattrs(Mapping[str, bytes]):
    """A served file's user.tarfuse.* attributes: the member's name, encoded when asked (it is the
    Member's own string), and the format and archive, which every file of a mount shares. A dict per
    file costs three times as much."""

    __slots__ = ("_archive", "_format", "_member")
    _KEYS = ("user.tarfuse.member", "user.tarfuse.format", "user.tarfuse.archive")

    def __init__(self, member: str, format_: bytes, archive: bytes) -> None:
        self._member, self._format, self._archive = member, format_, archive

    def __getitem__(self, key: str) -> bytes:
        if key == "user.tarfuse.member":
            return os.fsencode(self._member)
        if key == "user.tarfuse.format":
            return self._format
        if key == "user.tarfuse.archive":
            return self._archive
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)


class _CheckedReads:
    """A served file's contents (serve.fs.Contents): reads, each followed by the source's check that the
    archive has not changed, into the buffer the daemon lends; holes and data from the map.
    """

    __slots__ = ("_mapper", "_source")

    def __init__(self, mapper: "ImageMapper | _LaterCopy", source: ByteSource) -> None:
        self._mapper = mapper
        self._source = source

    def read_into(self, buffer: memoryview, offset: int) -> int:
        try:
            filled = self._mapper.read_into(buffer, offset)
        except TarfuseError:
            self._source.check_unchanged()  # a read cut short by a truncated archive: name the cause
            raise
        self._source.check_unchanged()  # after the read: a change before it or during it is caught
        return filled

    def read(self, offset: int, size: int) -> memoryview:
        view = memoryview(bytearray(max(min(size, self._mapper.size - offset), 0)))
        return view[: self.read_into(view, offset)]

    def next_data(self, offset: int) -> int | None:
        return self._mapper.next_data(offset)

    def next_hole(self, offset: int) -> int:
        return self._mapper.next_hole(offset)


class _LaterCopy:
    """The member a served file reads, until the indexing pass finds a later member of its name (tar -x
    keeps the last) and it is replaced by that one, if it is still unseen.

    Unseen: no read and no lseek was answered from it (bytes never change under a reader), and the later
    one has its size, which a stat may have answered and the kernel keeps for the life of the mount (the
    mtime shown stays the first's). Reads and lseeks go through here as through the ImageMapper.
    """

    def __init__(self, source: CompressedSource) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._mapper: ImageMapper | None = None  # what is served; None: no served file reads through here
        self._seen = False

    def serving(self, mapper: ImageMapper) -> "_LaterCopy":
        """Serve `mapper` through this, until replace()."""
        self._mapper = mapper
        return self

    def _answer(self) -> ImageMapper:
        """The mapper to answer from; from now on it is seen, and stays."""
        with self._lock:
            self._seen = True
            return self._served()

    def _served(self) -> ImageMapper:
        if self._mapper is None:
            raise ArchiveError("no member is served through this mount's later-copy switch, a bug")
        return self._mapper

    @property
    def size(self) -> int:
        return self._served().size

    def plan(self, offset: int, size: int) -> list[tuple[int, int]]:
        return self._served().plan(offset, size)  # only to choose a thread: nothing is answered

    def read_into(self, buffer: memoryview, offset: int) -> int:
        return self._answer().read_into(buffer, offset)

    def next_data(self, offset: int) -> int | None:
        return self._answer().next_data(offset)

    def next_hole(self, offset: int) -> int:
        return self._answer().next_hole(offset)

    def replace(self, later: Candidate) -> bool:
        """Serve `later` from now on, if what is served is unseen and as long; say whether it is."""
        read_at = self._source.read_at
        try:
            mapper = ImageMapper(read_at, sparse.decode(later.member, read_at), self._source.pread_into)
        except ArchiveError:
            return False  # its map is broken: tar -x would fail on it too; reads fail, as before
        with self._lock:
            if self._mapper is None or self._seen or mapper.size != self._mapper.size:
                return False
            self._mapper = mapper
            return True
