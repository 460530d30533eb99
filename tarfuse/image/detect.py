"""Decide what is being served: pick the image member, name its format.

Format names are QEMU's block driver names (`qemu -drive format=...`), so users can paste them.
Reads happen through callables handed in by the caller.
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

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
    """A QEMU block driver name, what was seen, for people, and the disk size the image declares.

    `virtual_size` is what QEMU's `qemu-img info` calls the virtual size: the guest's disk, which for
    qcow2, vmdk, vdi, vhd and vhdx differs from the file's size. None where the header does not say it
    (raw images: their size is the file's) or where finding it would mean walking more structure.
    """

    driver: str
    detail: str = ""
    virtual_size: int | None = None

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
    found = _virtual_disk_format(head)
    if found is not None:
        return found
    if head[:8] == b"vhdxfile":
        return ImageFormat("vhdx", virtual_size=_vhdx_size(read_at, size))
    if read_tail and size >= 512 and (footer := read_at(size - 512, 512))[:8] == b"conectix":
        return ImageFormat("vpc", "VHD, fixed", _vhd_size(footer))
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


def _virtual_disk_format(head: bytes) -> ImageFormat | None:
    """qcow, qcow2, vmdk, vdi or dynamic VHD, with the virtual size its header declares."""
    if head[:4] == b"QFI\xfb":  # qcow and qcow2 alike: the disk size is a big-endian uint64 at 24
        version = int.from_bytes(head[4:8], "big")
        driver = "qcow2" if version >= 2 else "qcow"
        return ImageFormat(driver, f"version {version}", _uint(head, 24, "big"))
    if head[:4] == b"KDMV":
        return _vmdk_sparse(head)
    if head.startswith(b"# Disk DescriptorFile"):  # the size is the sum of the extents it names
        return ImageFormat("vmdk", "descriptor")
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe":  # VirtualBox image signature 0xbeda107f, little-endian
        # Header version 1.1 (what VirtualBox and qemu-img write) keeps the disk size at 0x170.
        version_1_1 = head[0x44:0x48] == b"\x01\x00\x01\x00"
        return ImageFormat("vdi", virtual_size=_uint(head, 0x170, "little") if version_1_1 else None)
    if head[:8] == b"conectix":  # a dynamic VHD starts with a copy of its footer
        return ImageFormat("vpc", "VHD, dynamic", _vhd_size(head))
    return None


def _vmdk_sparse(head: bytes) -> ImageFormat:
    """A hosted sparse extent (VMware's "Virtual Disk Format 1.1", SparseExtentHeader): the capacity in
    512-byte sectors at 12, and compressAlgorithm at 77, which only streamOptimized disks set (deflate)."""
    capacity = _uint(head, 12, "little")
    stream_optimized = head[77:79] == b"\x01\x00"
    return ImageFormat(
        "vmdk",
        "streamOptimized" if stream_optimized else "sparse extent",
        None if capacity is None else capacity * 512,
    )


def _vhd_size(footer: bytes) -> int | None:
    """The VHD footer's Current Size, big-endian at 48 (Virtual Hard Disk Image Format Specification)."""
    return _uint(footer, 48, "big")


# [MS-VHDX] 2.2: the region table at 192 KiB finds the metadata region; its table finds the disk size.
_VHDX_REGION_TABLE = 192 * 1024
_VHDX_METADATA_REGION = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e").bytes_le
_VHDX_VIRTUAL_DISK_SIZE = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8").bytes_le
_VHDX_TABLE_SIZE = 64 * 1024  # both tables are 64 KiB


def _vhdx_size(read_at: ReadAt, size: int) -> int | None:
    """The VHDX Virtual Disk Size metadata item, or None unless the region and metadata tables are whole
    and say it plainly (a damaged image is QEMU's to judge, not --list's)."""
    if size < _VHDX_REGION_TABLE + _VHDX_TABLE_SIZE:
        return None
    region = _vhdx_entry(read_at(_VHDX_REGION_TABLE, _VHDX_TABLE_SIZE), b"regi", 16, _VHDX_METADATA_REGION)
    if region is None:
        return None
    metadata_offset = int.from_bytes(region[16:24], "little")
    if metadata_offset + _VHDX_TABLE_SIZE > size:
        return None
    table = read_at(metadata_offset, _VHDX_TABLE_SIZE)
    item = _vhdx_entry(table, b"metadata", 32, _VHDX_VIRTUAL_DISK_SIZE)
    if item is None:
        return None
    item_offset, item_length = int.from_bytes(item[16:20], "little"), int.from_bytes(item[20:24], "little")
    if item_length != 8 or item_offset < _VHDX_TABLE_SIZE or metadata_offset + item_offset + 8 > size:
        return None
    return int.from_bytes(read_at(metadata_offset + item_offset, 8), "little")


def _vhdx_entry(table: bytes, signature: bytes, first: int, wanted: bytes) -> bytes | None:
    """The 32-byte entry of a VHDX region or metadata table whose GUID is `wanted`.

    Both tables keep their entry count as a little-endian uint32 at 8 (region table) or uint16 at 10
    (metadata table), and their 32-byte entries from `first` on, each starting with its GUID.
    """
    if len(table) < _VHDX_TABLE_SIZE or not table.startswith(signature):
        return None
    count_field = table[8:12] if signature == b"regi" else table[10:12]
    count = int.from_bytes(count_field, "little")
    for start in range(first, min(first + 32 * count, _VHDX_TABLE_SIZE - 31), 32):
        if table[start : start + 16] == wanted:
            return table[start : start + 32]
    return None


def _uint(data: bytes, offset: int, byteorder: Literal["big", "little"]) -> int | None:
    """An unsigned 64-bit field, or None if the header is cut short before it."""
    field = data[offset : offset + 8]
    return int.from_bytes(field, byteorder) if len(field) == 8 else None
