"""The bytes under the tar reader: an archive file opened read-only, read with positional reads.

Positional reads share no file position, so threads and concurrent FUSE requests need no lock.
`PreadFile` turns any source into a seekable file object, for decompressors that take one.
"""

import io
import os
import stat
import threading
from typing import TYPE_CHECKING, Protocol

from tarfuse.errors import ArchiveChanged, UsageError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

Identity = list[int | str | None]  # what names one version of an archive (the seek index's key)


class ByteSource(Protocol):
    """What the layers above read through: ArchiveFile, remote.RemoteArchive, compressed.CompressedSource.

    What the assembly (mount.py) needs to know of a source is said here, so that it never asks which
    class it holds: whether a read may wait, how many may run at once, and whether `size` is final.
    """

    path: str
    blocking: bool  # a read may wait (network, decompression): the daemon serves it from a thread
    readers: int  # how many reads may run at once (in threads) when `blocking`

    @property
    def size(self) -> int: ...
    @property
    def size_known(self) -> bool: ...  # False while a compressed stream's end is not reached

    def read_at(self, offset: int, size: int) -> bytes: ...
    def pread_into(self, buffer: memoryview, offset: int) -> int: ...
    def check_unchanged(self) -> None: ...
    def identity(self) -> Identity: ...  # one version of the archive, for the seek index's key
    def close(self) -> None: ...


class ArchiveFile:
    """An archive opened O_RDONLY, with the identity it had when opened, to notice later changes."""

    blocking = False  # a read of a local file is served inline, on the event loop (fs.py)
    readers = 1
    size_known = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            info = os.fstat(self.fd)
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
                raise UsageError(f"{path}: not a regular file or block device")
            self.size = info.st_size if stat.S_ISREG(info.st_mode) else _device_size(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self._identity = (info.st_size, info.st_mtime_ns)
        self._is_regular = stat.S_ISREG(info.st_mode)
        self._key: Identity = [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns]

    def read_at(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pread_into(self, buffer: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [buffer], offset)

    def check_unchanged(self) -> None:
        """Raise ArchiveChanged if the file was truncated, grown or rewritten since it was opened."""
        if not self._is_regular:
            return
        info = os.fstat(self.fd)
        if (info.st_size, info.st_mtime_ns) != self._identity:
            raise ArchiveChanged(
                f"{self.path} changed while mounted (size {self._identity[0]} -> {info.st_size}); "
                "unmount and mount it again"
            )

    def identity(self) -> Identity:
        return self._key

    def close(self) -> None:
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
