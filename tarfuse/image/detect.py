"""Decide what is being served: pick the image member, name its format.

Format names are QEMU's block driver names (`qemu -drive format=...`), so users can paste them.
Reads happen through callables handed in by the caller.
"""

from collections.abc import Callable
from dataclasses import dataclass

from tarfuse.errors import NoImage
from tarfuse.printable import printable
from tarfuse.sources.compression import COMPRESSION_SUFFIXES
from tarfuse.tar.archive import Member, ReadAt, normalize_name
from tarfuse.tar.files import Candidate

# The seed driver's suffixes (QEMU block/tar.c: .raw .qcow .qcow2 .vmdk), plus the other common ones.
IMAGE_SUFFIXES = (
    ".raw",
    ".qcow",
    ".qcow2",
    ".vmdk",
    ".img",
    ".vdi",
    ".vhd",
    ".vhdx",
    ".iso",
    ".dsk",
    # file system images, which losetup and mount take as they are
    ".ext2",
    ".ext3",
    ".ext4",
    ".squashfs",
)
HEAD_SIZE = 0x8800  # enough to see the ISO 9660 volume descriptor at 0x8001


@dataclass(frozen=True, slots=True)
class ImageFormat:
    """A QEMU block driver name, and what was seen, for people."""

    driver: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.driver} ({self.detail})" if self.detail else self.driver


RAW = ImageFormat("raw")


def has_image_suffix(name: str) -> bool:
    """Named like an image, maybe compressed as well (`disk.raw.xz`: mount.py serves it decompressed)."""
    lower = name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
            break
    return lower.endswith(IMAGE_SUFFIXES)


def find_candidates(files: list[Candidate], sniff: Callable[[Member], ImageFormat | None]) -> list[Candidate]:
    """Members named like images; if none is, members whose content starts like one."""
    by_name = [c for c in files if has_image_suffix(c.name)]
    if by_name:
        return by_name
    return [c for c in files if c.member.real_size >= 512 and sniff(c.member) is not None]


def choose_image(files: list[Candidate], candidates: list[Candidate], wanted: str | None) -> Candidate:
    """Pick the member named `wanted`, or the only candidate; otherwise explain how to choose."""
    if wanted is not None:
        matches = [c for c in files if normalize_name(c.name) == normalize_name(wanted)]
        if not matches:
            raise NoImage(f"the archive has no file named {wanted!r}; it holds {_some(files)}")
        return matches[-1]  # tar -x: a later member of the same name overwrites an earlier one
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise NoImage(
            "no disk image found: no member is named *"
            + ", *".join(IMAGE_SUFFIXES)
            + f" or starts like a disk image; the archive holds {_some(files)}; "
            "name the image with -o member=PATH"
        )
    names = ", ".join(printable(c.name) for c in candidates[:10])
    more = f" and {len(candidates) - 10} more" if len(candidates) > 10 else ""
    raise NoImage(
        f"the archive holds {len(candidates)} disk images ({names}{more}); "
        "choose one with -o member=PATH (tarfuse --list ARCHIVE shows them)"
    )


def _some(files: list[Candidate]) -> str:
    if not files:
        return "no regular files"
    shown = ", ".join(repr(c.name) for c in files[:5])
    return shown + (f" and {len(files) - 5} more files" if len(files) > 5 else "")


def detect_format(read_at: ReadAt, size: int, read_tail: bool = True) -> ImageFormat | None:
    """Name the image format from its content, or None if nothing is recognised.

    Without `read_tail`, a fixed VHD (whose footer is the image's last sector) is not looked for: in a
    compressed archive, reading the end of the image means decompressing all of it first.
    """
    head = read_at(0, HEAD_SIZE)
    if head[:4] == b"QFI\xfb":
        version = int.from_bytes(head[4:8], "big")
        return ImageFormat("qcow2" if version >= 2 else "qcow", f"version {version}")
    if head[:4] == b"KDMV" or head.startswith(b"# Disk DescriptorFile"):
        return ImageFormat("vmdk", "sparse extent" if head[:4] == b"KDMV" else "descriptor")
    if head[:8] == b"vhdxfile":
        return ImageFormat("vhdx")
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe":  # VirtualBox image signature 0xbeda107f, little-endian
        return ImageFormat("vdi")
    if head[:8] == b"conectix":
        return ImageFormat("vpc", "VHD, dynamic")
    if read_tail and size >= 512 and read_at(size - 512, 8) == b"conectix":
        return ImageFormat("vpc", "VHD, fixed")
    if head[0x8001:0x8006] == b"CD001":
        return ImageFormat("raw", "ISO 9660")
    if head[0x8001:0x8006] in (b"BEA01", b"NSR02", b"NSR03"):  # UDF's volume recognition sequence
        return ImageFormat("raw", "UDF")
    if head[512:520] == b"EFI PART":
        return ImageFormat("raw", "GPT partition table")
    if head[510:512] == b"\x55\xaa":
        return ImageFormat("raw", "MBR boot sector")
    if head[0x438:0x43A] == b"\x53\xef":  # the ext2/3/4 superblock's magic, 1 KiB in
        return ImageFormat("raw", "ext2/3/4 file system")
    if head[:4] in (b"hsqs", b"XFSB"):
        return ImageFormat("raw", "squashfs" if head[:4] == b"hsqs" else "XFS file system")
    return None
