"""Shared fixtures: sample images, archives made by real tar programs, and real FUSE mounts.

Tests marked `fuse` are skipped, with the reason, when this machine cannot mount FUSE filesystems.
Every mount is torn down in a `finally`, so a failing test leaves no stale mount behind.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tarfuse.sample import write_sparse_boot_image
from tarfuse.serve import mountinfo

IMAGE_SIZE = 24 * 1024 * 1024
BOOT_MESSAGE = "tarfuse sample booted"
IMAGE_MTIME = 1_700_000_000  # whole seconds: every tar format can store it exactly
MOUNT_TIMEOUT = 10.0

# How each archive kind is made from a directory holding one file; "tarfile" is done in Python.
TAR_COMMANDS: dict[str, list[str]] = {
    "gnu": ["tar", "--format=gnu", "-S", "-cf"],
    "oldgnu": ["tar", "--format=oldgnu", "-S", "-cf"],
    "pax0.0": ["tar", "--format=posix", "--sparse-version=0.0", "-S", "-cf"],
    "pax0.1": ["tar", "--format=posix", "--sparse-version=0.1", "-S", "-cf"],
    "pax1.0": ["tar", "--format=posix", "--sparse-version=1.0", "-S", "-cf"],
    "bsdtar": ["bsdtar", "--read-sparse", "-cf"],
    "busybox": ["busybox", "tar", "-cf"],
}
ARCHIVE_KINDS = [*TAR_COMMANDS, "tarfile"]


@dataclass(frozen=True, slots=True)
class SampleImage:
    """A sparse bootable raw image on disk and its bytes, the oracle for every read."""

    path: Path
    data: bytes
    message: str


def fuse_unusable_reason() -> str | None:
    """Say why FUSE mounts cannot work here, or None if they can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = fuse_unusable_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("fuse") is not None:
            item.add_marker(pytest.mark.skip(reason=f"FUSE unusable: {reason}"))


def require_tool(name: str) -> str:
    """Return the path of the program `name`, or skip the test that needs it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def mount_target(path: str | Path) -> str:
    """Return `path` as mountinfo spells it, without stat()ing `path` itself."""
    return mountinfo.spelled(path)


def mount_entry(path: str | Path) -> mountinfo.Mount | None:
    """Return the topmost mount on `path` (a directory or a file), or None."""
    return mountinfo.find(path)


def is_mounted(path: str | Path) -> bool:
    return mount_entry(path) is not None


def unmount(path: str | Path) -> None:
    """Lazily unmount everything mounted on `path` (mounts can stack); quiet if nothing is."""
    for _ in range(5):
        if not is_mounted(path):
            return
        result = subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)
        if result.returncode != 0:  # not a FUSE mount, or not ours to fusermount
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
    if is_mounted(path):
        pytest.fail(f"could not unmount {path}")


def wait_for_mount(path: str | Path, process: subprocess.Popen[bytes], stderr: Path) -> None:
    """Wait until `path` is a mount point that answers; fail at once, with its stderr, if the daemon exits."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mounted(path):
        if process.poll() is not None:
            pytest.fail(
                f"tarfuse exited with {process.returncode} before mounting {path}:\n"
                + stderr.read_text(errors="replace")
            )
        if time.monotonic() > deadline:
            pytest.fail(f"{path} not mounted after {MOUNT_TIMEOUT} s")
        time.sleep(0.02)
    # Mounted is not serving: a daemon that never answers would hang the test (in the kernel, where
    # no timeout reaches) at its first stat. Probe from a child process that can be killed instead.
    try:
        subprocess.run(["stat", str(path)], check=True, capture_output=True, timeout=MOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path} is mounted but tarfuse does not answer:\n" + stderr.read_text(errors="replace"))


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    """Wait for a daemon whose mount is gone; terminate it, then kill it, if it lingers."""
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True, slots=True)
class Mount:
    """A foreground tarfuse daemon serving a mount point."""

    process: subprocess.Popen[bytes]
    mountpoint: Path
    stderr: Path

    def stderr_text(self) -> str:
        return self.stderr.read_text(errors="replace")


def tarfuse_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "tarfuse", *map(str, args)]


# Runs `python -m tarfuse ARGS...` and writes its peak RSS (VmHWM, in kB) to the file named by $PEAK_FILE.
_WITH_PEAK = """
import atexit, os, runpy

def _peak():
    with open("/proc/self/status") as status, open(os.environ["PEAK_FILE"], "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

atexit.register(_peak)
runpy.run_module("tarfuse", run_name="__main__", alter_sys=True)
"""


def run_tarfuse_measuring_peak_rss(
    *args: str | Path, scratch: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `tarfuse ARGS...` to its end; return the result and its peak RSS in bytes.

    Not the rusage of the child: a child's ru_maxrss starts at the RSS of the process that spawned it
    (Linux keeps the high-water mark across exec), and a pytest process deep in the suite holds hundreds
    of MiB. VmHWM, read by the child itself as it exits, is its own.
    """
    peak_file = scratch / f"peak.{os.getpid()}.{time.monotonic_ns()}"
    result = subprocess.run(
        [sys.executable, "-c", _WITH_PEAK, *map(str, args)],
        capture_output=True,
        text=True,
        env={**(env if env is not None else os.environ), "PEAK_FILE": str(peak_file)},
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    return result, int(peak_file.read_text()) * 1024


@contextlib.contextmanager
def foreground_mount(archive: Path, mountpoint: Path, *options: str) -> Iterator[Mount]:
    """Run `tarfuse -f ARCHIVE MOUNTPOINT OPTIONS...` until the block ends, then unmount."""
    stderr = mountpoint.parent / f"{mountpoint.name}.stderr"
    with stderr.open("wb") as sink:
        process = subprocess.Popen(
            tarfuse_command("-f", archive, mountpoint, *options),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    try:
        wait_for_mount(mountpoint, process, stderr)
        yield Mount(process, mountpoint, stderr)
    finally:
        unmount(mountpoint)
        stop_daemon(process)


MountFactory = Callable[..., Mount]


@pytest.fixture
def mount() -> Iterator[MountFactory]:
    """Return `mount(archive, mountpoint, *options) -> Mount`; every mount ends with the test."""
    with contextlib.ExitStack() as stack:

        def start(archive: Path, mountpoint: Path, *options: str) -> Mount:
            return stack.enter_context(foreground_mount(archive, mountpoint, *options))

        yield start


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    """A 24 MiB sparse bootable raw image named disk.raw, made once per session."""
    path = tmp_path_factory.mktemp("sample") / "disk.raw"
    write_sparse_boot_image(str(path), IMAGE_SIZE, BOOT_MESSAGE + "\r\n")
    os.utime(path, (IMAGE_MTIME, IMAGE_MTIME))
    return SampleImage(path, path.read_bytes(), BOOT_MESSAGE)


def make_archive(kind: str, source: Path, archive: Path) -> Path:
    """Archive the file `source`, under its basename, as `kind` (one of ARCHIVE_KINDS)."""
    if kind == "tarfile":
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(source, arcname=source.name)
        return archive
    command = TAR_COMMANDS[kind]
    require_tool(command[0])
    subprocess.run(
        [*command, str(archive), "-C", str(source.parent), source.name],
        check=True,
        capture_output=True,
    )
    return archive


ArchiveFactory = Callable[[str], Path]


@pytest.fixture(scope="session")
def archive_of(sample_image: SampleImage, tmp_path_factory: pytest.TempPathFactory) -> ArchiveFactory:
    """Return `archive_of(kind) -> Path`: the sample image archived as `kind`, made once per session."""
    directory = tmp_path_factory.mktemp("archives")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_archive(kind, sample_image.path, directory / f"{kind}.tar")
        return made[kind]

    return get


@pytest.fixture
def sample_archive(archive_of: ArchiveFactory) -> Path:
    """The sample image in an old GNU sparse archive, as GCE image tarballs are made."""
    return archive_of("oldgnu")


# --- an ext4 file system inside the image, read through a loop device --------------------------------


def make_ext4_image(image: Path, payload: bytes) -> Path:
    """Write a 16 MiB sparse ext4 image holding `payload.bin`; skip without root, loop devices or mkfs."""
    if os.getuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("loop devices need root and /dev/loop-control")
    require_tool("mkfs.ext4")
    tree = image.parent / f"{image.name}.tree"
    tree.mkdir()
    (tree / "payload.bin").write_bytes(payload)
    with image.open("wb") as sparse:
        sparse.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    return image


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """Attach `image` read-only to a free loop device; always detach it."""
    device = subprocess.run(
        ["losetup", "-r", "--find", "--show", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


def read_payload_through_loop(served_image: Path, mountpoint: Path) -> bytes:
    """`losetup -r` the served image, `mount -o ro` its ext4 on `mountpoint`, read payload.bin; clean up."""
    mountpoint.mkdir()
    with loop_device(served_image) as device:
        subprocess.run(["mount", "-t", "ext4", "-o", "ro", device, str(mountpoint)], check=True)
        try:
            return (mountpoint / "payload.bin").read_bytes()
        finally:
            subprocess.run(["umount", str(mountpoint)], check=False)
