"""Root runs tarfuse from fstab and systemd units: what the command line, the mount point and a failing fork
must not let anyone else steer.

Each test reproduces one way a hostile user (the author of an archive's name, or whoever can write the mount
point's parent directory) or a hostile host state (no process left to fork) got root's tarfuse to do what
nobody asked: mount options smuggled in through the archive's name, a mount over another directory, a mount
left behind with no daemon, a daemon that died on a value it could not represent.
"""

import contextlib
import errno
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
from kit.httpserver import serve
from kit.mounts import foreground_mount, is_mounted, mount_entry, tarfuse_command, unmount
from kit.sample import SampleImage
from kit.users import Setup, sha256_as
from pyfuse3 import FUSEError

from tarfuse.serve.fs import IMAGE_INODE, ImageFs
from tarfuse.served import ServedFile

pytestmark = pytest.mark.fuse

TIMEOUT = 30.0
PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


def run_tarfuse(*args: str | Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tarfuse_command(*args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


# --- options built from data -----------------------------------------------------------------------


def test_a_comma_in_the_archive_name_adds_no_mount_option(setup: Setup) -> None:
    """root mounting `vm.tar,allow_other` got allow_other: any user could read a 0600 archive's image."""
    archive = setup.archive.with_name("vm.tar,allow_other")
    shutil.copyfile(setup.archive, archive)
    os.chown(archive, setup.owner.uid, setup.owner.gid)  # the owner's: root opens it with their rights
    archive.chmod(0o600)
    with foreground_mount(archive, setup.mountpoint):
        entry = mount_entry(setup.mountpoint)
        assert entry is not None
        assert "allow_other" not in entry.super_options
        assert entry.source == str(archive)  # the name arrives whole, comma included
        denied = sha256_as(setup.other, setup.mountpoint / "disk.raw")
        assert denied.returncode != 0
        assert "Permission denied" in denied.stderr


def test_an_archive_name_outside_ascii_mounts_and_keeps_its_name(
    tmp_path: Path, sample_archive: Path, sample_image: SampleImage
) -> None:
    """pyfuse3 sends options as ASCII: a name with 'é' or a backslash once ended in a traceback."""
    archive = tmp_path / "vmé \\012.tar"
    shutil.copyfile(sample_archive, archive)
    (mountpoint := tmp_path / "mnt").mkdir()
    with foreground_mount(archive, mountpoint):
        entry = mount_entry(mountpoint)
        assert entry is not None
        assert entry.source == str(archive)
        assert (mountpoint / "disk.raw").read_bytes() == sample_image.data


@pytest.mark.parametrize("option", ["uid=4294967296", "gid=4294967295", "uid=99999999999999999999"])
def test_an_owner_no_file_can_have_is_refused_up_front(
    tmp_path: Path, sample_archive: Path, option: str
) -> None:
    """`-o uid=4294967296` reached the first stat and killed the daemon, leaving a dead mount."""
    (mountpoint := tmp_path / "mnt").mkdir()
    try:
        result = run_tarfuse("-f", sample_archive, mountpoint, "-o", option, timeout=10)
    finally:
        unmount(mountpoint)  # if it was taken: a failing test leaves nothing behind
    assert result.returncode == 2
    assert f"option {option.partition('=')[0]}=" in result.stderr
    assert "out of range; at most 4294967294" in result.stderr


# --- handlers never end the daemon -----------------------------------------------------------------


def served_file(**changes: object) -> ServedFile:
    fields: dict[str, object] = {
        "name": "disk.raw",
        "size": 4096,
        "mtime_ns": 0,
        "stored_bytes": 4096,
        "read": lambda offset, size: bytes(size),
        "xattrs": {},
        "uid": 0,
        "gid": 0,
    }
    return ServedFile(**{**fields, **changes})  # type: ignore[arg-type]


async def test_a_value_the_kernel_cannot_hold_answers_eio_instead_of_ending_the_daemon(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pyfuse3 raised OverflowError from getattr for a huge mtime, and its loop died with it."""
    ops = ImageFs(served_file(mtime_ns=10**30), root_is_file=False)
    for _ in range(2):
        with pytest.raises(FUSEError) as raised:
            await ops.getattr(IMAGE_INODE)
        assert raised.value.errno == errno.EIO
        with pytest.raises(FUSEError) as raised:
            await ops.lookup(pyfuse3.ROOT_INODE, b"disk.raw")
        assert raised.value.errno == errno.EIO
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # once per kind of failure, not per request
    assert "getattr failed unexpectedly, answered EIO: OverflowError" in errors[0].getMessage()


async def test_a_bug_in_a_read_answers_eio() -> None:
    def broken(offset: int, size: int) -> bytes:
        raise ValueError("a bug")

    ops = ImageFs(served_file(read=broken), root_is_file=False)
    with pytest.raises(FUSEError) as raised:
        await ops.read(IMAGE_INODE, 0, 4096)
    assert raised.value.errno == errno.EIO


# --- the mount point ---------------------------------------------------------------------------------


def test_a_mount_point_swapped_for_a_symlink_during_the_scan_is_not_followed(
    setup: Setup,
) -> None:
    """The mount point was resolved, then the archive read (for as long as its author likes), then mount(2)
    resolved the path again: a user who owns its parent swapped in a symlink, and root mounted over a
    root-only directory."""
    secret = Path(f"/root/tarfuse-test-{uuid.uuid4().hex[:8]}")
    secret.mkdir(mode=0o700)
    (secret / "key").write_text("root's")
    moved = setup.mountpoint.with_name("moved")
    try:
        with serve() as server:
            url = server.put("vm.tar", setup.archive.read_bytes())
            server.faults.slow, server.faults.delay = 1, 2.0  # the scan's first request waits
            process = subprocess.Popen(
                tarfuse_command("-f", url, setup.mountpoint),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            with _reaped(process):
                _wait_until(lambda: bool(server.requests), process)
                setup.mountpoint.rename(moved)  # what the owner of the parent directory may do
                setup.mountpoint.symlink_to(secret)
                _, stderr = process.communicate(timeout=TIMEOUT)
        assert not is_mounted(secret), "root mounted over the symlink's target"
        assert not is_mounted(moved)
        assert process.returncode == 2, stderr
        assert f"mount point {setup.mountpoint} was replaced while the archive was read" in stderr
        assert (secret / "key").read_text() == "root's"
    finally:
        for path in (secret, moved):
            unmount(path)
        shutil.rmtree(secret)


def test_root_mounts_on_the_directory_it_was_given_even_through_a_symlink(
    tmp_path: Path, sample_archive: Path, sample_image: SampleImage
) -> None:
    """A symlink the caller names is the caller's choice: it is resolved once, when the command starts."""
    (real := tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(real)
    process = subprocess.Popen(
        tarfuse_command("-f", sample_archive, tmp_path / "link"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with _reaped(process):
        try:
            _wait_until(lambda: is_mounted(real), process)
            assert (tmp_path / "link" / "disk.raw").read_bytes() == sample_image.data
        finally:
            unmount(real)


# --- failing after the mount -------------------------------------------------------------------------


@contextlib.contextmanager
def pids_limited_to(count: int) -> Iterator[Path]:
    """A pids cgroup (v1) that lets its members have `count` tasks at most; removed afterwards."""
    if os.getuid() != 0 or not (PIDS_CGROUP / "cgroup.procs").exists():
        pytest.skip("needs root and the cgroup v1 pids controller at /sys/fs/cgroup/pids")
    group = PIDS_CGROUP / f"tarfuse-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "pids.max").write_text(str(count))
        yield group
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def test_a_fork_that_fails_after_the_mount_leaves_nothing_mounted(
    tmp_path: Path, sample_archive: Path
) -> None:
    """With no process to spare, the fork into the background failed and left a mount with no daemon."""
    (mountpoint := tmp_path / "mnt").mkdir()
    with pids_limited_to(1) as group:
        command = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
        result = subprocess.run(
            [*command, *tarfuse_command(sample_archive, mountpoint)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        assert result.returncode == 1, result.stderr
        assert "Resource temporarily unavailable" in result.stderr
        assert not is_mounted(mountpoint)
    finally:
        unmount(mountpoint)


# --- helpers -----------------------------------------------------------------------------------------


def _wait_until(condition: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"tarfuse ended or hung before the test could act: {process.communicate()}")
        time.sleep(0.01)


@contextlib.contextmanager
def _reaped(process: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
