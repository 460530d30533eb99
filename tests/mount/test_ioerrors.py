"""The storage under the archive fails some reads (bad sectors): those image reads fail, all others work.

The archive sits on tests/kit/faultyfs.py, a FUSE file system that returns EIO for chosen byte ranges of
the file and bypasses the page cache. device-mapper's `error` target over a loop device would do too, but
this machine's kernel has no device-mapper (no /dev/mapper/control, no dm_mod), and a FUSE file system
needs nothing but what the other mount tests need. The oracle is the sample image's own bytes.
"""

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kit.mounts import (
    Mount,
    foreground_mount,
    is_mounted,
    tarfuse_command,
    unmount,
)
from kit.sample import SampleImage, data_runs
from kit.storage import Storage, faulty_storage

pytestmark = pytest.mark.fuse

PAGE = 4096


@dataclass(frozen=True, slots=True)
class BadSpot:
    """A range of the archive that fails, and the image range whose data it holds."""

    archive_offset: int
    image_offset: int
    length: int

    def image_pages(self) -> set[int]:
        """The image pages that cannot be read: the kernel reads a FUSE file a page at a time, at least."""
        first, last = self.image_offset // PAGE, (self.image_offset + self.length - 1) // PAGE
        return {page * PAGE for page in range(first, last + 1)}


def bad_spot_in_data(archive: Path, sample: SampleImage) -> BadSpot:
    """4 KiB of the archive in the middle of the image's largest data run, found by its bytes."""
    run = max(data_runs(len(sample.data)), key=lambda r: len(r.data))
    found = archive.read_bytes().find(run.data)
    assert found > 0, "the data run is not stored contiguously in the archive"
    skip = 64 * 1024 + 100  # inside the run, and aligned to nothing
    return BadSpot(found + skip, run.offset + skip, PAGE)


@contextlib.contextmanager
def served_from_faulty_storage(
    archive: Path, tmp_path: Path, *bad: tuple[int, int]
) -> Iterator[tuple[Storage, Mount]]:
    with faulty_storage(archive, tmp_path, *bad) as storage:
        (mountpoint := tmp_path / "mnt").mkdir()
        with foreground_mount(storage.archive, mountpoint) as served:
            yield storage, served


def read_around_errors(image: Path, size: int) -> tuple[bytearray, set[int]]:
    """Read the whole image as a careful copier does: on EIO note the page and go on with the next one."""
    data, failed = bytearray(size), set()
    fd = os.open(image, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            try:
                chunk = os.pread(fd, 1 << 20, offset)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                failed.add(offset)
                offset = (offset // PAGE + 1) * PAGE
                continue
            assert chunk, f"unexpected end of file at {offset}"
            data[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
    finally:
        os.close(fd)
    return data, failed


def test_only_the_pages_on_bad_storage_fail_and_all_other_bytes_are_right(
    sample_archive: Path, sample_image: SampleImage, tmp_path: Path
) -> None:
    spot = bad_spot_in_data(sample_archive, sample_image)
    with served_from_faulty_storage(sample_archive, tmp_path, (spot.archive_offset, spot.length)) as (
        _,
        served,
    ):
        data, failed = read_around_errors(served.mountpoint / "disk.raw", len(sample_image.data))
        assert served.process.poll() is None, "the daemon must keep running"
    assert failed == spot.image_pages()
    for page in failed:
        data[page : page + PAGE] = sample_image.data[page : page + PAGE]
    assert data == sample_image.data
    assert "Input/output error" in served.stderr_text()


def test_a_read_of_bad_storage_fails_with_eio_then_succeeds_once_the_storage_heals(
    sample_archive: Path, sample_image: SampleImage, tmp_path: Path
) -> None:
    spot = bad_spot_in_data(sample_archive, sample_image)
    start, end = spot.image_offset - 10_000, spot.image_offset + 10_000
    with served_from_faulty_storage(sample_archive, tmp_path, (spot.archive_offset, spot.length)) as (
        storage,
        served,
    ):
        fd = os.open(served.mountpoint / "disk.raw", os.O_RDONLY)
        try:
            with pytest.raises(OSError, match="Input/output error") as caught:
                os.pread(fd, end - spot.image_offset, spot.image_offset)
            storage.fail()
            healed = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
        assert served.process.poll() is None
    assert caught.value.errno == errno.EIO
    assert healed == sample_image.data[start:end]


def test_bad_storage_under_the_headers_refuses_the_mount_with_one_line(
    sample_archive: Path, tmp_path: Path
) -> None:
    with faulty_storage(sample_archive, tmp_path, (0, 512)) as storage:
        (mountpoint := tmp_path / "mnt").mkdir()
        try:
            result = subprocess.run(
                tarfuse_command("-f", storage.archive, mountpoint),
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
                check=False,
            )
            mounted = is_mounted(mountpoint)
        finally:
            unmount(mountpoint)
    assert (result.returncode, mounted) == (1, False)
    assert result.stderr.startswith("tarfuse: ")
    assert "Input/output error" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
