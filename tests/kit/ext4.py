"""An ext4 file system inside an image, read through a loop device: what a VM would see of a served image.

Needs root, loop devices and mkfs.ext4; a test without them is skipped (kit.needs).
"""

import subprocess
from pathlib import Path

from kit.mounts import loop_device
from kit.needs import require_loop_devices, require_tool


def make_ext4_image(image: Path, payload: bytes) -> Path:
    """Write a 16 MiB sparse ext4 image holding `payload.bin`; skip without root, loop devices or mkfs."""
    require_loop_devices()
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
