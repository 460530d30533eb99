"""The pyfuse3 adapter: read-only files, the root itself (a file mount point) or in a directory tree.

A protocol adapter only: inodes, attributes, extended attributes and errno mapping. It knows nothing about
tar; it serves whatever a `ServedFile` (served.py) reads. Read-only at every entry point: anything that would
change the file system fails with EROFS, even though the kernel already refuses most writes on a `ro` mount.
"""

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileInfo, FUSEError, InodeT, RequestContext

from tarfuse.errors import TarfuseError
from tarfuse.serve import direct
from tarfuse.served import ReadIntoFn, ServedFile

log = logging.getLogger(__name__)

IMAGE_INODE = InodeT(pyfuse3.ROOT_INODE + 1)  # the first file's inode when the root is a directory
_FOREVER = 24 * 3600.0  # attribute and entry timeouts: nothing under a tarfuse mount ever changes
_BLOCK = 4096

_P = ParamSpec("_P")
_T = TypeVar("_T")

# The mount's status (tarfuse --status), on the root: JSON, asked for by the mount's owner or root. Not
# listed by listxattr: `getfattr -d` by anyone else would meet EACCES.
STATUS_XATTR = b"user.tarfuse.status"
REQUEST_BUFFER = 1 << 20  # FUSE reads are at most max_pages (256) pages; a larger one gets its own buffer


def seek_support() -> str:
    """What this pyfuse3 can do, for --version: pass lseek on (SEEK_DATA/SEEK_HOLE), answer reads in C."""
    if hasattr(pyfuse3.Operations, "lseek"):
        seek = "SEEK_DATA/SEEK_HOLE answered from the archive's map"
    else:
        seek = "no lseek handler, SEEK_DATA/SEEK_HOLE see all data"
    return f"pyfuse3 {pyfuse3.__version__}: {seek}; {direct.support()}"


def _eio_on_bug(
    handler: Callable[Concatenate["ImageFs", _P], Coroutine[object, object, _T]],
) -> Callable[Concatenate["ImageFs", _P], Coroutine[object, object, _T]]:
    """Answer EIO, with one log line, where a handler fails in a way nobody planned for.

    pyfuse3 answers only FUSEError; anything else ends its loop and leaves every user of the image a dead
    mount ("Transport endpoint is not connected"). One bad request must cost one request.
    """

    @functools.wraps(handler)
    async def guarded(self: "ImageFs", /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await handler(self, *args, **kwargs)
        except FUSEError:
            raise
        except Exception as exc:
            self.log_unexpected(handler.__name__, exc)
            raise FUSEError(errno.EIO) from None

    return guarded


class _Buffers:
    """Reply buffers lent to reads, one per read in progress in this process, never one per served file.

    Safe to reuse because pyfuse3 answers a read as soon as the handler returns, before any other task
    runs (fuse_read_async: `await operations.read(...)`, then fuse_reply_buf copies the buffer into the
    reply). So a handler gives its buffer back just before it returns a view into it: the next taker runs
    only after the reply is out. Taking and giving happen on the trio thread alone; a read that waits for
    a thread holds its buffer until the thread is done. Reads answered inline use one buffer at a time;
    the pool never holds more buffers than reads run at once (pyfuse3's tasks, each with one request).
    Worker processes each fill their own copy (copy-on-write after fork).
    """

    def __init__(self) -> None:
        self._free: list[memoryview] = []

    def take(self, size: int) -> memoryview:
        """A buffer of at least `size` bytes; made on first use (a bytearray's pages are touched as made)."""
        if size > REQUEST_BUFFER:
            return memoryview(bytearray(size))
        return self._free.pop() if self._free else memoryview(bytearray(REQUEST_BUFFER))

    def give(self, buffer: memoryview) -> None:
        if len(buffer) == REQUEST_BUFFER:
            self._free.append(buffer)


@dataclass(slots=True)
class _Directory:
    """A directory's entries: by name for lookup, and in a fixed order for readdir."""

    children: dict[bytes, InodeT] = field(default_factory=dict)  # name -> inode
    # The same names in the order they were added, which never changes: readdir's offset is an index
    # into it, so a listing resumes where it stopped in O(1), not by a walk or a copy of the children.
    names: list[bytes] = field(default_factory=list)
    subdirectories: int = 0  # for st_nlink, counted once rather than at every getattr

    def add(self, name: bytes, inode: InodeT, is_directory: bool) -> None:
        self.children[name] = inode
        self.names.append(name)
        self.subdirectories += is_directory


@dataclass(slots=True)
class _Node:
    """A file (`served`), a symbolic link (`target`) or a directory (`directory`) of the tree."""

    parent: InodeT
    served: ServedFile | None = None
    target: bytes | None = None  # a symbolic link's (mount.py keeps only those that stay inside)
    directory: _Directory | None = None


def _tree(
    files: Sequence[ServedFile], root_is_file: bool, symlinks: Sequence[tuple[str, str]] = ()
) -> dict[InodeT, _Node]:
    """Inodes for the files, each at its path ("images/disk1.vmdk": a directory, then the file), and for
    the symlinks; a symlink whose path is taken, or runs through a file, is left out."""
    root = InodeT(pyfuse3.ROOT_INODE)
    if root_is_file:
        if len(files) != 1:
            raise ValueError(f"a file mount point serves one file, not {len(files)}")
        return {root: _Node(root, files[0])}
    nodes = {root: _Node(root, directory=_Directory())}
    entries = [(f.name, _Node(root, served=f)) for f in files]
    entries += [(path, _Node(root, target=os.fsencode(target))) for path, target in symlinks]
    for path, leaf in entries:
        *directories, name = [os.fsencode(part) for part in path.split("/") if part not in ("", ".", "..")]
        parent: _Directory | None = nodes[root].directory
        parent_inode = root
        for directory in directories:
            assert parent is not None
            child = parent.children.get(directory)
            if child is None:
                child = InodeT(len(nodes) + pyfuse3.ROOT_INODE)
                parent.add(directory, child, is_directory=True)
                nodes[child] = _Node(parent_inode, directory=_Directory())
            parent, parent_inode = nodes[child].directory, child
            if parent is None:
                break
        if parent is None or name in parent.children:
            continue
        inode = InodeT(len(nodes) + pyfuse3.ROOT_INODE)
        parent.add(name, inode, is_directory=False)
        leaf.parent = parent_inode
        nodes[inode] = leaf
    return nodes


class ImageFs(pyfuse3.Operations):
    """Serve read-only files: with `root_is_file` the mount point itself is the one file (a file mount
    point); otherwise each file at its path under the mount point, directories made for the paths."""

    enable_writeback_cache = False

    def __init__(
        self,
        served: ServedFile | Sequence[ServedFile],
        root_is_file: bool,
        after_init: Callable[[], None] | None = None,
        symlinks: Sequence[tuple[str, str]] = (),
        status: Callable[[], bytes] | None = None,
    ) -> None:
        """`status`: the mount's status, for `tarfuse --status` (STATUS_XATTR on the root)."""
        super().__init__()
        self._status = status
        self._after_init = after_init  # run once, after the FUSE INIT reply (after_init_replied)
        files = [served] if isinstance(served, ServedFile) else list(served)
        self._nodes = _tree(files, root_is_file, symlinks)
        self._files = files
        self._root_is_file = root_is_file
        self._blocks = sum(-(-f.size // _BLOCK) for f in files)  # statfs, counted once
        self._logged_errors: set[tuple[str, int | None]] = set()
        self._init_seen = False
        self._limiter: trio.CapacityLimiter | None = None
        self._buffers = _Buffers()

    def init(self) -> None:
        """libfuse calls this while it builds the FUSE INIT reply: too early for `after_init`."""
        self._init_seen = True

    def init_replied(self) -> bool:
        """Whether the FUSE INIT has been answered, asked before a wait for a request (as below)."""
        return self._init_seen

    def after_init_replied(self) -> None:
        """Run `after_init` once, if INIT has been handled: eventloop calls this before each wait for a
        request, by which time the INIT reply (which resets the mount's readahead) has been written.

        Before the next request, not "soon": a file opened before the readahead is raised keeps the
        kernel's 128 KiB default for good, and reads it in small requests (docs/benchmarks.md).
        """
        if self._init_seen and self._after_init is not None:
            hook, self._after_init = self._after_init, None
            hook()

    def serve_directly(self) -> int:
        """In each serving process, once its read lease is held (after any fork): hand pyfuse3's C read
        path (direct.py) the files whose reads need no Python; return how many."""
        return direct.register(
            (inode, node.served.size, where)
            for inode, node in self._nodes.items()
            if node.served is not None
            and node.served.contents is not None
            and (where := node.served.contents.direct(direct.leave)) is not None
        )

    def _attributes(self, inode: InodeT) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        first = self._files[0]  # a directory takes its owner, mode and time from the files
        served = node.served or first
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = _FOREVER
        attr.st_uid, attr.st_gid = served.uid, served.gid
        attr.st_atime_ns = attr.st_ctime_ns = attr.st_mtime_ns = served.mtime_ns
        attr.st_blksize = _BLOCK
        if node.target is not None:
            attr.st_mode = stat.S_IFLNK | 0o777
            attr.st_nlink = 1
            attr.st_size = len(node.target)
        elif node.served is not None:
            attr.st_mode = stat.S_IFREG | (0o444 & ~served.umask)
            attr.st_nlink = 1
            attr.st_size = served.size
            attr.st_blocks = -(-served.stored_bytes // 512)
        else:
            attr.st_mode = stat.S_IFDIR | (0o555 & ~served.umask)
            attr.st_nlink = 2 + (node.directory.subdirectories if node.directory else 0)
            attr.st_size = 0
        return attr

    def _directory(self, inode: InodeT) -> _Directory:
        directory = self._node(inode).directory
        if directory is None:
            raise FUSEError(errno.ENOTDIR)
        return directory

    def _node(self, inode: InodeT) -> _Node:
        node = self._nodes.get(inode)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    def _file(self, inode: InodeT) -> ServedFile:
        served = self._node(inode).served
        if served is None:
            raise FUSEError(errno.EISDIR)
        return served

    @_eio_on_bug
    async def getattr(self, inode: InodeT, ctx: RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    @_eio_on_bug
    async def lookup(
        self, parent_inode: InodeT, name: bytes, ctx: RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        directory = self._directory(parent_inode)
        if name == b".":
            return self._attributes(parent_inode)
        if name == b"..":
            return self._attributes(self._nodes[parent_inode].parent)
        inode = directory.children.get(name)
        if inode is None:
            raise FUSEError(errno.ENOENT)
        return self._attributes(inode)

    @_eio_on_bug
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> bytes:
        target = self._node(inode).target
        if target is None:
            raise FUSEError(errno.EINVAL)
        return target

    @_eio_on_bug
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        self._directory(inode)
        return FileHandleT(inode)

    @_eio_on_bug
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries from `start_id` on: the offset is the index of the next name (each reply's next_id),
        so a listing costs what it returns, however large the directory."""
        directory = self._directory(InodeT(fh))
        names, children = directory.names, directory.children
        for index in range(max(start_id, 0), len(names)):
            name = names[index]
            if not pyfuse3.readdir_reply(token, name, self._attributes(children[name]), index + 1):
                return

    async def releasedir(self, fh: FileHandleT) -> None:
        pass

    @_eio_on_bug
    async def open(self, inode: InodeT, flags: int, ctx: RequestContext) -> FileInfo:
        self._file(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FUSEError(errno.EROFS)
        # The image never changes while mounted: let the page cache outlive each open.
        return FileInfo(fh=FileHandleT(inode), keep_cache=True)

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        # Plain files, and blocking sources whose data is at hand (`ready`): no await, the read runs
        # inline, which measured faster than trio.to_thread for page-cached archives.
        try:
            served = self._file(InodeT(fh))
            inline = not served.blocking or (served.ready is not None and served.ready(off, size))
            if served.contents is not None:
                return await self._read_into_buffer(served.contents.read_into, off, size, inline)  # type: ignore[return-value]
            if inline:
                data = served.read(off, size)
            else:
                data = await trio.to_thread.run_sync(served.read, off, size, limiter=self._blocking_limiter())
            return data  # type: ignore[return-value]  # pyfuse3 takes any buffer
        except TarfuseError as exc:
            self._log_once(exc, f"read of {size} bytes at image offset {off} failed: {exc}")
            raise FUSEError(errno.EIO) from None
        except OSError as exc:
            self._log_once(exc, f"read of {size} bytes at image offset {off} failed: {exc}")
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:  # a bug must not end the daemon (see _eio_on_bug)
            self.log_unexpected("read", exc)
            raise FUSEError(errno.EIO) from None

    async def _read_into_buffer(self, read_into: ReadIntoFn, off: int, size: int, inline: bool) -> memoryview:
        """Read into a lent buffer (_Buffers says why giving it back before the return is safe)."""
        buffer = self._buffers.take(size)
        try:
            view = buffer[:size]
            if inline:
                filled = read_into(view, off)
            else:
                filled = await trio.to_thread.run_sync(read_into, view, off, limiter=self._blocking_limiter())
        finally:
            self._buffers.give(buffer)
        return view[:filled]

    def _blocking_limiter(self) -> trio.CapacityLimiter:
        if self._limiter is None:  # made on first use, inside trio.run
            self._limiter = trio.CapacityLimiter(max(f.readers for f in self._files))  # one source under all
        return self._limiter

    def _log_once(self, exc: Exception, message: str) -> None:
        """Log a failure at ERROR the first time, then at DEBUG: a guest retries the same read often.

        Keyed on the kind of failure, not its text: the text holds the offset, and a truncated archive read
        at every offset would log a line for each, in a set that grows without bound.
        """
        key = (type(exc).__name__, exc.errno if isinstance(exc, OSError) else None)
        level = logging.DEBUG if key in self._logged_errors else logging.ERROR
        self._logged_errors.add(key)
        log.log(level, "%s", message)

    def log_unexpected(self, handler: str, exc: Exception) -> None:
        """One line for a failure no handler expected (the traceback at DEBUG): it is a bug to report."""
        self._log_once(exc, f"{handler} failed unexpectedly, answered EIO: {type(exc).__name__}: {exc}")
        log.debug("traceback of the %s failure", handler, exc_info=exc)

    @_eio_on_bug
    async def lseek(self, fh: FileHandleT, off: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE from the archive's map, exactly as lseek(2) says (the kernel answers the
        other whences itself). Called only by a pyfuse3 with the handler (scripts/pyfuse3/lseek.patch).

        ENXIO at or past the end and for SEEK_DATA in a trailing hole; never ENOSYS, which would turn the
        call off for every file of the mount until it is unmounted.
        """
        served = self._file(InodeT(fh))
        if off < 0 or off >= served.size:
            raise FUSEError(errno.ENXIO)
        contents = served.contents
        if whence == os.SEEK_DATA:
            found = contents.next_data(off) if contents is not None else served.next_data(off)
            if found is None:
                raise FUSEError(errno.ENXIO)
            return found
        if whence == os.SEEK_HOLE:
            if contents is not None:
                return contents.next_hole(off)
            return served.size if served.next_hole is None else served.next_hole(off)
        raise FUSEError(errno.EINVAL)

    async def release(self, fh: FileHandleT) -> None:
        pass

    async def flush(self, fh: FileHandleT) -> None:
        pass

    @_eio_on_bug
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = _BLOCK
        data.f_blocks = self._blocks
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self._nodes)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    @_eio_on_bug
    async def getxattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> bytes:
        if name == STATUS_XATTR and inode == pyfuse3.ROOT_INODE and self._status is not None:
            if ctx.uid not in (0, os.getuid()):  # where the index and spill are is the mount owner's business
                raise FUSEError(errno.EACCES)
            return self._status()
        served = self._node(inode).served  # looked up in the file's own map: no copy kept per file
        value = None if served is None else served.xattrs.get(os.fsdecode(name))
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    @_eio_on_bug
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[bytes]:
        served = self._node(inode).served
        return [] if served is None else [os.fsencode(key) for key in served.xattrs]

    # Everything below would change the file system: refuse, as a read-only file system must.

    async def setattr(self, *args: object) -> pyfuse3.EntryAttributes:
        raise FUSEError(errno.EROFS)

    async def write(self, *args: object) -> int:
        raise FUSEError(errno.EROFS)

    async def setxattr(self, *args: object) -> None:
        raise FUSEError(errno.EROFS)

    async def removexattr(self, *args: object) -> None:
        raise FUSEError(errno.EROFS)

    async def create(self, *args: object) -> tuple[FileInfo, pyfuse3.EntryAttributes]:
        raise FUSEError(errno.EROFS)

    async def mknod(self, *args: object) -> pyfuse3.EntryAttributes:
        raise FUSEError(errno.EROFS)

    async def mkdir(self, *args: object) -> pyfuse3.EntryAttributes:
        raise FUSEError(errno.EROFS)

    async def symlink(self, *args: object) -> pyfuse3.EntryAttributes:
        raise FUSEError(errno.EROFS)

    async def link(self, *args: object) -> pyfuse3.EntryAttributes:
        raise FUSEError(errno.EROFS)

    async def unlink(self, *args: object) -> None:
        raise FUSEError(errno.EROFS)

    async def rmdir(self, *args: object) -> None:
        raise FUSEError(errno.EROFS)

    async def rename(self, *args: object) -> None:
        raise FUSEError(errno.EROFS)
