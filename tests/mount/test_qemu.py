"""QEMU boots the sample disk straight from a tarfuse mount and its boot sector speaks on COM1."""

from pathlib import Path

import pytest
from kit.fixtures import BootSerial
from kit.mounts import MountFactory
from kit.sample import SampleImage

pytestmark = pytest.mark.fuse


def test_qemu_boots_the_image_from_a_directory_mount(
    sample_archive: Path,
    sample_image: SampleImage,
    mount: MountFactory,
    tmp_path: Path,
    boot_and_read_serial: BootSerial,
) -> None:
    (served := tmp_path / "mnt").mkdir()
    mount(sample_archive, served)
    serial, qemu = boot_and_read_serial(served / "disk.raw", sample_image.message)
    assert serial.startswith(sample_image.message), f"COM1: {serial!r}; QEMU: {qemu}"


def test_qemu_boots_the_image_from_a_file_mountpoint(
    sample_archive: Path,
    sample_image: SampleImage,
    mount: MountFactory,
    tmp_path: Path,
    boot_and_read_serial: BootSerial,
) -> None:
    served = tmp_path / "disk.raw"
    served.touch()
    mount(sample_archive, served)
    serial, qemu = boot_and_read_serial(served, sample_image.message)
    assert serial.startswith(sample_image.message), f"COM1: {serial!r}; QEMU: {qemu}"
