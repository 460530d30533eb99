"""The command line without mounting: -o parsing, --list, exit codes and one-line errors."""

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tarfuse import __version__
from tarfuse.cli import EXIT_FAILED, EXIT_USAGE, main, split_mount_options
from tarfuse.errors import UsageError
from tarfuse.options import default_workers


def test_our_options_are_parsed_and_libfuse_options_passed_on():
    options = split_mount_options(["member=vm/disk.raw,uid=1000", "gid=100,umask=027,allow_other,nodev"])
    assert (options.member, options.uid, options.gid, options.umask) == ("vm/disk.raw", 1000, 100, 0o027)
    assert options.fuse == {"allow_other", "nodev"}


def test_fstab_words_are_accepted_and_dropped():
    words = "ro,defaults,noauto,nofail,_netdev,user,users,x-systemd.automount,x-systemd.idle-timeout=60"
    assert split_mount_options([words]).fuse == set()


def test_explicit_rw_is_refused_with_what_to_do_instead():
    with pytest.raises(UsageError, match=r"read-only.*qcow2 overlay"):
        split_mount_options(["rw"])


def test_rw_that_mount8_adds_by_itself_is_accepted():
    assert split_mount_options(["rw,dev,suid"], rw_is_default=True).fuse == set()


@pytest.mark.parametrize(
    "word", ["bogus", "member", "uid=abc", "umask=999", "gid=-1", "member=", "workers=0", "workers=65"]
)
def test_a_wrong_option_is_an_error_naming_it(word):
    with pytest.raises(UsageError, match=word.split("=")[0]):
        split_mount_options([word])


def test_workers_is_parsed_and_defaults_to_one_process_per_four_cpus():
    assert split_mount_options(["workers=3"]).workers == 3
    assert split_mount_options([]).workers is None  # the mount decides, from the CPUs it may use
    # 1 on the 2-CPU machines where two processes measured slower; one per 4 CPUs above; at most 8.
    assert [default_workers(cpus) for cpus in (1, 2, 4, 7, 8, 16, 64)] == [1, 1, 1, 1, 2, 4, 8]


@pytest.fixture
def small_tar(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x00" * 510 + b"\x55\xaa" + b"x" * 3584)
    archive = tmp_path / "vm.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(image, arcname="vm/disk.raw")
    return archive


def test_list_prints_one_row_per_image(small_tar, capsys):
    assert main(["--list", str(small_tar)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["PATH", "FORMAT", "SIZE", "ALLOCATED", "VIRTUAL", "EXTENTS", "OFFSET"]
    assert re.split(r" {2,}", row) == [
        "vm/disk.raw",
        "raw (MBR boot sector)",
        "4096 (4.0 KiB)",
        "4096 (4.0 KiB)",
        "-",
        "1",
        "512",
    ]


def test_a_bad_archive_gives_one_line_with_offset_and_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar archive" * 100)
    assert main(["--list", str(bad)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"tarfuse: {bad}: ")
    assert "archive offset 0" in err


def test_a_missing_archive_is_reported_by_name(tmp_path, capsys):
    assert main(["--list", str(tmp_path / "nope.tar")]) == EXIT_FAILED
    assert "nope.tar: No such file or directory" in capsys.readouterr().err


def test_a_missing_mountpoint_argument_is_a_usage_error(small_tar, capsys):
    assert main([str(small_tar)]) == EXIT_USAGE
    assert "MOUNTPOINT is missing" in capsys.readouterr().err


def test_a_mountpoint_that_does_not_exist_is_a_usage_error(small_tar, tmp_path, capsys):
    assert main([str(small_tar), str(tmp_path / "absent")]) == EXIT_USAGE
    assert "absent" in capsys.readouterr().err


def test_version_and_help_work_as_commands():
    version = subprocess.run(
        [sys.executable, "-m", "tarfuse", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith(f"tarfuse {__version__} (pyfuse3 ")  # and whether it has lseek
    usage = subprocess.run(
        [sys.executable, "-m", "tarfuse", "--help"], capture_output=True, text=True, check=True
    )
    assert "MOUNTPOINT" in usage.stdout
    assert "member=PATH" in usage.stdout


def test_list_json_gives_the_table_s_fields_to_scripts() -> None:
    archive = Path(__file__).with_name("data") / "pax-1.0.tar"
    shown = subprocess.run(
        [sys.executable, "-m", "tarfuse", "--list", "--json", archive], capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    listing = json.loads(shown.stdout)
    assert listing["archive"] == str(archive)
    assert listing["compression"] is None
    [image] = listing["images"]
    table = subprocess.run(
        [sys.executable, "-m", "tarfuse", "--list", archive], capture_output=True, text=True
    )
    assert image["virtual_size"] is None
    cells = re.split(r" {2,}", table.stdout.splitlines()[1])
    assert [cell.split(" (")[0] for cell in cells] == [  # the bytes, without the human figure
        image["path"],
        image["format"],
        str(image["size"]),
        str(image["allocated"]),
        "-",  # a raw image declares no virtual size: its size is the file's
        str(image["extents"]),
        str(image["offset"]),
    ]
    assert image["extents"] == 2


def test_json_without_list_is_a_usage_error() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "tarfuse", "--json", "x.tar", "/mnt"], capture_output=True, text=True
    )
    assert shown.returncode == 2
    assert "--json goes with --list" in shown.stderr


def test_options_may_stand_between_the_archive_and_the_mount_point(tmp_path: Path) -> None:
    """mount helpers take `SOURCE -o OPTS MOUNTPOINT` too; argparse refused it ("unrecognized arguments")."""
    archive = Path(__file__).with_name("data") / "gnu.tar"
    missing = tmp_path / "missing"
    shown = subprocess.run(
        [sys.executable, "-m", "tarfuse", archive, "-o", "member=disk.img", missing, "-f"],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == EXIT_USAGE
    assert f"mount point {missing}: No such file or directory" in shown.stderr


def test_list_with_a_mount_point_is_a_usage_error(small_tar, tmp_path, capsys):
    assert main(["--list", str(small_tar), str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == f"tarfuse: --list takes no MOUNTPOINT ({tmp_path}): it only lists ARCHIVE\n"
