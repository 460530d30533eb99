"""A file mount point hides the file while mounted: never the archive itself, a file with bytes of its own
only when asked (-o nonempty)."""

import subprocess
from pathlib import Path

import pytest
from kit import tarbuilder as tb
from kit.mounts import foreground_mount, is_mounted, tarfuse_command

IMAGE = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "vm.tar"
    path.write_bytes(tb.with_tarfile(("disk.img", IMAGE)))
    return path


def _refused(*words: str | Path) -> str:
    result = subprocess.run(
        tarfuse_command("-f", *words), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    return result.stderr


@pytest.mark.fuse
def test_the_archive_itself_is_no_mount_point_even_with_nonempty(archive: Path, tmp_path: Path) -> None:
    before = archive.read_bytes()
    for words in (
        [archive, archive],
        [archive, archive, "-o", "nonempty"],
        [archive, tmp_path / "." / "vm.tar"],
    ):
        assert "is the archive itself" in _refused(*words)
        assert not is_mounted(archive)
    assert archive.read_bytes() == before


@pytest.mark.fuse
def test_a_file_with_bytes_of_its_own_is_refused_without_nonempty(archive: Path, tmp_path: Path) -> None:
    other = tmp_path / "disk.img.gz"
    other.write_bytes(b"someone's data\n")
    error = _refused(archive, other)
    assert f"mount point {other} is a file of 15 bytes, which the mount would hide" in error
    assert "-o nonempty" in error
    assert not is_mounted(other)
    assert other.read_bytes() == b"someone's data\n"


@pytest.mark.fuse
def test_nonempty_mounts_over_it_and_the_bytes_come_back(archive: Path, tmp_path: Path) -> None:
    other = tmp_path / "target.img"
    other.write_bytes(b"hidden while mounted\n")
    with foreground_mount(archive, other, "-o", "nonempty"):
        assert other.read_bytes() == IMAGE
    assert other.read_bytes() == b"hidden while mounted\n"


@pytest.mark.fuse
def test_an_empty_file_is_mounted_on_as_before(archive: Path, tmp_path: Path) -> None:
    target = tmp_path / "empty.img"
    target.touch()
    with foreground_mount(archive, target):
        assert target.read_bytes() == IMAGE
