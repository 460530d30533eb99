"""Build small sample disk images for the demo and the tests, with no downloads, and archive them.

The image is a sparse raw disk, like a cloud image: a boot sector that prints one line on the first
serial port, a few runs of deterministic pseudo-random data, and holes everywhere else. Its bytes are
the oracle the tests compare a mount against. `make_archive` puts an image (this one, or a benchmark's)
into an archive as a real tar program writes it.
"""

import os
import random
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"  # at bytes 510-511; the BIOS boots a disk only if it is there
LOAD_ADDRESS = 0x7C00  # where the BIOS loads the boot sector (segment 0)

# x86 real-mode code, hand-assembled. The BIOS jumps to it either as 0000:7C00 or as 07C0:0000;
# both work, because data is addressed through DS = 0 and every jump is relative.
# COM1 is I/O port 0x3f8; QEMU's 16550 UART needs no setup before a write to its transmit register.
_CODE = bytes.fromhex(
    "fa"  # 00  cli                   no interrupts: nothing below may be disturbed
    "fc"  # 01  cld                   lodsb walks forwards
    "31c0"  # 02  xor ax, ax
    "8ed8"  # 04  mov ds, ax          DS = 0, so DS:SI is a linear address
    "be0000"  # 06  mov si, MESSAGE   (0x7C00 + offset of the message; patched below)
    "baf803"  # 09  mov dx, 0x3f8     COM1
    "ac"  # 0c  next: lodsb           al = [ds:si++]
    "84c0"  # 0d  test al, al
    "7403"  # 0f  jz halt             NUL ends the message (0x11 + 3 = 0x14)
    "ee"  # 11  out dx, al            send the byte
    "ebf8"  # 12  jmp next            (0x14 - 8 = 0x0c)
    "f4"  # 14  halt: hlt
    "ebfd"  # 15  jmp halt            (0x17 - 3 = 0x14): stay halted even after an NMI
)
_SI_IMMEDIATE = slice(7, 9)  # the 16-bit operand of `mov si, MESSAGE`
MAX_MESSAGE_SIZE = SECTOR_SIZE - len(BOOT_SIGNATURE) - len(_CODE) - 1  # one byte for the NUL


# How each archive kind is made from a directory holding one file; "tarfile" is done in Python.
TAR_COMMANDS: dict[str, list[str]] = {
    "gnu": ["tar", "--format=gnu", "-S", "-cf"],
    "oldgnu": ["tar", "--format=oldgnu", "-S", "-cf"],
    "pax0.0": ["tar", "--format=posix", "--sparse-version=0.0", "-S", "-cf"],
    "pax0.1": ["tar", "--format=posix", "--sparse-version=0.1", "-S", "-cf"],
    "pax1.0": ["tar", "--format=posix", "--sparse-version=1.0", "-S", "-cf"],
    "bsdtar": ["bsdtar", "--read-sparse", "-cf"],
    "busybox": ["busybox", "tar", "-cf"],
}
ARCHIVE_KINDS = [*TAR_COMMANDS, "tarfile"]
ArchiveFactory = Callable[[str], Path]  # the tests' `archive_of(kind)`: the sample image archived as `kind`

# The tests' sample image (the `sample_image` fixture): its size, its boot line and its mtime, in whole
# seconds so that every tar format can store it exactly.
SAMPLE_SIZE = 24 * 1024 * 1024
SAMPLE_MESSAGE = "tarfuse sample booted"
SAMPLE_MTIME = 1_700_000_000


@dataclass(frozen=True, slots=True)
class SampleImage:
    """A sparse bootable raw image on disk and its bytes, the oracle for every read."""

    path: Path
    data: bytes
    message: str


@dataclass(frozen=True, slots=True)
class DataRun:
    """Bytes written at `offset` of a sample image; everything outside the runs is a hole."""

    offset: int
    data: bytes


def boot_sector(message: str) -> bytes:
    """Return a 512-byte boot sector that writes `message` to COM1, then halts.

    Raises:
        ValueError: `message` is not ASCII, contains a NUL, or does not fit in the sector.
    """
    text = message.encode("ascii")
    if b"\0" in text or len(text) > MAX_MESSAGE_SIZE:
        raise ValueError(f"the message must be at most {MAX_MESSAGE_SIZE} ASCII bytes, without NUL")
    code = bytearray(_CODE)
    code[_SI_IMMEDIATE] = (LOAD_ADDRESS + len(_CODE)).to_bytes(2, "little")
    body = bytes(code) + text + b"\0"
    return body.ljust(SECTOR_SIZE - len(BOOT_SIGNATURE), b"\0") + BOOT_SIGNATURE


def data_runs(size: int, seed: int = 0) -> list[DataRun]:
    """Return the pseudo-random data runs of a sample image of `size` bytes (at least 64 KiB).

    The runs sit at 1/8, 3/8, 5/8 and 7/8 of the image, with lengths that are not multiples of any
    block size, so that hole detection and sparse maps both meet ragged edges. The same size and seed
    always give the same bytes.
    """
    if size < 64 * 1024:
        raise ValueError(f"a sample image needs at least 64 KiB, not {size} bytes")
    rng = random.Random(seed)
    runs = []
    for eighth, length in ((1, 65_536), (3, 4_607), (5, 200_003), (7, 12_345)):
        length = min(length, size // 16)
        offset = size * eighth // 8 + min(1_000 * eighth, size // 32)  # not block aligned either
        runs.append(DataRun(offset, rng.randbytes(length)))
    return runs


def write_sparse_boot_image(path: str, size: int, message: str, seed: int = 0) -> list[DataRun]:
    """Create a sparse raw disk image at `path` and return what was written into it.

    The image is `size` bytes: the boot sector of `message` at 0, the `data_runs` of `size` and
    `seed`, and holes elsewhere (made by ftruncate, so the filesystem allocates nothing for them).
    """
    runs = [DataRun(0, boot_sector(message)), *data_runs(size, seed)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for run in runs:
            os.pwrite(fd, run.data, run.offset)
    finally:
        os.close(fd)
    return runs


def make_archive(kind: str, source: Path, archive: Path) -> Path:
    """Archive the file `source`, under its basename, as `kind` (one of ARCHIVE_KINDS); return `archive`.

    Raises:
        FileNotFoundError: the tar program of `kind` is not installed.
        subprocess.CalledProcessError: it failed.
    """
    if kind == "tarfile":
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(source, arcname=source.name)
        return archive
    subprocess.run(
        [*TAR_COMMANDS[kind], str(archive), "-C", str(source.parent), source.name],
        check=True,
        capture_output=True,
    )
    return archive
