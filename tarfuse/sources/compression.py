"""Which compression a stream's first bytes show, what to say about one tarfuse cannot serve, and the error
a decompressor raises on a stream it cannot decode."""

from typing import Literal

from tarfuse.errors import CompressedArchive

# The compressions tarfuse serves; "dictzip" is gzip whose header carries a table for random access
# (sniff says "gzip": compressed.CompressedSource looks for the table).
Compression = Literal["gzip", "bzip2", "xz", "zstd", "dictzip"]

# Compression magic numbers: the name, and the command that unpacks it.
COMPRESSION_MAGIC = (
    (b"\x1f\x8b", "gzip", "gunzip"),
    (b"BZh", "bzip2", "bunzip2"),
    (b"\xfd7zXZ\x00", "xz", "unxz"),
    (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
    (b"\x04\x22\x4d\x18", "lz4", "unlz4"),
    (b"LZIP", "lzip", "lzip -d"),
    (b"\x1f\x9d", "compress (.Z)", "uncompress"),
)
# The name suffixes of compressed files: an image compressed without a tar, or a tar member, is served
# under its name without one (disk.raw.xz -> disk.raw).
COMPRESSION_SUFFIXES = (".gz", ".xz", ".zst", ".zstd", ".bz2", ".dz")
SERVED: tuple[Compression, ...] = ("gzip", "bzip2", "xz", "zstd")  # the ones compressed.DECODERS decodes
_SKIPPABLE_FIRST = frozenset(bytes([0x50 + i]) for i in range(16))  # zstd skippable frames: 0x184D2A5?


def compression_of(head: bytes) -> tuple[str, str] | None:
    """Name the compression that the first bytes show, and the command that unpacks it; None if none."""
    for magic, name, command in COMPRESSION_MAGIC:
        if head.startswith(magic):
            return name, command
    return None


def check_uncompressed(head: bytes) -> None:
    """Refuse tar data that is still compressed (the source layer took one layer off) with what to do."""
    if (found := compression_of(head)) is not None:
        name, command = found
        raise CompressedArchive(
            f"the tar data is {name}-compressed (compressed twice?); decompress it first ({command} ARCHIVE)",
            0,
        )


def sniff(head: bytes) -> Compression | None:
    """Name the compression from the first bytes ("gzip", "bzip2", "xz", "zstd"), or None for plain tar.

    Raises:
        CompressedArchive: a compression tarfuse cannot serve (lz4, lzip, compress).
    """
    if head[:1] in _SKIPPABLE_FIRST and head[1:4] == b"\x2a\x4d\x18":  # pzstd starts with a skippable frame
        return "zstd"
    if (found := compression_of(head)) is None:
        return None
    name, command = found
    served = next((compression for compression in SERVED if compression == name), None)
    if served is None:
        raise CompressedArchive(
            f"the archive is {name}-compressed, which tarfuse cannot serve; decompress it "
            f"first ({command} ARCHIVE), or recompress it with gzip, zstd, xz or bzip2",
            0,
        )
    return served


class DecodeError(Exception):
    """The stream cannot be decompressed (corrupt, cut short), or a saved index or spill does not fit it.

    The one error the decoders (compressed.py's adapters, zstdframes.py) raise for the data they decode:
    each catches its library's errors at the call into the library and raises this instead, and sources/
    catches only this (compressed.py makes it CorruptCompressed; index.py rebuilds the index, or drops
    the spill). A ValueError of our own code is a bug, not a corrupt archive: it propagates as itself,
    instead of marking the source broken and failing every later read. Not a TarfuseError: it is not
    for users, and callers outside sources/ are not meant to catch it.
    """


PEEK_INPUT = 1 << 20  # compressed bytes a peek decodes at most: enough for a disk image's first 34 KiB


def peek(compressed: bytes, compression: Compression, size: int) -> bytes:
    """The first `size` decompressed bytes of a stream that starts with `compressed` (short if the input
    ends first, or is damaged): to tell what a compressed member holds without decompressing it all."""
    import bz2
    import lzma
    import zlib

    import pyzstd

    try:
        if compression in ("gzip", "dictzip"):
            return zlib.decompressobj(31).decompress(compressed, size)
        if compression == "xz":
            return lzma.LZMADecompressor().decompress(compressed, max_length=size)
        if compression == "bzip2":
            return bz2.BZ2Decompressor().decompress(compressed, max_length=size)
        return bytes(pyzstd.EndlessZstdDecompressor().decompress(compressed, max_length=size))
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, pyzstd.ZstdError):
        return b""  # damaged: whatever it holds, it does not start like an image
