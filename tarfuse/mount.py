"""One mount, put together: the source under the archive, the image in it, and the file FUSE serves.

cli.py reads the command line into MountOptions (options.py) and hands them here; the FUSE side (serve/)
gets back ServedFiles and the background job (served.py). A read runs serve.fs → ServedFile.read (built by
contents.py) → image.mapper → the source. What a source is and can do is asked through its protocol
(sources.file.ByteSource), never by its class: a new kind of source is a module of its own and a line
where sources are chosen (sources.locations.open_location, compressed.decompressed).
"""

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar, cast

from tarfuse import background as jobs
from tarfuse.contents import LaterCopy, served_file
from tarfuse.errors import CompressedArchive, NoImage, UsageError
from tarfuse.image import bare, links
from tarfuse.image.detect import HEAD_SIZE, has_image_suffix
from tarfuse.image.open import Image, list_files, list_images, open_image
from tarfuse.options import MountOptions, default_workers
from tarfuse.printable import printable
from tarfuse.served import BLOCKING_READERS, BackgroundJob, ServedFile
from tarfuse.sources import compressed
from tarfuse.sources.compressed import CompressedSource
from tarfuse.sources.compression import Compression, compression_of, sniff
from tarfuse.sources.file import Background, ByteSource
from tarfuse.sources.locations import is_url, open_location
from tarfuse.sources.member import MemberSource

if TYPE_CHECKING:
    from tarfuse.sources.index import Published
    from tarfuse.tar.listing import ListedMembers

# The most files one mount serves (-o all, or every disk image on a directory mount point). Each costs
# about 1.6 KB while served: 100,000 from a plain local tar stay under the 256 MiB ceiling
# (tests/mount/test_many_files.py measures it); beside a compressed or remote archive's chunk cache and
# decoders, a quarter of that. The archive's 250,000 members (tar.files.MAX_MEMBERS) would not fit: past
# the bound, the mount is refused before the files are opened.
MAX_SERVED_FILES = 100_000
MAX_SERVED_FILES_CACHED = 25_000
# Bytes of file names in tarfuse --status: its answer is one extended attribute, at most 64 KiB with the
# rest (a member's name may be 4 KiB long; the JSON escapes what is not ASCII, up to six bytes a byte).
STATUS_NAMES = 8 << 10

Say = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Listing:
    """What `tarfuse --list` shows."""

    compression: Compression | None
    index: str | None  # the saved index that a mount would use, if any
    images: list[Image]


@dataclass
class Assembly:
    """A mount's parts, ready for the FUSE side: one served file per image (several: a multi-disk archive
    on a directory mount point), the sources under them, and the background job."""

    archive: ByteSource  # the archive as the tar reader sees it (decompressed if compressed)
    images: list[Image]
    served: list[ServedFile]
    background: BackgroundJob | None  # a compressed archive's indexing pass
    members: list[ByteSource] = field(default_factory=list)  # compressed members, decompressed
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

    def status(self, archive: str) -> dict[str, object]:
        """What tarfuse --status shows of the mount of `archive` (its display name): the files served (the
        first of them, up to STATUS_NAMES bytes of names), the background passes, and the bytes fetched
        over the network."""
        files, names = [], 0
        for served in self.served:
            names += len(served.name)
            if names > STATUS_NAMES:
                break
            files.append({"name": served.name, "size": served.size})
        return {
            "archive": archive,
            "compression": self.archive.compression,
            "fetched_bytes": self.archive.fetched(),
            "read_list": self.archive.read_list(),
            "file_count": len(self.served),
            "files": files,
            "passes": [] if self.background is None else self.background.report(),
        }

    def before_serving(self) -> str | None:
        """In each process that serves, once it serves (after any fork): a local archive's read lease,
        which spares every read its fstat (ArchiveFile.watch_for_writers); what came of it, to log."""
        return self.archive.watch_for_writers()

    def before_fork(self) -> None:
        """Drop what does not survive fork(): a decoder's threads (the daemon opens its own)."""
        for source in (*self.members, self.archive):
            source.before_fork()

    def close(self) -> None:
        for source in (*self.members, self.archive):  # rapidgzip aborts if its threads outlive it
            source.close()


def open_source(path: str, options: MountOptions, say: Say = lambda line: None) -> ByteSource:
    """The archive as the tar reader must see it: a file or URL, decompressed if it is compressed.

    One cache budget, `-o cache_size`, whatever the layers: the location keeps its share (a URL's blocks:
    all of it, or a quarter under a compressed stream) and the decompressed chunks get the rest. `say`
    hears whose rights opened a local archive, if not the caller's (sources/opening.py).
    """
    archive = open_location(path, options.http, options.cache_size, say)
    chunks = options.cache_size - archive.cache_capacity  # all of it for a local file
    return compressed.decompressed(archive, chunks, options.decoder_memory)


def list_archive(path: str, options: MountOptions, say: Say = lambda line: None) -> Listing:
    """Every candidate image, and for a compressed archive the saved index a mount would use."""
    with contextlib.closing(open_source(path, options, say)) as source:
        published = jobs.published_index(source)
        head = source.read_at(0, bare.TAR_HEAD)
        if not bare.is_tar(head):  # the stream is the image: what a mount would serve
            image, _ = _open_bare(path, source, head, options, say)
            return Listing(source.compression, None, [image])
        found = published.name if published is not None else jobs.saved_index(source, options)
        most = _most_served(source)
        images = _from_list(
            published,
            source,
            say,
            lambda listed: list_images(source.read_at, source.size, most=most, listing=True, listed=listed),
        )
    return Listing(source.compression, found, images)


def assemble(
    path: str, options: MountOptions, several: bool = False, say: Say = lambda line: None
) -> Assembly:
    """Open the archive and its images, and build the files to serve; on failure nothing stays open.

    The layers compose: a file or URL, maybe decompressed; then a tar, whose chosen member may itself be
    compressed (disk.raw.xz: decompressed again, and served as disk.raw), or no tar at all, the whole
    stream being the image. With `several` (a directory mount point, no -o member=), every candidate
    image of the tar is served, at its path. `say` hears of a wait (a stream whose size only its end
    tells, a compressed multi-disk archive read whole before it is served).
    """
    source = open_source(path, options, say)
    members: list[ByteSource] = []
    try:
        published = jobs.published_index(source)  # before the first read, which then needs no pass
        head = source.read_at(0, bare.TAR_HEAD)
        if not bare.is_tar(head):
            return _assemble_bare(path, source, head, options, say)
        found_links: list[tuple[str, str]] = []
        later: LaterCopy | None = None  # the served member, if a later one of its name may replace it
        if options.all_files and options.member is None and several:
            images, found_links = _from_list(
                published, source, say, lambda listed: _all_files(source, say, listed)
            )
            background = jobs.check(source)
        else:
            later = LaterCopy(source) if source.background is Background.INDEX else None
            several = several and options.member is None
            images, background = _open_tar(source, options, several, later, published, say)
        opened: list[Image] = []
        served = []
        cache_share, decoder_share = _member_shares(source, images, options)
        for image in images:
            unwrapped = _open_compressed_member(source, image, options, say, cache_share, decoder_share)
            if unwrapped is None:
                opened.append(image)
                one = len(images) == 1
                served.append(served_file(image, source, options, one, later if one else None))
                continue
            inner, whole, member_job = unwrapped
            members.append(inner)
            background = jobs.one_after_another(background, member_job)
            opened.append(whole)
            served.append(served_file(whole, inner, options, by_basename=len(images) == 1))
        # tar -x makes `etc/passwd -> /etc/passwd` or `../../x` as they are; a mount that others may
        # browse must not offer a path out of it, nor one that the links it serves add up to.
        symlinks, left_out = links.symlinks_inside([file.name for file in served], found_links)
        notes = links.notes_on(left_out)
        return Assembly(source, opened, served, background, members, notes, symlinks)
    except BaseException:
        for inner in members:
            inner.close()
        source.close()
        raise


def _assemble_bare(path: str, source: ByteSource, head: bytes, options: MountOptions, say: Say) -> Assembly:
    """The mount of a stream that is no tar: the stream is the image."""
    image, background = _open_bare(path, source, head, options, say)
    notes: tuple[str, ...] = ()
    if source.local_fd is not None:  # a local file, not decompressed
        notes = (
            f"{printable(path)} is a {image.format} image itself, not an archive: serving it as it "
            "is (QEMU, qemu-img and losetup -r can open it without tarfuse)",
        )
    served = [served_file(image, source, options, by_basename=True)]
    return Assembly(source, [image], served, background, notes=notes)


def _from_list(
    published: "Published | None",
    source: ByteSource,
    say: Say,
    open_with: Callable[["ListedMembers | None"], T],
) -> T:
    """What `open_with` opens from the member list a published index carries (tar/listing.py), which
    spares the mount the walk of the tar's headers, each a request or two over a remote compressed
    archive; from the headers if there is none, or if it is not the archive's (said, in one line)."""
    if published is None or not published.members:
        return open_with(None)
    from tarfuse.tar import listing
    from tarfuse.tar.listing import ListedMembers

    try:
        listed = ListedMembers(listing.decode(published.members), source.read_at, source.size)
        return open_with(listed)
    except (listing.BadListing, listing.ListingMismatch) as exc:
        reason = str(exc)
    except NoImage:  # from a list that leaves the image out, or none there is: the walk says which
        reason = "it leaves out a file the archive's headers name"
    opened = open_with(None)
    say(f"ignoring the member list of {printable(published.name)}: {reason}; the archive's headers were read")
    return opened


def _all_files(
    source: ByteSource, say: Say, listed: "ListedMembers | None"
) -> tuple[list[Image], list[tuple[str, str]]]:
    """-o all: every regular file of the archive, and its symbolic links."""
    if not source.size_known:
        say(f"{source.path}: -o all: reading the compressed archive whole, to find every file in it")
    most = _most_served(source)
    images, found_links = list_files(source.read_at, source.size, source.pread_into, most, listed)
    if not images:
        raise NoImage("-o all: the archive holds no regular files", None)
    return images, found_links


def _open_tar(
    source: ByteSource,
    options: MountOptions,
    several: bool,
    later: LaterCopy | None,
    published: "Published | None",
    say: Say,
) -> tuple[list[Image], BackgroundJob | None]:
    """The image of a tar, or with `several` every candidate image, where their headers are cheap to reach.

    A plain tar's headers are read whole anyway. A compressed one's are cheap only with a complete index:
    without one, finding a second disk means decompressing the whole archive before serving the first, so
    the first candidate is served as soon as its header decodes (as for one disk), the background pass
    logs the others and keeps the index, and the next mount serves them all.
    """
    where = None
    if source.background is Background.INDEX:
        where = jobs.with_saved_index(_compressed(source), options)
    if jobs.headers_at_hand(source):

        def open_with(listed: "ListedMembers | None") -> list[Image]:
            if several:
                most = _most_served(source)
                images = list_images(source.read_at, source.size, source.pread_into, most, listed=listed)
                if images:  # one scan: with none, open_image below says why
                    return images
            return [open_image(source.read_at, source.size, options.member, source.pread_into, listed)]

        return _from_list(published, source, say, open_with), jobs.check(source)
    image, background = jobs.open_in_stream(source, options, where, None if later is None else later.replace)
    return [image], background


def _most_served(source: ByteSource) -> int:
    """How many files a mount of `source` may serve: fewer beside a cache (MAX_SERVED_FILES)."""
    return MAX_SERVED_FILES if source.local_fd is not None else MAX_SERVED_FILES_CACHED


def _open_bare(
    path: str, source: ByteSource, head: bytes, options: MountOptions, say: Say
) -> tuple[Image, BackgroundJob | None]:
    """A stream that is no tar: an image given as it is, or compressed without a tar around it."""
    if options.member is not None:
        raise UsageError(f"-o member= names a member of a tar archive, and {path} is none")
    name = bare.served_name(path, source.compression)
    job = None
    if source.compression is not None:
        _refuse_compressed_again(head, "the decompressed stream")
        bare.check_image(name, source.read_at(0, HEAD_SIZE))  # before a wait for the size, not after
        job = jobs.whole_stream_ready(source, options, say)
    stamp = source.identity()[3]  # a local file's (device, inode, size, mtime_ns), from its descriptor
    mtime = stamp // 1_000_000_000 if isinstance(stamp, int) and not is_url(path) else 0
    return bare.open_whole(source.read_at, source.size, name, mtime, source.pread_into), job


def _member_shares(source: ByteSource, images: list[Image], options: MountOptions) -> tuple[int, int]:
    """The cache and decoder memory each compressed member among `images` gets, decided once, before the
    members' sources are built.

    One cache budget for every layer: the members share it with the archive, which keeps half for its
    own chunks if it is compressed. One decoder budget (-o decoder_memory): a compressed archive keeps
    half for its own, and each member gets its part of the rest for its two decoders; a share too small
    for a member's window or dictionary refuses that stream.
    """
    count = sum(_member_compression(image) is not None for image in images)
    if not count:
        return options.cache_size, options.decoder_memory
    cache, decoders = options.cache_size, options.decoder_memory
    if source.compression is not None:
        cache, decoders = cache // 2, decoders // 2
        if source.background is Background.INDEX:  # its chunks' cache, built before the members were known
            _compressed(source).cache.resize(cache)
    return cache // count, decoders // count


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
    say: Say,
    cache_size: int,
    decoder_memory: int,
) -> tuple[ByteSource, Image, BackgroundJob | None] | None:
    """The member chosen, decompressed, if it is named like a compressed image and its bytes agree;
    `cache_size` and `decoder_memory`: its shares of the mount's budgets."""
    if _member_compression(image) is None:
        return None
    name = bare.strip_compression_suffix(image.name)
    member = MemberSource(
        archive, image.mapper.read_into, image.mapper.size, image.name, image.member.header_offset
    )
    inner = compressed.decompressed(member, cache_size, decoder_memory)
    try:
        _refuse_compressed_again(inner.read_at(0, 8), f"member {image.name!r} decompressed")
        job = jobs.whole_stream_ready(inner, options, say)
        whole = bare.open_whole(inner.read_at, inner.size, name, image.member.mtime, inner.pread_into)
    except BaseException:
        inner.close()
        raise
    return inner, whole, job


def _refuse_compressed_again(head: bytes, what: str) -> None:
    """Two layers of compression are served (a compressed member of a compressed tar); more are refused."""
    if (found := compression_of(head)) is not None:
        raise CompressedArchive(f"{what} is {found[0]}-compressed again: decompress it first ({found[1]})", 0)


def _compressed(source: ByteSource) -> CompressedSource:
    """A source that needs the indexing pass (Background.INDEX) is a compressed stream the pass reads."""
    return cast(CompressedSource, source)
