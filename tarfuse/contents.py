"""A served file's contents, as the assembly builds them: reads through the image's map, each checked
against the archive's changes; the switch to a later member of the same name; the user.tarfuse.* xattrs.
"""

import functools
import os
import threading
from collections.abc import Callable, Iterator, Mapping

from tarfuse.errors import ArchiveError, TarfuseError
from tarfuse.image.mapper import HOLE, ImageMapper
from tarfuse.image.open import Image
from tarfuse.options import MountOptions
from tarfuse.served import DirectMap, ServedFile
from tarfuse.sources.file import ByteSource
from tarfuse.sources.locations import display_name
from tarfuse.tar import sparse
from tarfuse.tar.files import Candidate


def _inside(name: str) -> str:
    """A member's path as a path under the mount point: no empty, "." or ".." component."""
    return "/".join(part for part in name.split("/") if part not in ("", ".", ".."))


def _ready(mapper: "ImageMapper | LaterCopy", source: ByteSource) -> Callable[[int, int], bool]:
    """A predicate: whether an image read would not wait (all holes, or all in the source's cache)."""

    def ready(offset: int, size: int) -> bool:
        return all(p == HOLE or source.cached(p, n) for p, n in mapper.plan(offset, size))

    return ready


def served_file(
    image: Image,
    source: ByteSource,
    options: MountOptions,
    by_basename: bool = True,
    later: "LaterCopy | None" = None,
) -> ServedFile:
    """The file FUSE serves for `image`: named by its base name (`by_basename`: one image), or by its path in
    the archive, without "." and ".." (tar -x strips a leading "../" too), for several images. Read
    through `later` if given (a later member of its name may replace it while unseen)."""
    mapper = image.mapper if later is None else later.serving(image.mapper)
    reads = _CheckedReads(mapper, source)

    return ServedFile(
        name=(os.path.basename(image.name.rstrip("/")) if by_basename else _inside(image.name)) or "image",
        size=mapper.size,
        mtime_ns=image.member.mtime * 1_000_000_000,
        stored_bytes=image.stored_bytes,
        read=reads.read,
        contents=reads,
        xattrs=_Xattrs(
            image.name, _shared_bytes(image.format.driver), _shared_bytes(display_name(source.path))
        ),
        uid=os.getuid() if options.uid is None else options.uid,
        gid=os.getgid() if options.gid is None else options.gid,
        umask=options.umask,
        blocking=source.blocking,
        ready=_ready(mapper, source) if source.blocking else None,
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
    """A served file's contents (served.Contents): reads, each followed by the source's check that the
    archive has not changed, into the buffer the daemon lends; holes and data from the map.
    """

    __slots__ = ("_mapper", "_source")

    def __init__(self, mapper: "ImageMapper | LaterCopy", source: ByteSource) -> None:
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

    def direct(self, leave: Callable[[], None]) -> DirectMap | None:
        """A fixed map over a local file that needs no check: not one that a later member may replace."""
        if not isinstance(self._mapper, ImageMapper):
            return None
        fd = self._source.serve_directly(leave)
        return None if fd is None else (fd, self._mapper.extents())


class LaterCopy:
    """The member a served file reads, until the indexing pass finds a later member of its name (tar -x
    keeps the last) and it is replaced by that one, if it is still unseen.

    Unseen: no read and no lseek was answered from it (bytes never change under a reader), and the later
    one has its size, which a stat may have answered and the kernel keeps for the life of the mount (the
    mtime shown stays the first's). Reads and lseeks go through here as through the ImageMapper.
    """

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._mapper: ImageMapper | None = None  # what is served; None: no served file reads through here
        self._seen = False

    def serving(self, mapper: ImageMapper) -> "LaterCopy":
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
