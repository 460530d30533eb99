"""The bytes under the tar reader: an archive file opened read-only, read with positional reads.

Positional reads share no file position, so threads and concurrent FUSE requests need no lock.
Must not import pyfuse3 or trio.
"""

import os
import stat

from tarfuse.errors import ArchiveChanged, UsageError


class ArchiveFile:
    """An archive opened O_RDONLY, with the identity it had when opened, to notice later changes."""

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

    def pread(self, size: int, offset: int) -> bytes:
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

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "ArchiveFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)
