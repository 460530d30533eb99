"""One fuzz case: make it, run it through tarfuse, and compare it with what GNU tar extracts.

The engine behind `make fuzz` (scripts/fuzz.py) and tests/test_fuzz.py; pool.py runs many cases in
worker processes. A case is a number: with the fuzz seed it decides the seed archive (seeds.py), the
mutations (mutate.py), whether the archive is compressed, and how, and whether it is read over HTTP
(packed.py), so any case can be made again from its number. A case passes when tarfuse lists and opens
the mutated archive and reads the image, or refuses it with an ArchiveError that has a reason and an offset
inside the archive; anything else tarfuse raises is a finding. A compressed or remote case is also mounted
the way the CLI mounts it (without FUSE), read before and after the background pass, and must serve what
the plain archive serves, or refuse. A few cases (HIGH_RATIO) are a high-ratio seed (ratio.py) instead:
compressed as it is, sometimes damaged, only mounted; the two that ask for more decoder memory than the
budget must be refused.
Compared with GNU tar, other bytes from a tar that succeeded are a finding; a tar that fails where tarfuse
serves is kept for a person to inspect; a tar more lenient than tarfuse is fine, and counted.
"""

import contextlib
import errno
import logging
import os
import random
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kit.fuzz import ratio
from kit.fuzz.mutate import Layout, Mutation, duplicate_image, mutate, sized_special, walk
from kit.fuzz.packed import SUFFIXES, Mount, Packing, choose_packing
from kit.fuzz.ratio import RatioSeed
from kit.fuzz.seeds import Seed
from tarfuse.errors import ArchiveError, CorruptCompressed, NoImage, TarfuseError
from tarfuse.image.open import Image, list_images, open_image
from tarfuse.tar.archive import ReadAt, normalize_name

MIB = 1 << 20
READ_WHOLE = 2 * MIB  # images up to this size are read whole; larger ones in windows
WINDOW = 256 * 1024
COMPARE_WHOLE = 64 * MIB  # extracted images up to this size are compared whole
TAR_TIMEOUT = 60.0
COMPRESSED = 0.15  # share of the cases that are compressed
REMOTE = 0.03  # share of the cases that are read over HTTP (compressed or not)
HIGH_RATIO = 0.005  # share of the cases made from a high-ratio seed (ratio.py), drawn apart from the rest
# Every DIFFERENTIAL_STRIDE-th case is one of these plans in turn: (the one mutation, or None for the usual
# chain; "plain", "compressed" or "either"): duplicate image names plain and compressed, sized link,
# device, directory, FIFO, contiguous and dumpdir headers, and ordinary mutations. With
# compare_every a multiple of the stride but not of five strides (200 by default), the cases compared with
# GNU tar go through all five plans in turn.
DIFFERENTIAL_STRIDE = 100
PLANS: tuple[tuple[Mutation | None, str], ...] = (
    (duplicate_image, "plain"),
    (duplicate_image, "compressed"),
    (sized_special, "either"),
    (None, "plain"),
    (None, "compressed"),
)


class Problem(Exception):
    """tarfuse did something wrong without raising: a bad error, a short read, wrong bytes."""


@dataclass(frozen=True, slots=True)
class Case:
    number: int
    seed: str  # the seed archive's name
    steps: tuple[str, ...]  # the mutations, in order, and the compression
    data: bytes  # the tar archive, before any compression
    packing: Packing | None = None
    remote: bool = False  # read over HTTP
    made: RatioSeed | None = None  # a high-ratio seed: `data` is empty, the archive is its bytes (damaged)
    damaged: bool = False  # the high-ratio seed's bytes were flipped or cut

    def archive(self) -> bytes:
        """The archive as tarfuse is given it: compressed, if the case is."""
        if self.made is not None:
            return self.data
        return self.data if self.packing is None else self.packing.pack(self.data)

    @property
    def mounted(self) -> bool:
        """Whether the case goes through a mount (Mount), not only through the plain archive in memory."""
        return self.packing is not None or self.remote or self.made is not None

    @property
    def sound(self) -> bool:
        """Whether the archive holds the case's tar: not a stream damaged on purpose."""
        return (self.packing is None or self.packing.damage is None) and not self.damaged

    @property
    def compression(self) -> str | None:
        if self.made is not None:
            return self.made.compression
        return None if self.packing is None else self.packing.compression

    @property
    def suffix(self) -> str:
        return ".tar" + ("" if self.compression is None else SUFFIXES[self.compression])


Check = Callable[[Case, random.Random], str]


class Corpus:
    """The seed archives and their structure; makes the mutated archive of any case number."""

    def __init__(self, seeds: list[Seed], high_ratio: list[RatioSeed] | None = None) -> None:
        """`high_ratio`: the high-ratio seeds (default: ratio.make_ratio_seeds(); [] for none)."""
        self.seeds = seeds
        self.high_ratio = ratio.make_ratio_seeds() if high_ratio is None else high_ratio
        self._layouts: list[Layout] = [walk(seed.data) for seed in seeds]

    def case(self, fuzz_seed: int, number: int) -> Case:
        if self.high_ratio and number % DIFFERENTIAL_STRIDE:  # drawn apart: the other cases stay as they were
            drawn = random.Random(f"{fuzz_seed}:{number}:ratio")
            if drawn.random() < HIGH_RATIO:
                return self._high_ratio_case(number, drawn)
        rng = random.Random(f"{fuzz_seed}:{number}")  # str seeds hash with SHA-512: same on every run
        i = rng.randrange(len(self.seeds))
        first, packed, planned = None, rng.random() < COMPRESSED, number % DIFFERENTIAL_STRIDE == 0
        if planned:
            first, how = PLANS[number // DIFFERENTIAL_STRIDE % len(PLANS)]
            packed = how == "compressed" or (how == "either" and rng.random() < 1 / 3)
        data, steps = mutate(self.seeds[i].data, self._layouts[i], rng, first)
        packing = choose_packing(rng, len(data), damage=not planned) if packed else None  # compared: sound
        remote = rng.random() < REMOTE
        steps += [f"compressed: {packing.describe()}"] if packing is not None else []
        steps += ["read over HTTP"] if remote else []
        return Case(number, self.seeds[i].name, tuple(steps), data, packing, remote)

    def _high_ratio_case(self, number: int, rng: random.Random) -> Case:
        seed = self.high_ratio[rng.randrange(len(self.high_ratio))]
        data, damage = ratio.damage(seed.data, rng)
        steps = (f"high-ratio {seed.compression}" + ("" if damage is None else f", {damage}"),)
        return Case(number, seed.name, steps, data, made=seed, damaged=damage is not None)


def quiet_logs() -> None:
    """Keep tarfuse's log lines (the background pass logs what it finds) out of the fuzzer's output."""
    logger = logging.getLogger("tarfuse")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False


# ---- one case -----------------------------------------------------------------------------------------


def check_archive(case: Case, rng: random.Random) -> str:
    """Check the case's tar, then its compressed archive if it has one; return what tarfuse made of it.

    Returns:
        "served" or the refusing error's class name, after "http" and the compression's name for a case
        that has them.

    Raises:
        Problem: an ArchiveError without reason or offset, an opened image that reads wrong, a compressed
            archive served otherwise than the same tar plain.
        Exception: anything but an ArchiveError from tarfuse propagates: it is what the fuzzer looks for.
    """
    if case.made is not None:
        outcome = check_mounted(case, None, rng)
        if case.made.refused and case.sound and not outcome.startswith(("CompressedArchive", "served, then")):
            raise Problem(f"{case.seed}: needs more decoder memory than the budget, yet {outcome}")
        return f"{case.made.compression} {outcome}"
    outcome, image = check_plain(case.data, rng)
    if not case.mounted:
        return outcome
    how = ["http"] if case.remote else []
    how += [case.packing.compression] if case.packing is not None else []
    return f"{' '.join(how)} {check_mounted(case, image, rng)}"


def check_plain(data: bytes, rng: random.Random) -> tuple[str, Image | None]:
    """List and open a plain archive, read its images; return the outcome and the image opened."""
    read_at = strict_read_at(data)
    try:
        for image in list_images(read_at, len(data)):
            read_image(image, rng, whole=False)
    except ArchiveError as exc:
        check_error(exc, len(data))
    try:
        image = open_image(read_at, len(data))
    except ArchiveError as exc:
        check_error(exc, len(data))
        return type(exc).__name__, None
    read_image(image, rng, whole=True)
    return "served", image


def check_mounted(case: Case, plain: Image | None, rng: random.Random) -> str:
    """Mount the archive as the CLI does; read it before and after the background pass.

    A sound archive (not damaged on purpose) must serve what the plain tar serves (`plain`, open_image's
    choice among all headers): from the same member the same bytes; from an earlier member of the same name
    (the compressed path opens the first before the later ones are decompressed) other bytes only until the
    pass has seen the later one. After the pass, reads may fail (EIO) with a message: never other bytes.
    """
    try:
        mount = Mount(case.archive(), case.remote)
    except ArchiveError as exc:
        check_error(exc, len(case.data) if case.sound and case.made is None else None)
        if case.sound and isinstance(exc, CorruptCompressed):
            raise Problem(f"a sound stream was refused as corrupt: {exc}") from None
        return type(exc).__name__
    with mount:
        windows = read_windows(mount.image.mapper.size, rng, whole=True)
        before = read_mount(mount, windows)
        mount.run_pass()
        after = read_mount(mount, windows)
    if case.sound and plain is not None:
        cross_check(plain, mount.image, windows, before, after)
    if isinstance(after, TarfuseError):
        return "served, then refused"
    return "served" if isinstance(before, list) else "served only after the pass"


def read_mount(mount: Mount, windows: list[tuple[int, int]]) -> list[bytes] | TarfuseError:
    """Read the mounted image at `windows`: the bytes, or the error that failed a read (EIO on a mount)."""
    size, got = mount.image.mapper.size, []
    try:
        for offset, length in windows:
            data = mount.read(offset, length)
            if len(data) != max(0, min(length, size - offset)):
                raise Problem(f"read({offset}, {length}) of a {size}-byte image returned {len(data)} bytes")
            got.append(data)
    except TarfuseError as exc:
        if not str(exc).strip():
            raise Problem(f"a read failed with no message: {exc!r}") from exc
        return exc
    return got


def cross_check(
    plain: Image,
    served: Image,
    windows: list[tuple[int, int]],
    before: list[bytes] | TarfuseError,
    after: list[bytes] | TarfuseError,
) -> None:
    """Raise Problem if the mount of the compressed archive serves other bytes than the plain archive."""
    try:
        expected = [plain.mapper.read(offset, length) for offset, length in windows]
    except ArchiveError:
        return  # the plain image does not read either: check_plain said so if it mattered
    where = f"{served.name!r} (member at {served.member.header_offset})"
    if served.member.header_offset == plain.member.header_offset:
        if isinstance(before, TarfuseError):
            raise Problem(f"{where}: the plain archive reads, the compressed one fails: {before}")
        for when, got in (("before", before), ("after", after)):  # refused after the pass: safe
            if isinstance(got, list) and got != expected:
                raise Problem(f"{where}: other bytes than from the plain archive, {when} the background pass")
        return
    same_name = normalize_name(served.name) == normalize_name(plain.name)
    if same_name and isinstance(after, list) and after != expected:
        raise Problem(
            f"{where}: the plain archive (as tar -x) serves the member of that name at "
            f"{plain.member.header_offset}; after the background pass, the compressed one still "
            "serves other bytes"
        )


def strict_read_at(data: bytes) -> ReadAt:
    """A read_at over `data` that fails where os.pread on a file would, and on reads no archive needs.

    os.pread raises OSError for a negative offset or size (slicing would not), and allocates its whole
    `size` before reading: a read far larger than the archive means tarfuse trusted a size it read there.
    """
    limit = max(len(data), 4 * MIB)

    def read_at(offset: int, size: int) -> bytes:
        if size < 0 or offset < 0:
            raise OSError(errno.EINVAL, f"read_at({offset}, {size}): invalid argument")
        if size > limit:
            raise Problem(f"read_at of {size} bytes from a {len(data)}-byte archive")
        return data[offset : offset + size]

    return read_at


def check_error(exc: ArchiveError, archive_size: int | None) -> None:
    """An ArchiveError must say why, and where: an offset inside the archive (NoImage has none).

    `archive_size` None: the size is not known (a damaged stream decompresses to what it does).
    """
    if not (isinstance(exc.reason, str) and exc.reason):
        raise Problem(f"{type(exc).__name__} without a reason: {exc!r}")
    if exc.offset is None and not isinstance(exc, NoImage):
        raise Problem(f"{type(exc).__name__} without an offset: {exc}")
    outside = archive_size is not None and exc.offset is not None and exc.offset > archive_size
    if outside or (exc.offset is not None and exc.offset < 0):
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
INSPECT = (  # for a person to look at
    "tar-failed-tarfuse-served",
    "tar-failed-other-bytes",
    "absent",
    "refused-before-pass",
)
Read = Callable[[int, int], bytes]


def compare_with_gnu_tar(case: Case, work: Path, rng: random.Random) -> tuple[str, str]:
    """Extract the case's tar with GNU tar into `work`; return a category and what tar or tarfuse said.

    A plain case: every image tarfuse lists. A compressed or remote one: what its mount serves, before and
    after the background pass (mount_categories).
    """
    if case.made is not None:
        return "high-ratio", ""  # no tar to give GNU tar: it would be the hundreds of MiB the seed avoids
    archive, out = work / "case.tar", work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    archive.write_bytes(case.data)  # GNU tar's reading does not depend on the compression
    command = ["tar", "-xf", str(archive), "-C", str(out), "--warning=none", "--no-same-owner"]
    try:
        result = subprocess.run(command, capture_output=True, timeout=TAR_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return "tar-timeout", ""
    tar = Tar(out, result.returncode, result.stderr.decode(errors="replace")[:2000])
    if not case.mounted:
        return compare_plain(case.data, tar, rng)
    if not case.sound:
        return "damaged-stream", ""  # tar extracted the sound tar: nothing to compare with
    return compare_mount(case, tar, rng)


@dataclass(frozen=True, slots=True)
class Tar:
    """What GNU tar extracted (into `out`), and how it ended."""

    out: Path
    status: int
    said: str

    @property
    def ok(self) -> bool:
        return self.status == 0

    def absent(self, name: str) -> tuple[str, str]:
        category = NOT_EXTRACTED if self.ok else "absent"
        return category, f"{name!r} served, but tar (exit {self.status}) made no file: {self.said}"

    def differs(self, name: str, difference: str) -> tuple[str, str]:
        if self.ok:
            return DIFFERS, f"{name!r}: {difference}"
        return "tar-failed-other-bytes", f"{name!r}: {difference}; tar said: {self.said}"


def compare_plain(data: bytes, tar: Tar, rng: random.Random) -> tuple[str, str]:
    """Compare every image tarfuse lists in the plain archive `data` with the file tar extracted."""
    try:
        images = list_images(strict_read_at(data), len(data))
    except ArchiveError as exc:
        return ("tar-lenient" if tar.ok else "both-refuse"), str(exc)
    if not images:
        return "no-image", ""
    for image in images:
        difference = compare_file(tar.out / normalize_name(image.name), image.mapper.read, image, rng)
        if difference == "absent":
            return tar.absent(image.name)
        if difference:
            return tar.differs(image.name, difference)
    if not tar.ok:
        return "tar-failed-tarfuse-served", tar.said
    return "agree", ""


def compare_mount(case: Case, tar: Tar, rng: random.Random) -> tuple[str, str]:
    """Compare what a mount of the case's archive serves with the file tar extracted.

    Read before the background pass and after it: other bytes at either time are a finding, except
    before the pass when reads fail after it (a mount that finds, say, a later member of the same name
    must not go on serving the first: EIO with a message, until it is mounted again, is right).
    """
    try:
        mount = Mount(case.archive(), case.remote)
    except ArchiveError as exc:
        return ("tar-lenient" if tar.ok else "both-refuse"), str(exc)
    with mount:
        path = tar.out / normalize_name(mount.image.name)
        before = _served_difference(path, mount, rng)
        mount.run_pass()
        after = _served_difference(path, mount, rng)
    return mount_categories(mount.image.name, tar, before, after)


def mount_categories(name: str, tar: Tar, before: tuple[str, str], after: tuple[str, str]) -> tuple[str, str]:
    """The category of a mount's reads before and after the background pass: ("same"|"absent"|"refused"|
    "differs", detail) each."""
    (first, first_detail), (then, then_detail) = before, after
    if "absent" in (first, then):
        return tar.absent(name)
    if then == "differs":
        return tar.differs(name, f"after the background pass: {then_detail}")
    if then == "refused":
        if first == "differs":
            return "served-then-refused", f"{name!r}: {first_detail}, then refused: {then_detail}"
        return ("refused-after-pass" if first == "same" else "refused"), then_detail
    if first == "differs":
        return tar.differs(name, f"before the background pass: {first_detail} (right after it)")
    if first == "refused":
        return "refused-before-pass", f"{name!r}: {first_detail}"
    return ("agree", "") if tar.ok else ("tar-failed-tarfuse-served", tar.said)


def _served_difference(path: Path, mount: Mount, rng: random.Random) -> tuple[str, str]:
    try:
        difference = compare_file(path, mount.read, mount.image, rng)
    except TarfuseError as exc:  # EIO on a mount: fine, if it says why
        if not str(exc).strip():
            raise Problem(f"a read failed with no message: {exc!r}") from exc
        return "refused", str(exc)
    if difference is None:
        return "same", ""
    return ("absent", "") if difference == "absent" else ("differs", difference)


def compare_file(path: Path, read: Read, image: Image, rng: random.Random) -> str | None:
    """How the extracted file at `path` differs from the image served through `read`, or None."""
    try:
        info = path.lstat()
    except OSError:
        return "absent"
    if not stat.S_ISREG(info.st_mode):
        return "absent"
    size = image.mapper.size
    read(0, 4096)  # before the sizes are compared: a file that fails its reads (EIO) fails here
    if info.st_size != size:
        return f"size {info.st_size} extracted, {size} served"
    with path.open("rb") as f:
        for offset, length in _compare_windows(f.fileno(), image, rng):
            extracted = os.pread(f.fileno(), length, offset)
            if extracted != read(offset, length):
                return f"bytes differ in [{offset}, {offset + length})"
    return None


def _compare_windows(fd: int, image: Image, rng: random.Random) -> Iterator[tuple[int, int]]:
    size = image.mapper.size
    if size <= COMPARE_WHOLE:
        yield from ((offset, min(4 * MIB, size - offset)) for offset in range(0, size, 4 * MIB))
        return
    yield from read_windows(size, rng, whole=True)
    logical = 0
    for _, length in image.mapper.plan(0, size)[:64]:  # served data and holes, at their starts
        yield logical, MIB
        logical += length
    with contextlib.suppress(OSError):  # where the extracted file has data (ENXIO past the last)
        data = 0
        for _ in range(64):
            data = os.lseek(fd, data, os.SEEK_DATA)
            yield data, MIB
            data = os.lseek(fd, data, os.SEEK_HOLE)
