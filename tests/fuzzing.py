"""One fuzz case: make it, run it through tarfuse, and compare it with what GNU tar extracts.

The engine behind `make fuzz` (scripts/fuzz.py) and tests/test_fuzz.py; fuzzpool.py runs many cases in
worker processes. A case is a number: with the fuzz seed it decides the seed archive (fuzzseeds.py) and
the mutations (fuzzmutate.py), so any case can be made again from its number. A case passes when tarfuse
lists and opens the mutated archive and reads the image, or refuses it with an ArchiveError that has a
reason and an offset inside the archive; anything else tarfuse raises is a finding. Compared with GNU tar,
other bytes from a tar that succeeded are a finding; a tar that fails where tarfuse serves is kept for a
person to inspect; a tar more lenient than tarfuse is fine, and counted.
"""

import contextlib
import errno
import os
import random
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fuzzmutate import Layout, mutate, walk
from fuzzseeds import Seed

from tarfuse.archive import Pread, normalize_name
from tarfuse.errors import ArchiveError, NoImage
from tarfuse.image import Image, list_images, open_image

MIB = 1 << 20
READ_WHOLE = 2 * MIB  # images up to this size are read whole; larger ones in windows
WINDOW = 256 * 1024
COMPARE_WHOLE = 64 * MIB  # extracted images up to this size are compared whole
TAR_TIMEOUT = 60.0

Check = Callable[[bytes, random.Random], str]


class Problem(Exception):
    """tarfuse did something wrong without raising: a bad error, a short read, wrong bytes."""


@dataclass(frozen=True, slots=True)
class Case:
    number: int
    seed: str  # the seed archive's name
    steps: tuple[str, ...]  # the mutations, in order
    data: bytes


class Corpus:
    """The seed archives and their structure; makes the mutated archive of any case number."""

    def __init__(self, seeds: list[Seed]) -> None:
        self.seeds = seeds
        self._layouts: list[Layout] = [walk(seed.data) for seed in seeds]

    def case(self, fuzz_seed: int, number: int) -> Case:
        rng = random.Random(f"{fuzz_seed}:{number}")  # str seeds hash with SHA-512: same on every run
        i = rng.randrange(len(self.seeds))
        data, steps = mutate(self.seeds[i].data, self._layouts[i], rng)
        return Case(number, self.seeds[i].name, tuple(steps), data)


# ---- one case -----------------------------------------------------------------------------------------


def check_archive(data: bytes, rng: random.Random) -> str:
    """List and open the archive, read its images; return "served" or the refusing error's class name.

    Raises:
        Problem: an ArchiveError without reason or offset, or an opened image that reads wrong.
        Exception: anything but an ArchiveError from tarfuse propagates: it is what the fuzzer looks for.
    """
    pread = strict_pread(data)
    try:
        for image in list_images(pread, len(data)):
            read_image(image, rng, whole=False)
    except ArchiveError as exc:
        check_error(exc, len(data))
    try:
        image = open_image(pread, len(data))
    except ArchiveError as exc:
        check_error(exc, len(data))
        return type(exc).__name__
    read_image(image, rng, whole=True)
    return "served"


def strict_pread(data: bytes) -> Pread:
    """A pread over `data` that fails where os.pread on a file would, and on reads no archive needs.

    os.pread raises OSError for a negative offset or size (slicing would not), and allocates its whole
    `size` before reading: a read far larger than the archive means tarfuse trusted a size it read there.
    """
    limit = max(len(data), 4 * MIB)

    def pread(size: int, offset: int) -> bytes:
        if size < 0 or offset < 0:
            raise OSError(errno.EINVAL, f"pread({size}, {offset}): invalid argument")
        if size > limit:
            raise Problem(f"pread of {size} bytes from a {len(data)}-byte archive")
        return data[offset : offset + size]

    return pread


def check_error(exc: ArchiveError, archive_size: int) -> None:
    """An ArchiveError must say why, and where: an offset inside the archive (NoImage has none)."""
    if not (isinstance(exc.reason, str) and exc.reason):
        raise Problem(f"{type(exc).__name__} without a reason: {exc!r}")
    if exc.offset is None and not isinstance(exc, NoImage):
        raise Problem(f"{type(exc).__name__} without an offset: {exc}")
    if exc.offset is not None and not 0 <= exc.offset <= archive_size:
        raise Problem(f"{type(exc).__name__} offset {exc.offset} outside the archive: {exc}")


def read_image(image: Image, rng: random.Random, *, whole: bool) -> None:
    """Read the image (all of it, or windows of a large one) and check every read's length."""
    mapper, size = image.mapper, image.mapper.size
    try:
        for offset, length in read_windows(size, rng, whole=whole):
            got = len(mapper.read(offset, length))
            if got != max(0, min(length, size - offset)):
                raise Problem(f"read({offset}, {length}) of a {size}-byte image returned {got} bytes")
        offset = rng.randrange(size) if size else 0
        buffer = bytearray(min(64 * 1024, size - offset))
        done = mapper.read_into(memoryview(buffer), offset)
        if done != len(buffer) or buffer != mapper.read(offset, len(buffer)):
            raise Problem(f"read_into at {offset} disagrees with read")
    except ArchiveError as exc:
        raise Problem(f"the image opened, but reading it failed: {exc}") from exc


def read_windows(size: int, rng: random.Random, *, whole: bool) -> list[tuple[int, int]]:
    """Where to read an image of `size` bytes: all of it if small, else both ends and random windows."""
    if whole and size <= READ_WHOLE:
        return [(0, size + 1)]
    if not whole:
        return [(0, 4096), (max(0, size - 4096), 4097)]
    return [(0, WINDOW), (size - WINDOW, WINDOW + 1)] + [(rng.randrange(size), WINDOW) for _ in range(2)]


# ---- differential: GNU tar -------------------------------------------------------------------------------

# GNU tar succeeded, and extracted other bytes, or no file where tarfuse serves one: findings.
DIFFERS, NOT_EXTRACTED = "differs", "not-extracted"
INSPECT = ("tar-failed-tarfuse-served", "tar-failed-other-bytes", "absent")  # for a person to look at


def compare_with_gnu_tar(data: bytes, work: Path, rng: random.Random) -> tuple[str, str]:
    """Extract `data` with GNU tar into `work`; return a category and what tar or tarfuse said."""
    archive, out = work / "case.tar", work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    archive.write_bytes(data)
    command = ["tar", "-xf", str(archive), "-C", str(out), "--warning=none", "--no-same-owner"]
    try:
        result = subprocess.run(command, capture_output=True, timeout=TAR_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return "tar-timeout", ""
    tar_ok, said = result.returncode == 0, result.stderr.decode(errors="replace")[:2000]
    try:
        images = list_images(strict_pread(data), len(data))
    except ArchiveError as exc:
        return ("tar-lenient" if tar_ok else "both-refuse"), str(exc)
    if not images:
        return "no-image", ""
    for image in images:
        difference = compare_file(out / normalize_name(image.name), image, rng)
        if difference == "absent":
            category = NOT_EXTRACTED if tar_ok else "absent"
            return category, f"{image.name!r} served, but tar (exit {result.returncode}) made no file: {said}"
        if difference and tar_ok:
            return DIFFERS, f"{image.name!r}: {difference}"
        if difference:
            return "tar-failed-other-bytes", f"{image.name!r}: {difference}; tar said: {said}"
    if not tar_ok:
        return "tar-failed-tarfuse-served", said
    return "agree", ""


def compare_file(path: Path, image: Image, rng: random.Random) -> str | None:
    """How the extracted file at `path` differs from the served image, or None if it does not."""
    try:
        info = path.lstat()
    except OSError:
        return "absent"
    if not stat.S_ISREG(info.st_mode):
        return "absent"
    size = image.mapper.size
    if info.st_size != size:
        return f"size {info.st_size} extracted, {size} served"
    with path.open("rb") as f:
        for offset, length in _compare_windows(f.fileno(), image, rng):
            extracted = os.pread(f.fileno(), length, offset)
            if extracted != image.mapper.read(offset, length):
                return f"bytes differ in [{offset}, {offset + length})"
    return None


def _compare_windows(fd: int, image: Image, rng: random.Random) -> Iterator[tuple[int, int]]:
    size = image.mapper.size
    if size <= COMPARE_WHOLE:
        yield from ((offset, min(4 * MIB, size - offset)) for offset in range(0, size, 4 * MIB))
        return
    yield from read_windows(size, rng, whole=True)
    for offset, _ in image.mapper.plan(0, size)[:64]:  # served data and holes, at their starts
        if offset >= 0:
            yield offset, MIB
    with contextlib.suppress(OSError):  # where the extracted file has data (ENXIO past the last)
        data = 0
        for _ in range(64):
            data = os.lseek(fd, data, os.SEEK_DATA)
            yield data, MIB
            data = os.lseek(fd, data, os.SEEK_HOLE)
