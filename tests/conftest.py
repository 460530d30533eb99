"""Shared fixtures: sample images, archives made by real tar programs, and real FUSE mounts.

Tests marked `fuse` are skipped, with the reason, when this machine cannot mount FUSE filesystems.
Every mount is torn down in a `finally`, so a failing test leaves no stale mount behind. The helpers
behind the fixtures are the test kit's (tests/kit: kit.mounts, kit.sample); what is here is what needs
pytest: skipping, and the fixtures themselves.
"""

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kit import sample
from kit.mounts import Mount, MountFactory, foreground_mount, fuse_unusable_reason, loop_device
from kit.sample import SampleImage, write_sparse_boot_image

pytest_plugins = ["kit.fixtures"]

IMAGE_SIZE = 24 * 1024 * 1024
BOOT_MESSAGE = "tarfuse sample booted"
IMAGE_MTIME = 1_700_000_000  # whole seconds: every tar format can store it exactly


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = fuse_unusable_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("fuse") is not None:
            item.add_marker(pytest.mark.skip(reason=f"FUSE unusable: {reason}"))


def no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests talk to loopback addresses only: a proxy set on the machine must not come between."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def require_tool(name: str) -> str:
    """Return the path of the program `name`, or skip the test that needs it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


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
    """Archive the file `source`, under its basename, as `kind` (kit.sample.ARCHIVE_KINDS); skip the test
    if the tar program of `kind` is not installed."""
    if kind != "tarfile":
        require_tool(sample.TAR_COMMANDS[kind][0])
    return sample.make_archive(kind, source, archive)


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


def read_payload_through_loop(served_image: Path, mountpoint: Path) -> bytes:
    """`losetup -r` the served image, `mount -o ro` its ext4 on `mountpoint`, read payload.bin; clean up."""
    mountpoint.mkdir()
    with loop_device(served_image) as device:
        subprocess.run(["mount", "-t", "ext4", "-o", "ro", device, str(mountpoint)], check=True)
        try:
            return (mountpoint / "payload.bin").read_bytes()
        finally:
            subprocess.run(["umount", str(mountpoint)], check=False)
