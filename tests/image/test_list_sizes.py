"""--list's sizes: bytes with a human figure in the table, and the virtual size a disk image declares.

The oracle for the virtual size is QEMU itself: `qemu-img info --output=json` on the same image.
"""

import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from kit.needs import require_tool

from tarfuse.cli import main
from tarfuse.image import detect

GIB = 1024**3


def qemu_image(directory: Path, fmt: str, size: str, *options: str) -> Path:
    """A fresh image made by qemu-img (sparse: a few hundred KiB on disk, whatever its virtual size)."""
    path = directory / f"disk.{fmt}"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", fmt, *options, path, size], check=True)
    return path


def qemu_virtual_size(path: Path) -> int:
    info = subprocess.run(
        [require_tool("qemu-img"), "info", "--output=json", path], capture_output=True, text=True, check=True
    )
    return int(json.loads(info.stdout)["virtual-size"])


def tar_of(image: Path, name: str) -> Path:
    archive = image.with_name("vm.tar")
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(image, arcname=name)
    return archive


def listed_json(archive: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["--list", "--json", str(archive)]) == 0
    [image] = json.loads(capsys.readouterr().out)["images"]
    assert isinstance(image, dict)
    return image


def listed_row(archive: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """The table's one image row as {column: cell}; cells are two spaces apart or more."""
    assert main(["--list", str(archive)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    return dict(zip(header.split(), re.split(r" {2,}", row), strict=True))


@pytest.mark.parametrize(
    ("fmt", "options", "detail"),
    [
        ("qcow2", (), "version 3"),
        ("qcow", (), "version 1"),
        ("vmdk", (), "sparse extent"),
        ("vmdk", ("-o", "subformat=streamOptimized"), "streamOptimized"),
        ("vdi", (), ""),
        ("vpc", (), "VHD, dynamic"),
        ("vhdx", (), ""),
    ],
)
def test_json_virtual_size_is_qemu_s(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, options: tuple[str, ...], detail: str
) -> None:
    image = qemu_image(tmp_path, fmt, "3G", *options)
    listed = listed_json(tar_of(image, f"disk.{fmt}"), capsys)
    assert (listed["format"], listed["format_detail"]) == (fmt, detail)
    assert listed["virtual_size"] == qemu_virtual_size(image)
    assert listed["size"] == image.stat().st_size  # SIZE stays the file's, in bytes


def test_table_shows_sizes_in_bytes_and_human_and_the_virtual_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = qemu_image(tmp_path, "qcow2", "1G")
    row = listed_row(tar_of(image, "disk.qcow2"), capsys)
    assert row["FORMAT"] == "qcow2 (version 3)"
    assert row["VIRTUAL"] == "1.0 GiB"
    size = image.stat().st_size  # 192 KiB and a header cluster, by qemu-img's layout
    assert row["SIZE"] == f"{size} ({size / 1024:.1f} KiB)"
    assert row["ALLOCATED"] == row["SIZE"]  # tarfile stored every byte: no holes


def test_a_raw_image_has_no_virtual_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "disk.raw"
    with image.open("wb") as out:
        out.truncate(3 * GIB // 2)  # sparse: nothing written
    archive = tmp_path / "vm.tar"
    subprocess.run(["tar", "-C", tmp_path, "-Scf", archive, "disk.raw"], check=True)
    assert listed_json(archive, capsys)["virtual_size"] is None
    row = listed_row(archive, capsys)
    assert row["VIRTUAL"] == "-"
    assert row["SIZE"] == f"{3 * GIB // 2} (1.5 GiB)"
    assert row["ALLOCATED"] == "0"  # under 1 KiB: the bytes alone


def test_a_fixed_vhd_declares_its_size_in_the_footer(tmp_path: Path) -> None:
    image = qemu_image(tmp_path, "vpc", "64M", "-o", "subformat=fixed").read_bytes()
    found = detect.detect_format(lambda offset, n: image[offset : offset + n], len(image))
    assert found is not None
    assert (found.driver, found.detail) == ("vpc", "VHD, fixed")
    # The footer's Current Size: the data before the footer, CHS geometry rounded up from 64 MiB.
    assert found.virtual_size == len(image) - 512


def test_a_header_cut_short_declares_no_virtual_size() -> None:
    head = b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(12)  # a qcow2 magic, then nothing past 20 bytes
    found = detect.detect_format(lambda offset, n: head[offset : offset + n], len(head))
    assert found == detect.ImageFormat("qcow2", "version 3", None)
