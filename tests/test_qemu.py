"""QEMU boots the sample disk straight from a tarfuse mount and its boot sector speaks on COM1."""

from pathlib import Path

import pytest
from conftest import require_tool
from kit.mounts import MountFactory
from kit.qemu import boot
from kit.sample import SampleImage

pytestmark = pytest.mark.fuse

BOOT_TIMEOUT = 60.0


def boot_and_read_serial(image: Path, expected: str, serial_log: Path) -> tuple[str, str]:
    """Boot `image` until `expected` is on COM1; keep COM1's output in `serial_log`; return it and QEMU's."""
    booted = boot(image, expected, BOOT_TIMEOUT, require_tool("qemu-system-x86_64"))
    serial_log.write_text(booted.serial)
    return booted.serial, booted.output


def test_qemu_boots_the_image_from_a_directory_mount(
    sample_archive: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    (served := tmp_path / "mnt").mkdir()
    mount(sample_archive, served)
    serial, qemu = boot_and_read_serial(served / "disk.raw", sample_image.message, tmp_path / "com1.log")
    assert serial.startswith(sample_image.message), f"COM1: {serial!r}; QEMU: {qemu}"


def test_qemu_boots_the_image_from_a_file_mountpoint(
    sample_archive: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    served = tmp_path / "disk.raw"
    served.touch()
    mount(sample_archive, served)
    serial, qemu = boot_and_read_serial(served, sample_image.message, tmp_path / "com1.log")
    assert serial.startswith(sample_image.message), f"COM1: {serial!r}; QEMU: {qemu}"
