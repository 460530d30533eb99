"""Open the disk image inside an archive: scan, choose, decode the sparse map, build the mapper.

The one entry point that the CLI and the daemon share.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from tarfuse.errors import NoImage
from tarfuse.image import detect
from tarfuse.image.detect import ImageFormat, has_image_suffix
from tarfuse.image.mapper import ImageMapper, PreadInto
from tarfuse.sources.compression import PEEK_INPUT, check_uncompressed, peek
from tarfuse.sources.compression import sniff as sniff_compression
from tarfuse.tar import sparse
from tarfuse.tar.archive import Member, ReadAt, normalize_name, scan_members
from tarfuse.tar.files import Candidate, FileTable, resolve_files

if TYPE_CHECKING:  # imported where a list is used: json only where it is (tests/test_imports.py)
    from tarfuse.tar.listing import ListedMembers

# The archive's members: walked from its headers (None), or a member list written down earlier, each member
# checked against its header before its data is read (tar.listing: ListingMismatch if one differs).
Listed = Optional["ListedMembers"]


@dataclass(frozen=True, slots=True)
class Image:
    """A disk image ready to serve: which member, its map, its format, and the mapper over it."""

    name: str
    member: Member
    format: ImageFormat
    mapper: ImageMapper
    stored_bytes: int  # bytes of real data in the archive: what `du` should show
    extent_count: int


def _open_candidate(
    candidate: Candidate,
    read_at: ReadAt,
    pread_into: PreadInto | None = None,
    read_tail: bool = True,
    listed: Listed = None,
) -> Image:
    sparse_map = _decode(candidate.member, read_at, listed)
    mapper = ImageMapper(read_at, sparse_map, pread_into)
    return Image(
        name=candidate.name,
        member=candidate.member,
        format=_format_of(mapper, read_tail) or detect.RAW,
        mapper=mapper,
        stored_bytes=sparse_map.stored_bytes,
        extent_count=len(sparse_map.logical),
    )


def _format_of(mapper: ImageMapper, read_tail: bool) -> ImageFormat | None:
    """The member's format; for a compressed member (rootfs.zst holding ext4), what its first decompressed
    bytes show, with the compression in the detail ("xz-compressed, ext2/3/4 file system"): mount.py then
    serves it decompressed."""
    found = detect.detect_format(mapper.read, mapper.size, read_tail)
    if found is not None or (compression := sniff_compression(mapper.read(0, 8))) is None:
        return found
    head = peek(mapper.read(0, PEEK_INPUT), compression, detect.HEAD_SIZE)
    inside = detect.detect_format(lambda offset, n: head[offset : offset + n], len(head), read_tail=False)
    if inside is None:
        return None
    return ImageFormat(
        inside.driver, f"{compression}-compressed" + (f", {inside.detail}" if inside.detail else "")
    )


def _decode(member: Member, read_at: ReadAt, listed: Listed) -> sparse.SparseMap:
    """The member's map, once a listed member is known to be the archive's: its data is read next."""
    if listed is not None:
        listed.check(member)
    return sparse.decode(member, read_at)


def _sniffer(read_at: ReadAt, listed: Listed) -> Callable[[Member], ImageFormat | None]:
    def sniff(member: Member) -> ImageFormat | None:
        return _format_of(ImageMapper(read_at, _decode(member, read_at, listed)), read_tail=True)

    return sniff


def _members(read_at: ReadAt, archive_size: int, listed: Listed) -> Iterable[Member]:
    check_uncompressed(read_at(0, 16))
    return scan_members(read_at, archive_size) if listed is None else listed


def _files(read_at: ReadAt, archive_size: int, listed: Listed) -> list[Candidate]:
    return resolve_files(_members(read_at, archive_size, listed))


def list_images(
    read_at: ReadAt,
    archive_size: int,
    read_into: PreadInto | None = None,
    most: int | None = None,
    listing: bool = False,
    listed: Listed = None,
) -> list[Image]:
    """Every candidate image in the archive, opened (for `tarfuse --list`, and for every disk of a
    multi-disk archive); more than `most` are refused before any is opened, for a `listing` as well."""
    files = _files(read_at, archive_size, listed)
    candidates = detect.find_candidates(files, _sniffer(read_at, listed))
    if listing and most is not None and len(candidates) > most:
        raise NoImage(
            f"the archive holds {len(candidates):,} disk images, more than the {most:,} tarfuse lists (each "
            "costs memory while open); tar -tf ARCHIVE names them, and -o member=PATH serves one"
        )
    _refuse_more_than(most, candidates, "disk images")
    return [_open_candidate(c, read_at, read_into, listed=listed) for c in candidates]


def list_files(
    read_at: ReadAt,
    archive_size: int,
    read_into: PreadInto | None = None,
    most: int | None = None,
    listed: Listed = None,
) -> tuple[list[Image], list[tuple[str, str]]]:
    """Every regular file the archive leaves on extraction, opened as an image would be (-o all): the
    disk images with their format, the others as raw bytes; and the symlinks it leaves (name, target).
    More than `most` files are refused before any is opened."""
    table = FileTable()
    for member in _members(read_at, archive_size, listed):
        table.add(member)
    files = table.files()
    _refuse_more_than(most, files, "files")
    return [_open_candidate(c, read_at, read_into, listed=listed) for c in files], table.symlinks()


def _refuse_more_than(most: int | None, found: list[Candidate], what: str) -> None:
    """An opened file costs about a kilobyte (its map, mapper and format) and a served one as much again:
    past the caller's bound, refuse while the list is still only names, before the memory is spent."""
    if most is not None and len(found) > most:
        raise NoImage(
            f"the archive holds {len(found):,} {what}, more than the {most:,} one mount serves (each costs "
            "memory while served); serve one with -o member=PATH "
            "(tarfuse --list ARCHIVE shows the disk images)"
        )


def open_first_image(
    read_at: ReadAt, archive_size: int, wanted: str | None = None, pread_into: PreadInto | None = None
) -> Image:
    """The first member named `wanted`, or named like an image, without reading the headers after it.

    For compressed archives, where every header further on costs decompressing the data before it. If no
    member is named like an image, fall back to open_image's rules over the whole archive.
    """
    check_uncompressed(read_at(0, 16))
    table = FileTable()
    for member in scan_members(read_at, archive_size):
        table.add(member)
        name = normalize_name(member.name)
        if member.kind in ("file", "hardlink") and (
            name == normalize_name(wanted) if wanted else has_image_suffix(name)
        ):
            found = table.get(name)
            if found is not None:  # else a hard link to nothing, which tar -x cannot make either
                return _open_candidate(found, read_at, pread_into, read_tail=False)
    files = table.files()
    candidates = [] if wanted else detect.find_candidates(files, _sniffer(read_at, None))
    return _open_candidate(detect.choose_image(files, candidates, wanted), read_at, pread_into)


def open_image(
    read_at: ReadAt,
    archive_size: int,
    wanted: str | None = None,
    pread_into: PreadInto | None = None,
    listed: Listed = None,
) -> Image:
    """The image to serve: the member named `wanted`, or the archive's only candidate.

    `pread_into` (os.preadv-like) lets the mapper fill the daemon's reusable buffers.
    """
    files = _files(read_at, archive_size, listed)
    candidates = [] if wanted else detect.find_candidates(files, _sniffer(read_at, listed))
    chosen = detect.choose_image(files, candidates, wanted)
    return _open_candidate(chosen, read_at, pread_into, listed=listed)
