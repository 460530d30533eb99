"""A mount of 100,000 small files (`-o all`): memory stays under the ceiling, and listings are whole.

A served file must cost no read buffer of its own (a megabyte each would make a few thousand small
files cost gigabytes), and a listing must resume from its offset without walking or copying the
directory (which made one `ls -f` grow with the square of the directory's size; its time is measured
in docs/benchmarks.md, not asserted). The archive is built block by block: one header template whose
name and checksum are patched per member. One file more than a mount serves is refused before the files
are opened: the archive's member limit is well above what fits under the ceiling.
"""

import ctypes
import ctypes.util
import itertools
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from kit import tarbuilder as tb
from kit.mounts import Mount, foreground_mount, is_mounted, status_kib, tarfuse_command

from tarfuse.mount import MAX_SERVED_FILES, MAX_SERVED_FILES_CACHED
from tarfuse.serve.fs import ImageFs
from tarfuse.served import ServedFile

pytestmark = pytest.mark.fuse

FILES = 100_000
MEMORY_CEILING_KIB = 256 * 1024  # the daemon's peak RSS for any archive (README, "Limits, said plainly")
MOUNT_DEADLINE_S = 180.0  # scanning 100,000 headers on a loaded 2-CPU machine; a bound, not a measure
_DIGITS = 6


def name_of(number: int, suffix: str = ".txt") -> str:
    return f"f{number:0{_DIGITS}d}{suffix}"


def content_of(number: int) -> bytes:
    return name_of(number).encode()  # each file holds its own name: a read of the wrong member shows


def write_many_files_tar(path: Path, count: int, suffix: str = ".txt") -> None:
    """A ustar archive of `count` files f000000.txt... (or `suffix`) each holding its name, written in
    one pass."""
    template = bytearray(tb.file_member(name_of(0, suffix), name_of(0, suffix).encode()))
    zeros_sum = ord("0") * _DIGITS
    base_checksum = tb.checksum(template) - zeros_sum  # all but the name's digits
    with path.open("wb") as out:
        for number in range(count):
            digits = b"%0*d" % (_DIGITS, number)
            template[1 : 1 + _DIGITS] = digits  # in the name field, after "f"
            template[512 + 1 : 512 + 1 + _DIGITS] = digits  # in the data, which is the name
            template[148:156] = b"%06o\0 " % (base_checksum + sum(digits))
            out.write(template)
        out.write(tb.END)


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """The archive mounted with `-o all` in one process (`workers=1`: one peak RSS to read)."""
    where = tmp_path_factory.mktemp("many")
    archive = where / "many.tar"
    write_many_files_tar(archive, FILES)
    (mountpoint := where / "mnt").mkdir()
    with foreground_mount(archive, mountpoint, "-o", "all,workers=1", timeout=MOUNT_DEADLINE_S) as mounted:
        yield mounted


@pytest.fixture(scope="module")
def one_too_many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file more than a mount serves, each named like a disk image: a directory mount point would
    serve every one of them even without -o all."""
    archive = tmp_path_factory.mktemp("too-many") / "disks.tar"
    write_many_files_tar(archive, MAX_SERVED_FILES + 1, suffix=".img")
    return archive


def mount_refused(archive: Path, mountpoint: Path, *options: str) -> str:
    """Run `tarfuse` (no -f: it returns once mounted, or on its error), check it mounted nothing and
    exited 1, and return what it said."""
    mountpoint.mkdir()
    command = tarfuse_command(archive, mountpoint, *options)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=MOUNT_DEADLINE_S, check=False
        )
    finally:
        if is_mounted(mountpoint):  # a mount the test did not expect: leave none behind (its daemon ends)
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert result.returncode == 1, result.stderr
    assert not is_mounted(mountpoint)
    return result.stderr


@pytest.mark.parametrize("options", [("-o", "all"), ()], ids=["all-files", "every-disk-image"])
def test_one_file_more_than_a_mount_serves_is_refused_in_one_line(
    one_too_many: Path, tmp_path: Path, options: tuple[str, ...]
) -> None:
    said = mount_refused(one_too_many, tmp_path / "mnt", *options)
    assert said.count("\n") == 1, said
    assert f"holds {MAX_SERVED_FILES + 1:,}" in said
    assert f"the {MAX_SERVED_FILES:,} one mount serves" in said
    assert "-o member=PATH" in said
    assert "tarfuse --list" in said


def test_a_list_of_more_disk_images_than_a_mount_serves_is_refused_in_one_line(one_too_many: Path) -> None:
    """Every listed image is opened, at the cost a served one has: --list keeps to the same bound."""
    result = subprocess.run(
        tarfuse_command("--list", one_too_many), capture_output=True, text=True, timeout=MOUNT_DEADLINE_S
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"holds {MAX_SERVED_FILES + 1:,} disk images, more than the {MAX_SERVED_FILES:,}" in result.stderr
    assert "tar -tf ARCHIVE" in result.stderr
    assert result.stdout == ""


def test_a_compressed_archive_serves_fewer_files_beside_its_cache(tmp_path: Path) -> None:
    """Its chunk cache and decoders take part of the ceiling: the bound is lower, and refused alike."""
    plain = tmp_path / "disks.tar"
    write_many_files_tar(plain, MAX_SERVED_FILES_CACHED + 1, suffix=".img")
    subprocess.run(["zstd", "-q", "--rm", str(plain)], check=True)
    said = mount_refused(tmp_path / "disks.tar.zst", tmp_path / "mnt", "-o", "all")
    assert f"holds {MAX_SERVED_FILES_CACHED + 1:,}" in said
    assert f"the {MAX_SERVED_FILES_CACHED:,} one mount serves" in said


def expected_names() -> list[str]:
    return [name_of(number) for number in range(FILES)]


def test_a_hundred_thousand_files_stay_under_the_memory_ceiling(many: Mount) -> None:
    for number in range(0, FILES, 997):  # files across the whole archive: each read takes the buffer
        assert (many.mountpoint / name_of(number)).read_bytes() == content_of(number)
    peak = status_kib(many.process.pid, "VmHWM")
    assert peak < MEMORY_CEILING_KIB, f"peak RSS {peak // 1024} MiB for {FILES} files"


def list_at_most(directory: Path, limit: int) -> list[str]:
    """The names one pass of getdents returns (`ls -f`), stopping after `limit`: a listing that never
    ends (an offset that does not move on) fails the test instead of filling memory."""
    with os.scandir(directory) as entries:
        return [entry.name for entry in itertools.islice(entries, limit)]


def test_ls_f_lists_every_name_exactly_once(many: Mount) -> None:
    listed = list_at_most(many.mountpoint, FILES + 1)
    assert len(listed) == FILES
    assert sorted(listed) == expected_names()


class _Dirent(ctypes.Structure):
    """glibc's struct dirent on Linux (dirent64 layout on 64-bit)."""

    _fields_ = (
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    )


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = (ctypes.c_char_p,)
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = (ctypes.c_void_p,)
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = (ctypes.c_void_p,)
    libc.seekdir.restype = None
    libc.seekdir.argtypes = (ctypes.c_void_p, ctypes.c_long)
    libc.closedir.argtypes = (ctypes.c_void_p,)
    return libc


def read_in_pieces(directory: Path, piece: int, limit: int) -> list[str]:
    """List `directory` `piece` entries at a time, each piece from a fresh opendir that seekdir()s to
    where the last one stopped: every piece after the first is a FUSE readdir from a saved offset.
    Stops after about `limit` names, as list_at_most does."""
    libc = _libc()
    names: list[str] = []
    position = 0
    while len(names) <= limit:
        handle = libc.opendir(os.fsencode(directory))
        if not handle:
            raise OSError(ctypes.get_errno(), f"opendir {directory}")
        try:
            libc.seekdir(handle, position)
            got = 0
            while got < piece and (entry := libc.readdir(handle)):
                names.append(os.fsdecode(entry.contents.d_name))
                got += 1
            position = libc.telldir(handle)
        finally:
            libc.closedir(handle)
        if got < piece:
            break
    return [name for name in names if name not in (".", "..")]


def test_a_listing_resumed_from_saved_offsets_gives_every_name_once(many: Mount) -> None:
    # 7,001: not a multiple of what one reply holds, so pieces end in the middle of a reply
    listed = read_in_pieces(many.mountpoint, piece=7_001, limit=FILES + 2)
    assert len(listed) == FILES
    assert sorted(listed) == expected_names()


class _Pattern:
    """Contents whose every byte is a function of the read's offset; each read waits at `meet` after
    filling its buffer, so that two reads in threads are both filled before either returns."""

    def __init__(self, meet: threading.Barrier) -> None:
        self._meet = meet

    def read_into(self, buffer: memoryview, offset: int) -> int:
        buffer[:] = bytes([offset % 251]) * len(buffer)
        self._meet.wait()
        return len(buffer)

    def next_data(self, offset: int) -> int | None:
        return offset

    def next_hole(self, offset: int) -> int:
        return 1 << 30


async def test_reads_in_threads_at_once_never_share_a_lent_buffer() -> None:
    """The buffers are shared across files and reads, but a read waiting on its thread keeps its own."""
    contents = _Pattern(threading.Barrier(2, timeout=10))
    served = ServedFile(
        name="a.img",
        size=1 << 30,
        mtime_ns=0,
        stored_bytes=0,
        read=lambda offset, size: b"",
        xattrs={},
        uid=0,
        gid=0,
        blocking=True,
        contents=contents,
    )
    fs = ImageFs(served, root_is_file=True)
    results: dict[int, bytes] = {}

    async def read_at(offset: int) -> None:
        results[offset] = bytes(await fs.read(1, offset, 4096))  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_at, 1)
        nursery.start_soon(read_at, 2)
    assert results == {1: b"\x01" * 4096, 2: b"\x02" * 4096}
