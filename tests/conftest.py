"""Shared fixtures: sample images, archives made by real tar programs, and real FUSE mounts.

Tests marked `fuse` are skipped, with the reason, when this machine cannot mount FUSE filesystems.
Every mount is torn down in a `finally`, so a failing test leaves no stale mount behind. The helpers
behind the fixtures are the test kit's (tests/kit: kit.mounts, kit.sample, kit.needs), and so are the
fixtures that several folders share but that need no sample image (kit.fixtures: the HTTP server, TLS
files, a QEMU boot). No test module imports this one: what a test calls comes from the kit.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.mounts import MOUNT_TIMEOUT, Mount, MountFactory, foreground_mount, fuse_unusable_reason
from kit.needs import make_archive
from kit.sample import (
    SAMPLE_MESSAGE,
    SAMPLE_MTIME,
    SAMPLE_SIZE,
    ArchiveFactory,
    SampleImage,
    write_sparse_boot_image,
)

pytest_plugins = ["kit.fixtures"]


@pytest.fixture(scope="session", autouse=True)
def session_cache() -> Iterator[Path]:
    """One cache directory for the whole run ($XDG_CACHE_HOME, inherited by every tarfuse a test starts),
    removed at its end: the indexes and spills of the suite's URLs and compressed members must not pile
    up in root's own cache. A test that is about the cache directory sets its own."""
    cache = Path(tempfile.mkdtemp(prefix="tarfuse-tests-cache-"))  # 0700, root's: a trusted directory
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        yield cache
    finally:
        if previous is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = previous
        shutil.rmtree(cache, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = fuse_unusable_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("fuse") is not None:
            item.add_marker(pytest.mark.skip(reason=f"FUSE unusable: {reason}"))


@pytest.fixture
def mount() -> Iterator[MountFactory]:
    """Return `mount(archive, mountpoint, *options, timeout=MOUNT_TIMEOUT) -> Mount`; every mount ends with
    the test. `timeout`: longer for a mount that decompresses much before it is live."""
    with contextlib.ExitStack() as stack:

        def start(archive: Path, mountpoint: Path, *options: str, timeout: float = MOUNT_TIMEOUT) -> Mount:
            return stack.enter_context(foreground_mount(archive, mountpoint, *options, timeout=timeout))

        yield start


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    """A 24 MiB sparse bootable raw image named disk.raw, made once per session."""
    path = tmp_path_factory.mktemp("sample") / "disk.raw"
    write_sparse_boot_image(str(path), SAMPLE_SIZE, SAMPLE_MESSAGE + "\r\n")
    os.utime(path, (SAMPLE_MTIME, SAMPLE_MTIME))
    return SampleImage(path, path.read_bytes(), SAMPLE_MESSAGE)


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
