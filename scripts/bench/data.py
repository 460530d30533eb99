"""The cases' data: deterministic disk images, the tar archives that hold them, and their expected bytes.

An `ImageModel` knows every byte of its image (data from a seeded pool, holes as zeros): the oracle that
every tool's reads are checked against. GNU tar writes the archives, except the one with a huge sparse map
(GNU tar would need hours to find that many holes): kit.tarbuilder writes it in GNU tar's layout (GNU tar
manual, "Sparse Formats", PAX 1.0), and GNU tar must list it back.
"""

import bisect
import functools
import hashlib
import os
import random
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

from kit.tarbuilder import END, pax10_sparse

BLOCK = 4096  # the model's unit of content: each 4 KiB block starts with its own index
_POOL_SPAN = 1 << 20
_MIB = 1 << 20
MEMBER = "disk.raw"


class Extent(NamedTuple):  # a run of data in the image; everything between extents is a hole
    offset: int
    length: int


class Segment(NamedTuple):  # where image bytes live in the archive
    logical: int
    length: int
    physical: int | None  # None: a hole


class ImageModel:
    """Every byte of a (possibly sparse) image, computed on demand from a seed."""

    def __init__(self, size: int, extents: Sequence[Extent], seed: int) -> None:
        self.size = size
        self.extents = tuple(extents)
        self._starts = [e.offset for e in self.extents]
        self._pool = random.Random(seed).randbytes(_POOL_SPAN + BLOCK)

    def block(self, index: int) -> bytes:
        """The content of 4 KiB block `index` where it is data: its index, then pool bytes."""
        start = (index * 0x9E3779B1) % _POOL_SPAN  # odd multiplier: distinct starts for 2**20 blocks
        return index.to_bytes(8, "little") + self._pool[start : start + BLOCK - 8]

    def data(self, offset: int, size: int) -> bytes:
        """The data bytes at [offset, offset + size), as if no part of the range were a hole."""
        first, last = offset // BLOCK, (offset + size - 1) // BLOCK
        joined = b"".join(self.block(k) for k in range(first, last + 1))
        skip = offset - first * BLOCK
        return joined[skip : skip + size]

    def read(self, offset: int, size: int) -> bytes:
        """The image bytes at [offset, offset + size), clipped at the end; holes are zeros."""
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        out = bytearray(end - offset)
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        while i < len(self.extents) and self.extents[i].offset < end:
            extent = self.extents[i]
            lo, hi = max(offset, extent.offset), min(end, extent.offset + extent.length)
            if lo < hi:
                out[lo - offset : hi - offset] = self.data(lo, hi - lo)
            i += 1
        return bytes(out)

    @functools.cached_property
    def sha256(self) -> str:
        """The sha256 of the whole image (computed once: it takes a pass over the image)."""
        digest = hashlib.sha256()
        for offset in range(0, self.size, _MIB):
            digest.update(self.read(offset, _MIB))
        return digest.hexdigest()

    def write_file(self, path: Path) -> None:
        """Write the image as a file with real holes (truncate, then write each extent)."""
        with open(path, "wb") as out:
            out.truncate(self.size)
            for extent in self.extents:
                for offset in range(extent.offset, extent.offset + extent.length, _MIB):
                    n = min(_MIB, extent.offset + extent.length - offset)
                    os.pwrite(out.fileno(), self.data(offset, n), offset)


@dataclass(frozen=True)
class Dataset:
    """One benchmark case: an archive, its image member (MEMBER), and that image's expected bytes."""

    name: str
    title: str
    archive: Path
    model: ImageModel
    segments: tuple[Segment, ...]  # the member's bytes in the archive, for the pread limit
    members: int  # members in the archive
    sparse: bool
    metrics: tuple[str, ...]

    @property
    def size(self) -> int:
        return self.model.size

    @property
    def first_data(self) -> int:
        """Archive offset of the member's first stored byte."""
        return next(s.physical for s in self.segments if s.physical is not None)


class Sizes(NamedTuple):
    image: int  # the non-sparse image
    small_members: int  # small members in front of it in the "many" case
    sparse_image: int
    sparse_data: int
    map_extents: int  # extents of the huge-map case


FULL = Sizes(1 << 30, 20_000, 4 << 30, 256 << 20, 1_000_000)
QUICK = Sizes(128 << 20, 2_000, 512 << 20, 32 << 20, 100_000)  # --quick


# Random 4 KiB reads (fio): 1 reader unpinned, on the server's CPU, on another CPU; 4 readers unpinned.
RANDOM_READS = ("rand1", "rand1-same", "rand1-apart", "rand4")

CASES = ("plain", "many", "sparse-oldgnu", "sparse-pax", "extents")  # in the order they run
_METRICS = {  # past ready and rss
    "plain": ("seq", *RANDOM_READS, "qemu"),
    "sparse-oldgnu": ("seq", "qemu"),
    "sparse-pax": ("seq", "qemu"),
    "extents": ("seq", "rand1"),
}
_SPARSE = {  # GNU tar's options, and the dialect's name
    "sparse-oldgnu": (("--format=oldgnu", "-S"), "old GNU sparse"),
    "sparse-pax": (("--format=posix", "-S", "--sparse-version=1.0"), "PAX 1.0 sparse"),
}
_MAP_EXTENT, _MAP_STRIDE = 512, BLOCK  # huge map: 512 data bytes at the start of every 4 KiB


def build(case: str, directory: Path, sizes: Sizes) -> Dataset:
    """Create the archive of `case` in `directory` (GNU tar, from an image file removed again)."""
    if case == "extents":
        return _extents_case(directory, sizes.map_extents)
    smalls: list[str] = []
    if case in _SPARSE:
        extents = scattered_extents(sizes.sparse_image, sizes.sparse_data, seed=2)
        model, (flags, dialect) = ImageModel(sizes.sparse_image, extents, seed=2), _SPARSE[case]
        title = f"sparse image, {_size(sizes.sparse_data)} of data in {len(extents):,} extents, {dialect}"
    else:
        model, flags = ImageModel(sizes.image, [Extent(0, sizes.image)], seed=1), ("--format=gnu",)
        title = "raw image, GNU tar"
        if case == "many":
            smalls = _write_small_members(directory / "small", sizes.small_members)
            title = f"image after {sizes.small_members:,} small members, GNU tar"
    model.write_file(directory / MEMBER)
    archive = directory / f"{case}.tar"
    command = ["tar", *flags, "--sort=name", "-cf", str(archive), "-C", str(directory), *smalls, MEMBER]
    subprocess.run(command, check=True)
    (directory / MEMBER).unlink()
    sparse = len(model.extents) != 1 or model.extents[0] != Extent(0, model.size)
    segments, metrics = member_segments(archive, model.size), _METRICS.get(case, ())
    return Dataset(
        case, f"{_size(model.size)} {title}", archive, model, segments, len(smalls) + 1, sparse, metrics
    )


def _write_small_members(directory: Path, count: int) -> list[str]:
    """Small files of 100 B to 3 KiB, sorted by name; returns their paths relative to the parent."""
    directory.mkdir()
    rng = random.Random(3)
    names = []
    for i in range(count):
        name = f"f{i:06d}.txt"
        (directory / name).write_bytes(rng.randbytes(rng.randrange(100, 3072)))
        names.append(f"{directory.name}/{name}")
    return names


def scattered_extents(size: int, data: int, seed: int) -> list[Extent]:
    """`data` bytes in 4 KiB-aligned extents of 4-252 KiB, at random places in an image of `size`."""
    rng, lengths, left = random.Random(seed), [], data
    while left > 0:
        lengths.append(min(left, rng.randrange(1, 64) * BLOCK))
        left -= lengths[-1]
    cuts = sorted(rng.randrange((size - data) // BLOCK + 1) for _ in lengths)
    extents, offset, previous = [], 0, 0
    for cut, length in zip(cuts, lengths, strict=True):
        offset += (cut - previous) * BLOCK
        extents.append(Extent(offset, length))
        offset, previous = offset + length, cut
    return extents


def member_segments(archive: Path, size: int) -> tuple[Segment, ...]:
    """Where the member's image bytes are in `archive`, as Python's tarfile reads it."""
    with tarfile.open(archive) as tar:
        info = tar.getmember(MEMBER)
    # typeshed does not describe TarInfo.sparse: a list of (offset, size) pairs, or None
    sparse = cast(list[tuple[int, int]] | None, info.sparse)
    runs = sparse if sparse is not None else [(0, info.size)]
    return segments_from_runs([(o, n) for o, n in runs if n], info.offset_data, size)


def segments_from_runs(runs: Sequence[tuple[int, int]], data_offset: int, size: int) -> tuple[Segment, ...]:
    """Tile [0, size) with holes and data runs whose bytes are packed from `data_offset` on."""
    segments, logical, physical = [], 0, data_offset
    for offset, length in runs:
        if offset > logical:
            segments.append(Segment(logical, offset - logical, None))
        segments.append(Segment(offset, length, physical))
        logical, physical = offset + length, physical + length
    if logical < size:
        segments.append(Segment(logical, size - logical, None))
    return tuple(segments)


def _extents_case(directory: Path, count: int) -> Dataset:
    extents = [Extent(i * _MAP_STRIDE, _MAP_EXTENT) for i in range(count)]
    model = ImageModel(count * _MAP_STRIDE, extents, seed=4)
    archive = directory / "extents.tar"
    runs = [(e.offset, e.length) for e in extents]
    # GNU tar ends a map with (realsize, 0) when the image ends in a hole; without it, it cuts the file there
    stored = count * _MAP_EXTENT
    head = pax10_sparse(MEMBER, [*runs, (model.size, 0)], model.size, b"", stored_size=stored)
    with archive.open("wb") as out:
        out.write(head)
        for at in range(0, count, 2048):
            out.write(b"".join(model.data(e.offset, e.length) for e in extents[at : at + 2048]))
        out.write(bytes(-stored % 512) + END)
    listing = subprocess.run(["tar", "-tvf", str(archive)], capture_output=True, text=True, check=True).stdout
    if MEMBER not in listing.split() or str(model.size) not in listing.split():  # GNU tar must read it back
        raise RuntimeError(f"GNU tar does not read {archive} as written: {listing.strip()!r}")
    segments = segments_from_runs(runs, len(head), model.size)
    title = (
        f"{_size(model.size)} image with a {count:,}-extent sparse map ({_MAP_EXTENT} B every 4 KiB), PAX 1.0"
    )
    return Dataset("extents", title, archive, model, segments, 1, True, _METRICS["extents"])


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
