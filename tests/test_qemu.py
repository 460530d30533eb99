"""QEMU boots the sample disk straight from a tarfuse mount and its boot sector speaks on COM1."""

import subprocess
import time
from pathlib import Path

import pytest
from conftest import require_tool
from kit.mounts import MountFactory
from kit.sample import SampleImage, boot_command

pytestmark = pytest.mark.fuse

BOOT_TIMEOUT = 60.0


def boot_and_read_serial(image: Path, expected: str, serial_log: Path) -> tuple[str, str]:
    """Boot `image` in QEMU until `expected` shows on COM1 or time is up; return COM1's and QEMU's output."""
    qemu = subprocess.Popen(
        boot_command(str(image), str(serial_log), require_tool("qemu-system-x86_64")),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline and qemu.poll() is None:
            if serial_log.exists() and expected in serial_log.read_text(errors="replace"):
                break
            time.sleep(0.05)
    finally:
        qemu.kill()
        output = qemu.communicate()[0].decode(errors="replace")
    serial = serial_log.read_text(errors="replace") if serial_log.exists() else ""
    return serial, output


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
