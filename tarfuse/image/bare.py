"""An image that is a whole stream: given as it is, or compressed without a tar around it.

Raspberry Pi OS ships `...arm64.img.xz`, OpenWrt `.img.gz`, CI artefacts `.qcow2.zst`: one image, compressed,
no tar. A disk image may also be given bare (a raw image on a web server, which losetup cannot open). Such
a stream is served whole, under its own name without the compression suffix, and only if it is not a tar
(a tar is opened by its members) and its name or its first bytes say it is an image; anything else is
refused with what its first bytes look like, which says more than "bad header checksum".
"""

import posixpath
from urllib.parse import urlsplit

from tarfuse.errors import NoImage
from tarfuse.image import detect
from tarfuse.image.mapper import ImageMapper, PreadInto
from tarfuse.image.open import Image
from tarfuse.sources.compression import COMPRESSION_SUFFIXES
from tarfuse.tar import header as th
from tarfuse.tar import sparse
from tarfuse.tar.archive import Member, ReadAt

# Enough to tell an empty tar (one record of zeros) from a data ISO 9660 or UDF image, whose first 32 KiB
# are zeros too: the stream is an empty tar only if all of it is zeros.
TAR_HEAD = detect.HEAD_SIZE

# What a stream that is neither tar, nor compressed, nor an image may be: first bytes, and a name.
_NOT_IMAGES = (
    (b"PK\x03\x04", "a zip archive (unzip it first)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive (7z x first)"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"070701", "a cpio archive"),
    (b"070707", "a cpio archive"),
    (b"!<arch>\n", "an ar archive (a .deb?)"),
    (b"\x7fELF", "an ELF executable"),
    (b"%PDF", "a PDF document"),
    (b"<!DOCTYPE", "an HTML page (a download page instead of the file?)"),
    (b"<!doctype", "an HTML page (a download page instead of the file?)"),
    (b"<html", "an HTML page (a download page instead of the file?)"),
    (b"<?xml", "an XML document"),
)


def strip_compression_suffix(name: str) -> str:
    """`disk.raw.xz` -> `disk.raw`; a name without a compression suffix as it is."""
    for suffix in COMPRESSION_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def served_name(path: str, compression: str | None) -> str:
    """The image's name: the source's last path component, without a compression suffix if compressed.

    `2024-07-04-raspios-bookworm-arm64.img.xz` -> `2024-07-04-raspios-bookworm-arm64.img`; a URL's query
    string is not part of it.
    """
    base = posixpath.basename(urlsplit(path).path if "://" in path else path) or "image"
    return base if compression is None else strip_compression_suffix(base)


def is_tar(head: bytes) -> bool:
    """Whether a stream starts like a tar archive: a header block whose checksum holds, or an empty tar.

    `head` is the stream's first TAR_HEAD bytes. A file system image starts with zeros too (ext4 with
    1 KiB of them): zeros make an empty tar only if all of `head` is zeros, as an empty tar's record is.
    """
    block = head[: th.BLOCK_SIZE]
    if len(block) < th.BLOCK_SIZE:
        return False
    return th.checksum_ok(block) or not any(head)


def open_whole(
    read_at: ReadAt, size: int, name: str, mtime: int, read_into: PreadInto | None = None
) -> Image:
    """The whole stream as one image named `name`, if its name or content says it is one.

    Raises:
        NoImage: neither the name (an image suffix) nor the first bytes look like a disk image.
    """
    member = Member(
        name=name, kind="file", header_offset=0, data_offset=0, stored_size=size, real_size=size, mtime=mtime
    )
    sparse_map = sparse.decode(member, read_at)
    mapper = ImageMapper(read_at, sparse_map, read_into)
    return Image(
        name=name,
        member=member,
        format=check_image(name, mapper.read(0, detect.HEAD_SIZE)),
        mapper=mapper,
        stored_bytes=size,
        extent_count=len(sparse_map.logical),
    )


def check_image(name: str, head: bytes) -> detect.ImageFormat:
    """The format of a stream that starts with `head` (its first detect.HEAD_SIZE bytes), if its name or
    its content says it is a disk image; checked before a compressed stream is decompressed for its size.

    Raises:
        NoImage: neither the name (an image suffix) nor the first bytes look like a disk image.
    """
    found = detect.detect_format(
        lambda offset, size: head[offset : offset + size], len(head), read_tail=False
    )
    if found is None and not detect.has_image_suffix(name):
        raise NoImage(
            f"not a tar archive, and no disk image either: {name!r} has no image suffix and its first bytes "
            f"look like {describe(head[:64])}",
            0,
        )
    return found or detect.RAW


def describe(head: bytes) -> str:
    """Say what the first bytes of a stream look like, for a stream tarfuse cannot serve."""
    if not head:
        return "nothing: the stream is empty"
    for magic, what in _NOT_IMAGES:
        if head.startswith(magic):
            return what
    shown = head[:16]
    if all(32 <= b < 127 or b in b"\t\r\n" for b in shown):
        return f"text: {shown.decode('ascii')!r}"
    return "bytes " + shown.hex(" ")
