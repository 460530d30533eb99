"""The bytes under the tar reader: an archive file opened read-only, read with positional reads.

Positional reads share no file position, so threads and concurrent FUSE requests need no lock.
`PreadFile` turns any source into a seekable file object, for decompressors that take one.
"""

import contextlib
import enum
import fcntl
import io
import os
import signal
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from tarfuse.errors import ArchiveChanged
from tarfuse.sources.opening import open_archive

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from tarfuse.sources.compression import Compression

Identity = list[int | str | None]  # what names one version of an archive (the seek index's key)

# fcntl(2) lease commands (Linux); Python's fcntl module has them from 3.12 on.
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)


class IndexHome(enum.Enum):
    """Where the seek index of a compressed stream read through a source may be kept (index.default_path)."""

    BESIDE = "beside"  # a local file: beside it, if nobody but the caller or root can change its directory
    CACHE = "cache"  # a URL: only the cache directory
    INNER = "inner"  # a member of an archive: the cache, keyed by identity; -o index= names the archive's


class Background(enum.Enum):
    """What a mount does with a source in the background, once it is served."""

    NONE = "none"  # nothing: every read is answered from what is there
    VERIFY = "verify"  # read it whole once against its checksum, which its chunks lack (dictzip)
    INDEX = "index"  # decompress it whole once: the seek index, its size, other images, a spill if needed


class ByteSource(Protocol):
    """What the layers above read through: ArchiveFile, http.archive.RemoteArchive, member.MemberSource,
    compressed.CompressedSource, dictzip.DictzipSource.

    What the assembly (mount.py) needs to know of a source is said here, so that it never asks which
    class it holds: whether a read may wait and how many may run at once, whether `size` is final, what
    it does in the background, where an index of it may live, and what it must do before a fork.
    `SourceDefaults` gives the answers of a source that has nothing of the kind.
    """

    path: str
    blocking: bool  # a read may wait (network, decompression): the daemon serves it from a thread
    readers: int  # how many reads may run at once (in threads) when `blocking`

    @property
    def compression(self) -> "Compression | None": ...  # what it was decompressed from; None: as stored
    @property
    def background(self) -> Background: ...
    @property
    def index_home(self) -> IndexHome: ...
    @property
    def local_fd(self) -> int | None: ...  # a local file's descriptor: decoders reopen it (/proc/self/fd)
    @property
    def cache_capacity(self) -> int: ...  # bytes of the mount's cache budget this source keeps
    @property
    def size(self) -> int: ...
    @property
    def size_known(self) -> bool: ...  # False while a compressed stream's end is not reached

    def read_at(self, offset: int, size: int) -> bytes: ...
    def pread_into(self, buffer: memoryview, offset: int) -> int: ...
    def cached(self, offset: int, size: int) -> bool: ...  # a read of these bytes would not wait
    def check_unchanged(self) -> None: ...
    def identity(self) -> Identity: ...  # one version of the archive, for the seek index's key
    def watch_for_writers(self) -> str | None: ...  # ArchiveFile's read lease; what came of it, to log
    # a descriptor reads may go to without a check after each (ArchiveFile under its lease); `leave` is
    # called when that ends, before the file can change
    def serve_directly(self, leave: Callable[[], None]) -> int | None: ...
    def fetched(self) -> int | None: ...  # bytes fetched over the network so far; None: not a network source
    def before_fork(self) -> None: ...  # drop what does not survive fork(): a decoder's threads
    # a part of a side object published beside a remote archive (RemoteArchive), and its length
    def beside_part(self, suffix: str, offset: int, size: int) -> tuple[bytes, int] | None: ...
    def recorded_reads(self) -> bytes | None: ...  # -o record_reads: the read list to write at unmount
    def read_list(self) -> str | None: ...  # what came of a published read list; None: not an object URL
    def close(self) -> None: ...


class StreamOfArchive:
    """What a stream decompressed from an archive answers as that archive does: the bytes fetched, the
    read list, and the watch for writers (a local file's read lease, a remote object's read list: the
    archive under the stream is what changes, and what serves)."""

    archive: ByteSource

    def fetched(self) -> int | None:
        return self.archive.fetched()

    def recorded_reads(self) -> bytes | None:
        return self.archive.recorded_reads()

    def read_list(self) -> str | None:
        return self.archive.read_list()

    def watch_for_writers(self) -> str | None:
        return self.archive.watch_for_writers()


class SourceDefaults:
    """The answers of a source with no decompression, no background work and nothing to do at a fork."""

    compression: "Compression | None" = None
    background = Background.NONE
    index_home = IndexHome.CACHE
    local_fd: int | None = None
    cache_capacity = 0

    def cached(self, offset: int, size: int) -> bool:
        return False

    def watch_for_writers(self) -> str | None:
        return None

    def serve_directly(self, leave: Callable[[], None]) -> int | None:
        return None

    def fetched(self) -> int | None:
        return None

    def before_fork(self) -> None:
        pass

    def recorded_reads(self) -> bytes | None:
        return None

    def read_list(self) -> str | None:
        return None

    def beside_part(self, suffix: str, offset: int, size: int) -> tuple[bytes, int] | None:
        """Part of the object published as `<this object><suffix>`: a remote archive's only (a local
        archive's side files are opened as whoever controls its directory: sidefiles.py)."""
        return None


class ArchiveFile(SourceDefaults):
    """An archive opened O_RDONLY, with the identity it had when opened, to notice later changes."""

    blocking = False  # a read of a local file is served inline, on the event loop (fs.py)
    readers = 1
    size_known = True
    index_home = IndexHome.BESIDE

    def __init__(self, path: str, say: Callable[[str], None] = lambda line: None) -> None:
        """`say` hears whose rights opened it, if not the caller's (opening.py)."""
        self.path = path
        self.fd = open_archive(path, say=say)  # a regular file or block device
        self.local_fd = self.fd
        try:
            info = os.fstat(self.fd)
            self.size = info.st_size if stat.S_ISREG(info.st_mode) else _device_size(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self._identity = (info.st_size, info.st_mtime_ns)
        self._is_regular = stat.S_ISREG(info.st_mode)
        self._key: Identity = [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns]
        self._leased = False  # a read lease is held: nobody can have opened the file for writing
        self._lease_fd: int | None = None
        self._leave: Callable[[], None] = lambda: None  # serve_directly's, when the lease ends

    def read_at(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pread_into(self, buffer: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [buffer], offset)

    def check_unchanged(self) -> None:
        """Raise ArchiveChanged if the file was truncated, grown or rewritten since it was opened."""
        if self._leased or not self._is_regular:
            return
        info = os.fstat(self.fd)
        if (info.st_size, info.st_mtime_ns) != self._identity:
            raise ArchiveChanged(
                f"{self.path} changed while mounted (size {self._identity[0]} -> {info.st_size}); "
                "unmount and mount it again"
            )

    def watch_for_writers(self) -> str:
        """Have the kernel tell this process before anyone may change the file; say what came of it.

        check_unchanged's fstat after every read is a tenth of a request's CPU (docs/benchmarks.md). A
        read lease (fcntl F_SETLEASE) makes every open for writing and every truncate of the file wait
        until its holder lets go, and sends the holder SIGIO first. While the lease is held nobody can
        have changed the file, so the check needs no fstat. At the first SIGIO the handler goes back to
        the fstat check and then lets go: a read that overlaps the change is checked as before, and a
        writer that opens the file and writes nothing costs nothing more (reads go on, fstat-checked).

        A lease is had only by the file's owner or root (CAP_LEASE), only while nobody has the file open
        for writing, and only on file systems that have leases; otherwise every read fstats, as before,
        and the answer says why. A lease belongs to one open file and signals one process: call it in
        each process that serves, after any fork, from its main thread (a signal handler is installed).
        """
        without = f"no read lease on {self.path}"
        if not self._is_regular:
            return f"{without}: not a regular file, nothing to check"
        if self._lease_fd is not None:
            return f"{without}: asked twice"
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)  # this process's own
        except OSError as exc:
            return f"{without} ({exc.strerror}): every read is followed by an fstat"

        def let_go(_signum: int, _frame: object) -> None:
            with contextlib.suppress(OSError):
                if fcntl.fcntl(fd, _F_GETLEASE) == fcntl.F_RDLCK:
                    return  # not a lease break (during one this says what the lease goes to): a stray SIGIO
            self._leased = False  # first: a read that already ran is checked with fstat
            self._leave()  # and no read goes to the descriptor unchecked any more
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)

        previous = signal.signal(signal.SIGIO, let_go)  # before the lease: its signal must not kill us
        try:
            fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            signal.signal(signal.SIGIO, previous)
            os.close(fd)
            return f"{without} ({exc.strerror}): every read is followed by an fstat"
        self._lease_fd = fd
        info = os.fstat(self.fd)
        # A change between the open and the lease: leave the fstat check on, and it will say so.
        self._leased = (info.st_size, info.st_mtime_ns) == self._identity
        if not self._leased:
            return f"{without}: it changed since it was opened"
        return f"read lease on {self.path}: reads need no fstat until someone opens it for writing"

    def serve_directly(self, leave: Callable[[], None]) -> int | None:
        """The descriptor, while reads of it need no check after each: under the read lease, or a block
        device (check_unchanged has nothing to check); `leave` is called from the lease break's handler,
        before the lease is given back (and so before anyone can write)."""
        if not (self._leased or not self._is_regular):
            return None
        self._leave = leave
        return self.fd

    def identity(self) -> Identity:
        return self._key

    def close(self) -> None:
        if self._lease_fd is not None:
            self._leased = False
            os.close(self._lease_fd)  # which ends the lease
            self._lease_fd = None
        os.close(self.fd)

    def __enter__(self) -> "ArchiveFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PreadFile(io.RawIOBase):
    """A read-only, seekable file object over a source's `pread_into`; closing it leaves the source open.

    The position is guarded by a lock: a library may call it from its own threads.
    """

    def __init__(self, source: ByteSource) -> None:
        super().__init__()
        self._source = source
        self._position = 0
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        with self._lock:
            base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._source.size}[whence]
            if base + offset < 0:
                raise ValueError(f"negative seek position {base + offset}")
            self._position = base + offset
            return self._position

    def readinto(self, buffer: "WriteableBuffer") -> int:
        with self._lock:
            filled = self._source.pread_into(memoryview(buffer).cast("B"), self._position)
            self._position += filled
            return filled


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)
