"""The spill's bounds, through real mounts: its length (-o spill_max, or 16 times the archive), the free
space it leaves on its file system, and a file system that says no (ENOSPC). In each case there is no
spill, nothing of it is left, one log line says why (never "a bug"), and every read is still right.

The archives are single-frame .tar.zst of a 1.5 MiB random block repeated (kit.archives): zstd's window
spans the block, so the archive is ~1.5 MiB, while the spill's 1 MiB frames cannot compress random bytes
and would be as large as the tar. Small file systems are real tmpfs mounts (root).
"""

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.archives import repeated_block_tar_zst
from kit.mounts import Mount, MountFactory, daemon_mount, tarfuse_command
from kit.needs import require_tool

from tarfuse.sources import spill

pytestmark = pytest.mark.fuse

MiB = 1 << 20
PASS_FAILED = ["reads fail from now on"]  # the pass failed the mount


def assert_no_spill_left(directory: Path) -> None:
    left = [p.name for p in directory.iterdir() if "spill" in p.name or p.name.endswith(".tarfuse-tmp")]
    assert left == []


def wait_for_the_pass(live: Mount) -> str:
    """The log once the pass has ended and kept its index, or said why not: "index complete" comes before
    the index is written, whose temporary file is there until then."""
    live.wait_for_log("index complete", fails_on=PASS_FAILED)
    kept = ("index saved to", "could not save the index", "no index to keep", "no seek index will be kept")
    return live.wait_for_log(kept)


def assert_no_bug(log: str) -> None:
    assert "bug" not in log
    assert "reads fail" not in log
    assert "Traceback" not in log


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, mode 0700 (a trusted place for side files), unmounted after the test's mounts."""
    if os.getuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    (where := tmp_path / "small").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tarfuse-test", where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)


def test_the_default_bound_is_sixteen_times_the_archive_and_at_least_256_mib() -> None:
    assert spill.default_limit(1 * MiB) == 256 * MiB
    assert spill.default_limit(100 * MiB) == 1600 * MiB


def test_the_reserve_is_a_tenth_of_the_file_system_and_at_most_1_gib(tmp_path: Path) -> None:
    fs = os.statvfs(tmp_path)
    assert spill.reserve(fs) == min(fs.f_blocks * fs.f_frsize // 10, 1 << 30)


def test_a_spill_past_spill_max_stops_there_and_is_removed(mount: MountFactory, tmp_path: Path) -> None:
    archive = tmp_path / "big.tar.zst"
    data = repeated_block_tar_zst(archive, 24)  # 36 MiB of tar
    (served := tmp_path / "mnt").mkdir()
    live = mount(archive, served, "-o", "spill_max=8M")
    log = wait_for_the_pass(live)
    stopped = re.search(r"no spill: the spill stopped at (\d+) MiB, at its bound of 8 MiB", log)
    assert stopped is not None, log
    assert int(stopped[1]) <= 8
    assert_no_spill_left(tmp_path)
    assert (served / "disk.raw").read_bytes() == data
    assert_no_bug(live.stderr_text())


def test_the_noindex_spill_has_the_same_bound(
    mount: MountFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where its O_TMPFILE goes
    archive = tmp_path / "big.tar.zst"
    data = repeated_block_tar_zst(archive, 24)
    (served := tmp_path / "mnt").mkdir()
    live = mount(archive, served, "-o", "noindex,spill_max=8M")
    log = wait_for_the_pass(live)
    assert "no spill: the spill stopped at" in log
    assert "spill complete" not in log
    assert (served / "disk.raw").read_bytes() == data
    assert_no_bug(live.stderr_text())


def test_a_spill_leaves_its_file_system_a_reserve(
    mount: MountFactory, tmp_path: Path, small_fs: Path
) -> None:
    archive = small_fs / "big.tar.zst"
    data = repeated_block_tar_zst(archive, 16)  # 24 MiB of tar, on a 16 MiB file system
    (served := tmp_path / "mnt").mkdir()
    live = mount(archive, served)
    log = wait_for_the_pass(live)
    assert "no spill: the spill stopped at" in log
    assert "its file system keeps 2 MiB free" in log  # a tenth of 16 MiB, rounded
    assert_no_spill_left(small_fs)
    assert (served / "disk.raw").read_bytes() == data
    assert_no_bug(live.stderr_text())


def test_a_full_file_system_means_no_spill_and_right_reads(
    mount: MountFactory, tmp_path: Path, small_fs: Path
) -> None:
    archive = small_fs / "big.tar.zst"
    data = repeated_block_tar_zst(archive, 16)
    # Leave room for the spill to start (the reserve, two frames, 256 KiB), not for one frame more: the
    # file system is full before the writer's first look at it after it started.
    fs = os.statvfs(small_fs)
    room = spill.reserve(fs) + 2 * spill.FRAME_SIZE + 256 * 1024
    (small_fs / "filler").write_bytes(bytes(fs.f_bavail * fs.f_frsize - room))
    (served := tmp_path / "mnt").mkdir()
    live = mount(archive, served)
    log = wait_for_the_pass(live)
    assert "no spill: its file system is full" in log
    assert_no_spill_left(small_fs)
    assert (served / "disk.raw").read_bytes() == data
    assert_no_bug(live.stderr_text())


def test_a_file_size_limit_means_no_spill_and_right_reads(tmp_path: Path) -> None:
    require_tool("prlimit")
    archive = tmp_path / "big.tar.zst"
    data = repeated_block_tar_zst(archive, 8)
    (served := tmp_path / "mnt").mkdir()
    limited = ["prlimit", f"--fsize={4 * MiB}", *tarfuse_command("-f", archive, served)]  # ulimit -f
    with daemon_mount(limited, served) as live:
        log = wait_for_the_pass(live)
        assert "no spill: the file size limit is reached (ulimit -f)" in log
        assert_no_spill_left(tmp_path)
        assert (served / "disk.raw").read_bytes() == data
        assert_no_bug(live.stderr_text())
