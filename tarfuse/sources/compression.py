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


class DecoderMemoryError(DecodeError):
    """The stream needs a larger window or dictionary than the mount's decoder memory allows (the message
    names the limit and `-o decoder_memory`): refused, rather than let one archive claim the memory."""


# -o decoder_memory: what all decoders of a mount may claim for windows, dictionaries and their own buffers,
# beside -o cache_size (sources/__init__.py) and the daemon itself, under the 256 MiB that a mount stays in.
# A compressed source has two decoders at once (the background pass's and the one that serves reads), so
# each gets half: 72 MiB takes `xz -9` (a 64 MiB dictionary) and zstd windows up to 64 MiB (every level
# without --long or --ultra); `zstd --long` (128 MiB) and larger are refused unless the option is raised.
DEFAULT_DECODER_MEMORY = 144 << 20
DECODERS_PER_SOURCE = 2


def decoder_share(decoder_memory: int) -> int:
    """The memory one decoder of a source may claim, out of the source's `decoder_memory`."""
    return max(1 << 20, decoder_memory // DECODERS_PER_SOURCE)


def memory_refusal(what: str, needs: int | None, share: int) -> DecoderMemoryError:
    """The one line that says a stream needs more decoder memory than the mount allows, and what to do."""
    needed = "" if needs is None else f" ({_mib(needs)})"
    return DecoderMemoryError(
        f"{what} needs more memory to decode{needed} than the decoder memory limit allows ({_mib(share)} for "
        f"each of this stream's two decoders; -o decoder_memory=SIZE raises it, default "
        f"{DEFAULT_DECODER_MEMORY >> 20}M)"
    )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.0f} MiB" if size >= 1 << 20 else f"{size} bytes"


def zstd_window_log(share: int) -> int:
    """zstd's windowLogMax for a decoder that may claim `share` bytes: the largest window that fits."""
    return max(10, min(31, share.bit_length() - 1))


PEEK_INPUT = 1 << 20  # compressed bytes a peek decodes at most: enough for a disk image's first 34 KiB


def peek(
    compressed: bytes, compression: Compression, size: int, share: int = DEFAULT_DECODER_MEMORY // 2
) -> bytes:
    """The first `size` decompressed bytes of a stream that starts with `compressed` (short if the input
    ends first, or is damaged, or needs more than `share` bytes of decoder memory): to tell what a
    compressed member holds without decompressing it all."""
    import bz2
    import lzma
    import zlib

    import pyzstd

    try:
        if compression in ("gzip", "dictzip"):
            return zlib.decompressobj(31).decompress(compressed, size)
        if compression == "xz":
            return lzma.LZMADecompressor(memlimit=share).decompress(compressed, max_length=size)
        if compression == "bzip2":
            return bz2.BZ2Decompressor().decompress(compressed, max_length=size)
        option = {int(pyzstd.DParameter.windowLogMax): zstd_window_log(share)}
        return bytes(pyzstd.EndlessZstdDecompressor(option=option).decompress(compressed, max_length=size))
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, pyzstd.ZstdError):
        return b""  # damaged: whatever it holds, it does not start like an image
