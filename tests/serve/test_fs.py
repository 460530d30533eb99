"""The pyfuse3 handlers, awaited directly (no kernel): attributes, errno mapping, read-only everywhere."""

import errno
import logging
import os
import stat

import pyfuse3
import pytest
from pyfuse3 import FUSEError, InodeT

from tarfuse.errors import ArchiveChanged, TruncatedArchive
from tarfuse.serve.fs import IMAGE_INODE, ImageFs
from tarfuse.served import ServedFile

ROOT = InodeT(pyfuse3.ROOT_INODE)
IMAGE = bytes(range(256)) * 64  # 16 KiB


def served(read=None, **overrides) -> ServedFile:
    fields = {
        "name": "disk.raw",
        "size": len(IMAGE),
        "mtime_ns": 1_700_000_000 * 10**9,
        "stored_bytes": 4096,
        "read": read or (lambda offset, size: IMAGE[offset : offset + size]),
        "xattrs": {"user.tarfuse.member": b"dir/disk.raw", "user.tarfuse.format": b"raw"},
        "uid": 1234,
        "gid": 5678,
    }
    fields.update(overrides)
    return ServedFile(**fields)


async def test_directory_root_lists_the_image_under_its_name():
    fs = ImageFs(served(), root_is_file=False)
    root = await fs.getattr(ROOT)
    assert stat.S_ISDIR(root.st_mode)
    entry = await fs.lookup(ROOT, b"disk.raw")
    assert entry.st_ino == IMAGE_INODE
    assert stat.S_ISREG(entry.st_mode)
    with pytest.raises(FUSEError) as caught:
        await fs.lookup(ROOT, b"other.raw")
    assert caught.value.errno == errno.ENOENT


async def test_file_attributes_show_size_owner_mode_mtime_and_stored_blocks():
    fs = ImageFs(served(), root_is_file=False)
    attr = await fs.getattr(IMAGE_INODE)
    assert stat.S_IMODE(attr.st_mode) == 0o444
    assert (attr.st_size, attr.st_uid, attr.st_gid) == (len(IMAGE), 1234, 5678)
    assert attr.st_mtime_ns == 1_700_000_000 * 10**9
    assert attr.st_blocks == 4096 // 512


async def test_umask_narrows_the_mode():
    fs = ImageFs(served(umask=0o227), root_is_file=False)
    assert stat.S_IMODE((await fs.getattr(IMAGE_INODE)).st_mode) == 0o440
    assert stat.S_IMODE((await fs.getattr(ROOT)).st_mode) == 0o550


async def test_file_root_is_the_image_itself():
    fs = ImageFs(served(), root_is_file=True)
    attr = await fs.getattr(ROOT)
    assert stat.S_ISREG(attr.st_mode)
    assert attr.st_size == len(IMAGE)
    with pytest.raises(FUSEError) as caught:
        await fs.opendir(ROOT, None)
    assert caught.value.errno == errno.ENOTDIR


async def test_read_returns_the_image_bytes():
    fs = ImageFs(served(), root_is_file=True)
    info = await fs.open(ROOT, os.O_RDONLY, None)
    assert info.keep_cache
    assert bytes(await fs.read(info.fh, 1000, 3000)) == IMAGE[1000:4000]


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
async def test_open_for_writing_is_refused_with_erofs(flags):
    fs = ImageFs(served(), root_is_file=True)
    with pytest.raises(FUSEError) as caught:
        await fs.open(ROOT, flags, None)
    assert caught.value.errno == errno.EROFS


@pytest.mark.parametrize(
    ("handler", "args"),
    [
        ("setattr", (ROOT, None, None, None, None)),
        ("write", (1, 0, b"x")),
        ("setxattr", (ROOT, b"user.x", b"1", None)),
        ("removexattr", (ROOT, b"user.x", None)),
        ("create", (ROOT, b"new", 0o644, os.O_WRONLY, None)),
        ("mknod", (ROOT, b"new", 0o644, 0, None)),
        ("mkdir", (ROOT, b"new", 0o755, None)),
        ("symlink", (ROOT, b"new", b"target", None)),
        ("link", (IMAGE_INODE, ROOT, b"new", None)),
        ("unlink", (ROOT, b"disk.raw", None)),
        ("rmdir", (ROOT, b"dir", None)),
        ("rename", (ROOT, b"disk.raw", ROOT, b"other", 0, None)),
    ],
)
async def test_every_change_is_refused_with_erofs(handler, args):
    fs = ImageFs(served(), root_is_file=False)
    with pytest.raises(FUSEError) as caught:
        await getattr(fs, handler)(*args)
    assert caught.value.errno == errno.EROFS


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ArchiveChanged("archive changed"), errno.EIO),
        (TruncatedArchive("cut short", 1024), errno.EIO),
        (OSError(errno.EIO, "I/O error"), errno.EIO),
        (OSError(errno.ENOMEM, "no memory"), errno.ENOMEM),
    ],
)
async def test_read_failures_become_errno_values(error, expected, caplog):
    def failing_read(offset, size):
        raise error

    fs = ImageFs(served(read=failing_read), root_is_file=True)
    with pytest.raises(FUSEError) as caught:
        await fs.read(1, 0, 4096)
    assert caught.value.errno == expected
    assert "failed" in caplog.text


async def test_a_repeated_failure_is_logged_once_at_error_level(caplog):
    """A truncated archive fails every read past the cut, each with its own offset in the message."""

    def failing_read(offset, size):
        raise TruncatedArchive("archive file ends before the data does", 1000 + offset)

    caplog.set_level(logging.DEBUG, logger="tarfuse.serve.fs")
    fs = ImageFs(served(read=failing_read), root_is_file=True)
    for offset in (0, 4096, 8192):
        with pytest.raises(FUSEError) as caught:
            await fs.read(1, offset, 4096)
        assert caught.value.errno == errno.EIO
    assert [r.levelname for r in caplog.records].count("ERROR") == 1
    assert [r.levelname for r in caplog.records].count("DEBUG") == 2


async def test_failures_of_another_kind_are_logged_too(caplog):
    errors = iter(
        [TruncatedArchive("cut", 512), ArchiveChanged("archive changed"), OSError(errno.EIO, "bad")]
    )

    def failing_read(offset, size):
        raise next(errors)

    fs = ImageFs(served(read=failing_read), root_is_file=True)
    for _ in range(3):
        with pytest.raises(FUSEError):
            await fs.read(1, 0, 4096)
    assert [r.levelname for r in caplog.records].count("ERROR") == 3


async def test_xattrs_describe_the_member():
    fs = ImageFs(served(), root_is_file=False)
    assert set(await fs.listxattr(IMAGE_INODE, None)) == {b"user.tarfuse.member", b"user.tarfuse.format"}
    assert await fs.getxattr(IMAGE_INODE, b"user.tarfuse.member", None) == b"dir/disk.raw"
    with pytest.raises(FUSEError) as caught:
        await fs.getxattr(IMAGE_INODE, b"user.other", None)
    assert caught.value.errno == pyfuse3.ENOATTR


async def test_statfs_reports_a_full_read_only_file_system():
    fs = ImageFs(served(), root_is_file=False)
    data = await fs.statfs(None)
    assert data.f_blocks == len(IMAGE) // 4096
    assert (data.f_bfree, data.f_bavail, data.f_ffree) == (0, 0, 0)


async def test_blocking_reads_run_in_threads_and_overlap():
    import threading

    import trio

    both_inside = threading.Barrier(2, timeout=5)  # passes only if two reads run at the same time

    def slow_read(offset, size):
        both_inside.wait()
        return IMAGE[offset : offset + size]

    fs = ImageFs(served(read=slow_read, blocking=True), root_is_file=True)
    results = {}

    async def read_at(offset):
        results[offset] = bytes(await fs.read(1, offset, 100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_at, 0)
        nursery.start_soon(read_at, 5000)
    assert results == {0: IMAGE[:100], 5000: IMAGE[5000:5100]}


def test_the_after_init_hook_runs_once_and_only_after_init():
    calls = []
    fs = ImageFs(served(), root_is_file=True, after_init=lambda: calls.append("tuned"))
    fs.after_init_replied()  # the wait for the INIT request itself: too early
    assert calls == []
    fs.init()  # libfuse builds the INIT reply now
    assert calls == []
    fs.after_init_replied()  # the wait for the next request: the reply is out
    fs.after_init_replied()
    assert calls == ["tuned"]
