"""Faults under a live mount: the archive changes or the daemon dies; never wrong bytes, a clear way out."""

import errno
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from kit.mounts import Mount, MountFactory, is_mounted, tarfuse_command, unmount
from kit.needs import require_root
from kit.sample import SampleImage
from kit.users import as_user, temporary_user

pytestmark = pytest.mark.fuse


@pytest.fixture
def archive_copy(sample_archive: Path, tmp_path: Path) -> Path:
    """A private copy of the sample archive, for tests that damage it."""
    copy = tmp_path / "vm.tar"
    shutil.copyfile(sample_archive, copy)
    return copy


def read_first_megabyte(image: Path) -> bytes:
    with image.open("rb", buffering=0) as file:
        return file.read(1 << 20)


# With several workers the check must hold in each: every read below fails, whichever process takes it.
WORKERS = pytest.mark.parametrize("workers", [1, 2], ids=lambda n: f"workers={n}")


@WORKERS
def test_truncated_archive_makes_reads_fail_with_eio(
    archive_copy: Path, mount: MountFactory, tmp_path: Path, workers: int
) -> None:
    (tmp_path / "mnt.raw").touch()
    served = mount(archive_copy, tmp_path / "mnt.raw", "-o", f"workers={workers}")
    os.truncate(archive_copy, 4096)
    for _ in range(10):
        with pytest.raises(OSError, match="Input/output error") as caught:
            read_first_megabyte(served.mountpoint)
        assert caught.value.errno == errno.EIO
    assert served.process.poll() is None, "the daemon must keep running"
    assert "changed while mounted" in served.stderr_text()


@WORKERS
def test_archive_rewritten_in_place_makes_reads_fail_with_eio(
    archive_copy: Path, mount: MountFactory, tmp_path: Path, workers: int
) -> None:
    (tmp_path / "mnt.raw").touch()
    served = mount(archive_copy, tmp_path / "mnt.raw", "-o", f"workers={workers}")
    with archive_copy.open("r+b") as file:
        file.seek(1 << 20)
        file.write(b"\xff" * 4096)
    os.utime(archive_copy, ns=(0, 12345))  # mtime granularity must not hide the change
    for _ in range(10):
        with pytest.raises(OSError, match="Input/output error") as caught:
            read_first_megabyte(served.mountpoint)
        assert caught.value.errno == errno.EIO


def _leases_on(path: Path) -> set[int]:
    """The pids holding a lease on `path` (/proc/locks: "1: LEASE ACTIVE READ PID MAJ:MIN:INODE 0 EOF")."""
    inode = path.stat().st_ino
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        words = line.split()
        if words[1] == "LEASE" and int(words[5].rsplit(":", 1)[1]) == inode:
            holders.add(int(words[4]))
    return holders


def _serving_pids(served: Mount) -> set[int]:
    children = Path(f"/proc/{served.process.pid}/task/{served.process.pid}/children").read_text().split()
    return {int(pid) for pid in children} or {served.process.pid}  # the workers, or the one process


@WORKERS
def test_each_serving_process_leases_the_archive_and_a_writer_that_writes_nothing_changes_nothing(
    archive_copy: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path, workers: int
) -> None:
    """The read lease spares every read its fstat (ArchiveFile.watch_for_writers): the kernel tells the
    holder before the file can be opened for writing, and the holder goes back to the fstat check and
    lets go at once (a writer would otherwise wait up to lease-break-time, 45 s)."""
    (tmp_path / "mnt.raw").touch()
    served = mount(archive_copy, tmp_path / "mnt.raw", "-o", f"workers={workers}")
    assert _leases_on(archive_copy) == _serving_pids(served)
    started = time.monotonic()
    with archive_copy.open("r+b"):
        assert time.monotonic() - started < 5, "the lease was not let go"
    assert _leases_on(archive_copy) == set()
    for _ in range(10):  # opened for writing but unchanged: served as before, each read fstat-checked
        with served.mountpoint.open("rb", buffering=0) as image:
            assert image.read(1 << 20) == sample_image.data[: 1 << 20]
            os.posix_fadvise(image.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the next read asks again


def test_without_a_lease_every_read_is_still_checked(
    archive_copy: Path, mount: MountFactory, tmp_path: Path
) -> None:
    """No lease while someone has the archive open for writing: the fstat after every read stays."""
    (tmp_path / "mnt.raw").touch()
    with archive_copy.open("r+b") as writer:
        served = mount(archive_copy, tmp_path / "mnt.raw")
        assert _leases_on(archive_copy) == set()
        writer.seek(1 << 20)
        writer.write(b"\xff" * 4096)
        writer.flush()
        os.utime(archive_copy, ns=(0, 12345))
        with pytest.raises(OSError, match="Input/output error"):
            read_first_megabyte(served.mountpoint)


def test_archive_replaced_by_rename_keeps_serving_the_original(
    archive_copy: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    (tmp_path / "mnt.raw").touch()
    served = mount(archive_copy, tmp_path / "mnt.raw")
    replacement = tmp_path / "other.tar"
    replacement.write_bytes(b"\0" * 10240)
    os.rename(replacement, archive_copy)
    assert read_first_megabyte(served.mountpoint) == sample_image.data[: 1 << 20]


def test_after_sigkill_a_new_mount_says_how_to_clear_the_stale_one(
    sample_archive: Path, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    daemon = subprocess.Popen(tarfuse_command("-f", sample_archive, mountpoint), stderr=subprocess.DEVNULL)
    try:
        _wait_until_listed(mountpoint)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        again = subprocess.run(
            tarfuse_command(sample_archive, mountpoint), capture_output=True, text=True, timeout=30
        )
        assert again.returncode == 2
        assert "stale" in again.stderr
        assert f"fusermount3 -u {mountpoint}" in again.stderr
    finally:
        daemon.kill()
        daemon.wait()
        unmount(mountpoint)


def _wait_until_listed(mountpoint: Path) -> None:
    deadline = time.monotonic() + 20
    while not is_mounted(mountpoint):
        assert time.monotonic() < deadline, "tarfuse did not mount"
        time.sleep(0.05)


def test_a_user_who_owns_roots_archive_cannot_change_it_unseen_under_the_lease(
    sample_archive: Path, mount: MountFactory, tmp_path: Path
) -> None:
    """Root serves an archive another user owns and may rewrite (a shared download directory). Root's
    daemon holds a read lease (CAP_LEASE); the user's in-place rewrite breaks it, is held only for the
    moment the daemon needs, and every read after it fails with EIO instead of serving their bytes."""
    require_root()
    top = Path(tempfile.mkdtemp(prefix="tarfuse-lease-"))  # outside pytest's 0700 tmp_path
    try:
        top.chmod(0o755)
        archive = top / "vm.tar"
        shutil.copyfile(sample_archive, archive)
        with temporary_user() as user:
            os.chown(archive, user.uid, user.gid)
            (tmp_path / "mnt.raw").touch()
            served = mount(archive, tmp_path / "mnt.raw")
            assert _leases_on(archive) == {served.process.pid}
            started = time.monotonic()
            subprocess.run(
                as_user(user, "dd", f"of={archive}", "bs=4096", "seek=256", "count=1", "conv=notrunc"),
                input=b"\xff" * 4096,
                capture_output=True,
                check=True,
                timeout=60,
            )
            assert time.monotonic() - started < 5, "the user's write was held for the lease-break time"
            with pytest.raises(OSError, match="Input/output error"):
                read_first_megabyte(served.mountpoint)
    finally:
        shutil.rmtree(top, ignore_errors=True)
