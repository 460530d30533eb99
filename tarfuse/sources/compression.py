"""Which compression a stream's first bytes show, and what to say about one tarfuse cannot serve."""

from tarfuse.errors import CompressedArchive

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
SERVED = ("gzip", "bzip2", "xz", "zstd")  # the ones compressed.DECODERS decodes
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


def sniff(head: bytes) -> str | None:
    """Name the compression from the first bytes ("gzip", "bzip2", "xz", "zstd"), or None for plain tar.

    Raises:
        CompressedArchive: a compression tarfuse cannot serve (lz4, lzip, compress).
    """
    if head[:1] in _SKIPPABLE_FIRST and head[1:4] == b"\x2a\x4d\x18":  # pzstd starts with a skippable frame
        return "zstd"
    if (found := compression_of(head)) is None:
        return None
    name, command = found
    if name not in SERVED:
        raise CompressedArchive(
            f"the archive is {name}-compressed, which tarfuse cannot serve; decompress it "
            f"first ({command} ARCHIVE), or recompress it with gzip, zstd, xz or bzip2",
            0,
        )
    return name
