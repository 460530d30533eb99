"""Decide what is being served: refuse compressed input, pick the image member, name its format.

Format names are QEMU's block driver names (`qemu -drive format=...`), so users can paste them.
Must not import pyfuse3 or trio; reads happen through callables handed in by the caller.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tarfuse.archive import Member, normalize_name
from tarfuse.errors import ArchiveError, CompressedArchive, NoImage

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
)
HEAD_SIZE = 0x8800  # enough to see the ISO 9660 volume descriptor at 0x8001

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

ReadAt = Callable[[int, int], bytes]  # (offset, size) -> bytes of the image, short at its end


@dataclass(frozen=True, slots=True)
class ImageFormat:
    """A QEMU block driver name, and what was seen, for people."""

    driver: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.driver} ({self.detail})" if self.detail else self.driver


RAW = ImageFormat("raw")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file as tar -x would create it: its name, and the member whose data it gets.

    For a hard link the two differ: the link's name, the target's data.
    """

    name: str
    member: Member


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


MAX_MEMBERS = 250_000  # entries of one archive; each costs ~300 bytes while the archive is read (below)


class FileTable:
    """The regular files tar -x would leave so far, fed one member at a time, in archive order.

    A later member replaces an earlier one of the same name, as on extraction; a hard link points to the
    last earlier member of its target's name, and one to its own name leaves that file as it is (GNU tar
    and tarfile extract it intact; bsdtar says "Skipping hardlink pointing to itself"). A link to nothing
    removes its name, as tar -x cannot make it either.

    Every file is kept until the end (a later hard link may name it), about 300 bytes each: MAX_MEMBERS
    bounds that (~75 MiB) under the 256 MiB a mount may take, whatever the archive. A compressed archive
    of a million empty headers is a few kilobytes.
    """

    def __init__(self) -> None:
        self._files: dict[str, Candidate] = {}  # normalized name -> the file there now
        self._members = 0

    def add(self, member: Member) -> None:
        self._members += 1
        if self._members > MAX_MEMBERS:
            raise ArchiveError(
                f"more than {MAX_MEMBERS:,} members: past tarfuse's limit (it keeps every name while it "
                "reads the archive); extract the image with tar -x",
                member.header_offset,
            )
        name = normalize_name(member.name)
        target = member if member.kind == "file" else None
        if member.kind == "hardlink":  # looked up before its own name goes: it may be the link's own
            found = self._files.get(normalize_name(member.linkname))
            target = None if found is None else found.member
        self._files.pop(name, None)  # the name moves to the end, in archive order
        if target is not None:
            self._files[name] = Candidate(member.name, target)

    def get(self, name: str) -> Candidate | None:
        """The file at `name` (normalized) now, if any."""
        return self._files.get(name)

    def files(self) -> list[Candidate]:
        return list(self._files.values())


def resolve_files(members: Iterable[Member]) -> list[Candidate]:
    """List the regular files tar -x would leave, hard links resolved to their target's data (FileTable)."""
    table = FileTable()
    for member in members:
        table.add(member)
    return table.files()


def has_image_suffix(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


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
    names = ", ".join(c.name for c in candidates[:10])
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
    if head[512:520] == b"EFI PART":
        return ImageFormat("raw", "GPT partition table")
    if head[510:512] == b"\x55\xaa":
        return ImageFormat("raw", "MBR boot sector")
    return None
