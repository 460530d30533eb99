"""Storage with bad sectors, for tests: a FUSE file system holding one file that fails chosen ranges with EIO.

It stands in for device-mapper's `error` target where the kernel has no device-mapper
(tests/mount/test_ioerrors.py says when). The file is passed through read-only from SOURCE; a read that
overlaps a failing range fails with EIO, every other read returns the file's bytes. Reads bypass the page
cache (direct_io), so each read of the file reaches this process and a failing range fails every time, as
a bad sector does.

    python faultyfs.py SOURCE MOUNTPOINT RANGES

MOUNTPOINT is a directory; the file appears in it under SOURCE's name. RANGES is a text file of lines
"OFFSET LENGTH" (bytes of SOURCE), read again at every read, so a test can change the faults while mounted.
"""

import errno
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileInfo, FUSEError, InodeT, RequestContext

FILE_INODE = InodeT(pyfuse3.ROOT_INODE + 1)


class FaultyFs(pyfuse3.Operations):
    """One read-only file, passed through, with EIO for the ranges listed in a file."""

    def __init__(self, source: Path, ranges: Path) -> None:
        super().__init__()
        self._fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        self._info = os.fstat(self._fd)
        self._name = os.fsencode(source.name)
        self._ranges = ranges

    def _failing(self, offset: int, size: int) -> bool:
        for line in self._ranges.read_text().splitlines():
            start, length = map(int, line.split())
            if offset < start + length and start < offset + size:
                return True
        return False

    async def getattr(self, inode: InodeT, ctx: RequestContext | None = None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = self._info.st_mtime_ns
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o555, 2
        elif inode == FILE_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o444, 1, self._info.st_size
        else:
            raise FUSEError(errno.ENOENT)
        return attr

    async def lookup(
        self, parent_inode: InodeT, name: bytes, ctx: RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != self._name:
            raise FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE)

    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        return FileHandleT(inode)

    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self._name, await self.getattr(FILE_INODE), 1)

    async def open(self, inode: InodeT, flags: int, ctx: RequestContext) -> FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FUSEError(errno.EROFS)
        return FileInfo(fh=FileHandleT(inode), direct_io=True)

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        if self._failing(off, size):
            raise FUSEError(errno.EIO)
        return os.pread(self._fd, size, off)


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(source: str, mountpoint: str, ranges: str) -> None:
    fs = FaultyFs(Path(source), Path(ranges))
    pyfuse3.init(fs, mountpoint, {"ro", "fsname=faultyfs", "subtype=faultyfs"})
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
