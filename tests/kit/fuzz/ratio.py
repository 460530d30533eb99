"""High-ratio seeds: compressed archives that decompress to hundreds of times their size, made as they are.

The other seeds are tars that a Packing compresses; these could not be: their tar (256 MiB of zeros) would
sit in the fuzzer's memory, past the ceiling the fuzzer asserts. So each is made compressed, from one
compressed piece repeated (gzip members, zstd frames, xz and bzip2 streams may follow one another), a few
KB to 2 MB, and only mounted (engine.check_mounted): never read plain, never compared with GNU tar. What
they test is the decoders' memory (compressed.py, -o decoder_memory): zeros in every format, a repeated
block, a zstd frame that asks for a 128 MiB window (`zstd --long=27`) and an xz block whose header
declares a 4 GiB dictionary; those two must be refused, the others served, and the worker's peak RSS stays
under the ceiling after every case (pool.py).
"""

import bz2
import lzma
import random
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pyzstd

MIB = 1 << 20
PIECE = 32 * MIB  # the decompressed size of the piece that is repeated
DAMAGED = 0.3  # share of high-ratio cases whose compressed bytes are flipped or cut


@dataclass(frozen=True, slots=True)
class RatioSeed:
    """A compressed archive as it is given to tarfuse; `refused`: the decoder budget must refuse it."""

    name: str
    compression: str  # "gzip", "zstd", "xz", "bzip2"
    data: bytes
    refused: bool = False


def _gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def _zstd(data: bytes) -> bytes:
    return pyzstd.compress(data, 3)


def xz(data: bytes, preset: int = 6) -> bytes:
    """`data` as one xz stream; preset 9 (`xz -9`) asks the decoder for a 64 MiB dictionary."""
    return lzma.compress(data, format=lzma.FORMAT_XZ, preset=preset)


def _bzip2(data: bytes) -> bytes:
    return bz2.compress(data, 9)


COMPRESS: dict[str, Callable[[bytes], bytes]] = {"gzip": _gzip, "zstd": _zstd, "xz": xz, "bzip2": _bzip2}


def header(size: int, name: str = "vm/disk.img") -> bytes:
    """A GNU tar header of one regular file of `size` bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, 1_700_000_000
    return info.tobuf(tarfile.GNU_FORMAT)


def repeated(compression: str, piece: bytes, times: int) -> bytes:
    """A tar of one image, `piece` `times` over, compressed piece by piece (len(piece) % 512 == 0)."""
    compress = COMPRESS[compression]
    packed = compress(piece)
    return compress(header(len(piece) * times)) + packed * times + compress(bytes(1024))


def long_window_zstd(name: str = "vm/disk.img") -> bytes:
    """`zstd --long=27` of a small tar (one member, `name`), streamed: its frame declares a 128 MiB window."""
    options = {pyzstd.CParameter.windowLog: 27, pyzstd.CParameter.enableLongDistanceMatching: 1}
    compressor = pyzstd.ZstdCompressor(options)
    data = header(MIB, name) + bytes(range(256)) * 4096 + bytes(1024)
    return bytes(compressor.compress(data) + compressor.flush())


def patched_dictionary_xz(name: str = "vm/disk.img") -> bytes:
    """An xz of a small tar (one member, `name`) whose block header declares a 4 GiB dictionary (LZMA2
    property byte 40), the header's CRC32 made right again: liblzma would allocate what it says."""
    data = header(MIB, name) + random.Random(5).randbytes(MIB) + bytes(1024)
    stream = bytearray(lzma.compress(data, format=lzma.FORMAT_XZ, filters=[{"id": lzma.FILTER_LZMA2}]))
    start = 12  # after the stream header: the block header's size, its flags, one filter with 1 property
    size = (stream[start] + 1) * 4
    if stream[start + 1] & 0x03 or stream[start + 2 : start + 4] != b"\x21\x01":
        raise ValueError(f"liblzma wrote another block header: {bytes(stream[start : start + size]).hex()}")
    stream[start + 4] = 40  # (2 | 0) << (40 // 2 + 11) - 1: 4 GiB - 1
    crc = zlib.crc32(stream[start : start + size - 4])
    stream[start + size - 4 : start + size] = crc.to_bytes(4, "little")
    return bytes(stream)


def make_ratio_seeds() -> list[RatioSeed]:
    """Every high-ratio seed, in a fixed order, the same bytes on every run."""
    block = random.Random(1).randbytes(16 * 1024)  # inside gzip's 32 KiB window: matches all the way
    large = random.Random(2).randbytes(1536 * 1024)  # 1.5 MiB: inside zstd's window at level 3
    return [
        RatioSeed("gzip-zeros", "gzip", repeated("gzip", bytes(PIECE), 8)),
        RatioSeed("gzip-repeated-block", "gzip", repeated("gzip", block * (PIECE // len(block)), 2)),
        RatioSeed("zstd-zeros", "zstd", repeated("zstd", bytes(PIECE), 8)),
        RatioSeed("zstd-repeated-block", "zstd", repeated("zstd", large * 40, 1)),
        RatioSeed("zstd-long-window", "zstd", long_window_zstd(), refused=True),
        RatioSeed("xz-zeros", "xz", repeated("xz", bytes(PIECE), 8)),
        RatioSeed("xz-patched-dictionary", "xz", patched_dictionary_xz(), refused=True),
        # bzip2 decodes slowest: one piece, so that a busy machine still ends the case in its time limit
        RatioSeed("bzip2-zeros", "bzip2", repeated("bzip2", bytes(PIECE), 1)),
    ]


def damage(data: bytes, rng: random.Random) -> tuple[bytes, str | None]:
    """Now and then flip a byte or cut the stream; the bytes, and what was done (None: nothing)."""
    if rng.random() >= DAMAGED:
        return data, None
    kind, at = rng.choice(["flip", "flip", "cut"]), rng.randrange(10, len(data))
    if kind == "cut":
        return data[:at], f"cut at {at}"
    out = bytearray(data)
    out[at] ^= rng.randrange(1, 256)
    return bytes(out), f"flip at {at}"
