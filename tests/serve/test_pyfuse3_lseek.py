"""The patched pyfuse3 (scripts/pyfuse3/lseek.patch, built by `make dev`): lseek(2) with SEEK_DATA and
SEEK_HOLE reaches `Operations.lseek` through a real mount, and a file system without that handler sees what it
always did.

This file is also the file system under test: `python test_pyfuse3_lseek.py MOUNTPOINT [--no-lseek]` serves
one sparse file, disk.raw, whose data extents are DATA_EXTENTS, until it is unmounted.
"""

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
from kit.mounts import daemon_mount

NAME = b"disk.raw"
FILE_INODE = pyfuse3.ROOT_INODE + 1
FILE_HANDLE = 7  # not the inode: shows that lseek is given the handle open returned
SIZE = 20_000
# Not block-aligned, so that any rounding by the kernel would show; the file ends in a hole.
DATA_EXTENTS = ((1_000, 3_000), (8_192, 12_288))

HAS_LSEEK = hasattr(pyfuse3.Operations, "lseek")

pytestmark = pytest.mark.fuse


class OneFileFs(pyfuse3.Operations):
    """A read-only directory holding disk.raw, SIZE bytes; no lseek handler of its own."""

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o555
        elif inode == FILE_INODE:
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_size = SIZE
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry.st_ino = inode
        entry.st_nlink = 1
        return entry

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pyfuse3.FileInfo(fh=FILE_HANDLE)

    async def release(self, fh: int) -> None:
        pass


class SparseFileFs(OneFileFs):
    """disk.raw with the holes between and after DATA_EXTENTS, as lseek(2) tells them."""

    async def lseek(self, fh: int, off: int, whence: int) -> int:
        if fh != FILE_HANDLE:
            raise pyfuse3.FUSEError(errno.EBADF)
        if off < 0 or off >= SIZE:
            raise pyfuse3.FUSEError(errno.ENXIO)
        if whence == os.SEEK_DATA:
            for start, end in DATA_EXTENTS:
                if off < end:
                    return max(off, start)
            raise pyfuse3.FUSEError(errno.ENXIO)  # in the trailing hole
        if whence == os.SEEK_HOLE:
            for start, end in DATA_EXTENTS:
                if start <= off < end:
                    return end
            return off
        raise pyfuse3.FUSEError(errno.EINVAL)


def serve(mountpoint: str, operations: pyfuse3.Operations) -> None:
    pyfuse3.init(operations, mountpoint, {"fsname=pyfuse3-lseek-test", "ro"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


@contextlib.contextmanager
def mounted(tmp_path: Path, *args: str) -> Iterator[Path]:
    """Serve disk.raw from a child process running this file; yield its path; unmount at the end."""
    (mountpoint := tmp_path / "mnt").mkdir()
    command = [sys.executable, __file__, mountpoint, *args]
    with daemon_mount(command, mountpoint, tmp_path / "fs.stderr") as served:
        yield mountpoint / NAME.decode()
    assert served.process.returncode == 0, served.stderr_text()


def seek(path: Path, offset: int, whence: int) -> int | str:
    """Return where lseek(2) lands, or the name of its error."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, whence)
    except OSError as error:
        return errno.errorcode[error.errno]
    finally:
        os.close(fd)


D, H = os.SEEK_DATA, os.SEEK_HOLE

ANSWERS = [
    # (offset, whence, answer): data at [1000, 3000) and [8192, 12288) of 20000 bytes
    (0, D, 1_000),
    (999, D, 1_000),
    (1_000, D, 1_000),
    (2_999, D, 2_999),
    (3_000, D, 8_192),
    (12_287, D, 12_287),
    (12_288, D, "ENXIO"),  # no data after the offset: the trailing hole
    (19_999, D, "ENXIO"),
    (SIZE, D, "ENXIO"),  # at the end
    (SIZE + 1, D, "ENXIO"),
    (-1, D, "ENXIO"),  # the kernel passes negative offsets on
    (0, H, 0),
    (1_000, H, 3_000),
    (2_999, H, 3_000),
    (3_000, H, 3_000),
    (8_192, H, 12_288),
    (12_288, H, 12_288),
    (19_999, H, 19_999),
    (SIZE, H, "ENXIO"),
    (-1, H, "ENXIO"),
]


@pytest.mark.skipif(
    not HAS_LSEEK, reason="this pyfuse3 has no lseek handler: `make dev` builds the patched one"
)
def test_seek_data_and_seek_hole_answer_what_the_handler_says(tmp_path: Path) -> None:
    with mounted(tmp_path) as path:
        answers = [(offset, whence, seek(path, offset, whence)) for offset, whence, _ in ANSWERS]
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.lseek(fd, 3_000, os.SEEK_DATA) == 8_192
            assert os.lseek(fd, 0, os.SEEK_CUR) == 8_192  # the kernel moved the file position there
        finally:
            os.close(fd)
    assert answers == ANSWERS


def test_without_an_lseek_handler_the_kernel_says_all_data_as_before(tmp_path: Path) -> None:
    # The default handler raises ENOSYS: the kernel stops asking and treats the whole file as data.
    with mounted(tmp_path, "--no-lseek") as path:
        assert seek(path, 3_000, os.SEEK_DATA) == 3_000
        assert seek(path, 12_288, os.SEEK_DATA) == 12_288
        assert seek(path, 0, os.SEEK_HOLE) == SIZE
        assert seek(path, SIZE, os.SEEK_DATA) == "ENXIO"


if __name__ == "__main__":
    serve(sys.argv[1], OneFileFs() if "--no-lseek" in sys.argv[2:] else SparseFileFs())
