"""serve/mountinfo.py, the one reader of /proc/self/mountinfo, on names that need its escapes."""

import subprocess
from pathlib import Path

import pytest
from kit.mounts import foreground_mount

from tarfuse.serve import mountinfo


def test_unescape_reads_the_kernel_s_octal_escapes() -> None:
    assert mountinfo.unescape(rb"/mnt/a\040b\011c\012d\134e") == "/mnt/a b\tc\nd\\e"
    assert mountinfo.unescape(b"/mnt/\xc3\xa9") == "/mnt/é"


def test_the_root_file_system_is_found() -> None:
    root = mountinfo.find("/")
    assert root is not None
    assert root.mount_point == "/"


@pytest.mark.fuse
def test_a_mount_whose_path_needs_every_escape_is_found(tmp_path: Path, sample_archive: Path) -> None:
    (mountpoint := tmp_path / "a b\tc\\d é").mkdir()
    with foreground_mount(sample_archive, mountpoint):
        found = mountinfo.find(mountpoint)
        assert found is not None
        assert found.fstype == "fuse.tarfuse"
        assert found.source == str(sample_archive.resolve())
        assert mountinfo.under(tmp_path) == [str(mountpoint)]
        device = subprocess.run(["mountpoint", "-d", str(mountpoint)], capture_output=True, text=True)
        assert found.device == device.stdout.strip()
