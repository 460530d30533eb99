"""The 256 MiB ceiling holds for compressed streams that decompress to far more than they are: a live mount
of zeros in each compression, read whole then at random, stays under it; a stream whose window or
dictionary would not fit the decoder budget (-o decoder_memory) is refused with one line that names it.

The archives are made from one compressed piece repeated (gzip members, zstd frames, xz and bzip2 streams
may follow one another), so a 512 MiB image costs a few MB and well under a second to make.
"""

import concurrent.futures
import functools
import gc
import io
import lzma
import os
import random
import subprocess
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import pyzstd
from kit.fuzz import engine, pool, ratio
from kit.fuzz.engine import Case
from kit.fuzz.ratio import make_ratio_seeds
from kit.fuzz.seeds import Seed
from kit.mounts import MountFactory, status_kib, tarfuse_command

from tarfuse.sources.compressed import decompressed
from tarfuse.sources.file import ArchiveFile

pytestmark = pytest.mark.fuse

MEMORY_CEILING_KIB = 256 * 1024
PIECE = 32 << 20  # zeros compressed once, repeated
IMAGE_SIZE = 16 * PIECE  # 512 MiB of zeros: more than rapidgzip's 2 MiB chunks held, before the budget


# xz -9 here, not the fuzzer's -6: a 64 MiB dictionary for the decoder to hold under the ceiling
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gz": ratio.COMPRESS["gzip"],
    "zst": ratio.COMPRESS["zstd"],
    "xz": functools.partial(ratio.xz, preset=9),
    "bz2": ratio.COMPRESS["bzip2"],
}


@functools.cache
def _zeros(suffix: str) -> bytes:
    return COMPRESSORS[suffix](bytes(PIECE))


def zeros_tar(path: Path, suffix: str) -> Path:
    """A tar of one zero-filled image, IMAGE_SIZE bytes, compressed in pieces: header, zeros, end blocks."""
    compress = COMPRESSORS[suffix]
    with path.open("wb") as out:
        out.write(compress(ratio.header(IMAGE_SIZE, "disk.img")))
        for _ in range(IMAGE_SIZE // PIECE):
            out.write(_zeros(suffix))
        out.write(compress(bytes(1024)))
    return path


def read_whole_then_at_random(image: Path) -> None:
    """Read the served image whole, then 300 random 64 KiB pieces; every byte must be zero."""
    rng = random.Random(3)
    with image.open("rb", buffering=0) as reader:
        while data := reader.read(1 << 20):
            assert not any(data[::4096]), "a served zero-filled image has data"
        size = image.stat().st_size
        assert size == IMAGE_SIZE
        for _ in range(300):
            reader.seek(rng.randrange(0, size - (1 << 16)))
            assert reader.read(1 << 16) == bytes(1 << 16)


@pytest.mark.parametrize("suffix", ["gz", "zst", "xz", "bz2"])
def test_a_mount_of_zeros_stays_under_the_ceiling(mount: MountFactory, tmp_path: Path, suffix: str) -> None:
    archive = zeros_tar(tmp_path / f"zeros.tar.{suffix}", suffix)
    (served := tmp_path / "mnt").mkdir()
    daemon = mount(archive, served)
    read_whole_then_at_random(served / "disk.img")
    peak = status_kib(daemon.process.pid, "VmHWM")
    assert peak < MEMORY_CEILING_KIB, f"peak RSS {peak // 1024} MiB"


def _refusal(archive: Path, mountpoint: Path, *options: str) -> str:
    """Mount `archive`, which must be refused: the one line it says (a mount made instead is undone)."""
    mountpoint.mkdir(exist_ok=True)
    try:
        result = subprocess.run(
            tarfuse_command(archive, mountpoint, *options),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", mountpoint], check=False)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_zstd_window_past_the_budget_is_refused_with_one_line(mount: MountFactory, tmp_path: Path) -> None:
    (archive := tmp_path / "long.tar.zst").write_bytes(ratio.long_window_zstd("disk.img"))
    line = _refusal(archive, tmp_path / "mnt")
    assert "128 MiB" in line, line
    assert "-o decoder_memory=SIZE" in line, line
    (served := tmp_path / "raised").mkdir()
    mount(archive, served, "-o", "decoder_memory=320M")  # the option that the line names serves it
    assert (served / "disk.img").read_bytes() == bytes(range(256)) * 4096


def test_an_xz_dictionary_past_the_budget_is_refused_with_one_line(tmp_path: Path) -> None:
    (archive := tmp_path / "huge-dictionary.tar.xz").write_bytes(ratio.patched_dictionary_xz("disk.img"))
    line = _refusal(archive, tmp_path / "mnt")
    assert "xz block" in line, line
    assert "-o decoder_memory=SIZE" in line, line


def test_decoder_memory_is_a_size(tmp_path: Path) -> None:
    result = subprocess.run(
        tarfuse_command(tmp_path / "x.tar", tmp_path, "-o", "decoder_memory=lots"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "option decoder_memory='lots': use bytes or a K, M or G suffix" in result.stderr, result.stderr


class _RatioSeedsOnly(engine.Corpus):
    """Case N is the fuzzer's high-ratio seed N, intact."""

    def case(self, fuzz_seed: int, number: int) -> Case:
        seed = self.high_ratio[number]
        return Case(number, seed.name, (), seed.data, made=seed)


def test_the_fuzzers_high_ratio_seeds_are_served_or_refused_under_the_ceiling() -> None:
    """Every high-ratio seed of the fuzzer (kit/fuzz/ratio.py), mounted in fuzz workers: served, or
    refused where it asks for more decoder memory than the budget, the peak RSS under 256 MiB."""
    seeds = make_ratio_seeds()
    corpus = _RatioSeedsOnly([Seed("tiny", ratio.header(0, "disk.img") + bytes(1024))], high_ratio=seeds)
    summary = pool.run(corpus, pool.Config(cases=len(seeds), jobs=2, compare_every=0, batch=1))
    assert not summary.findings, "\n\n".join(f"{f.headline()}\n{f.detail}" for f in summary.findings)
    outcomes = summary.outcomes
    refused = sum(n for outcome, n in summary.outcomes.items() if outcome.endswith(" CompressedArchive"))
    served = sum(n for outcome, n in summary.outcomes.items() if outcome.endswith(" served"))
    assert refused == sum(seed.refused for seed in seeds), outcomes
    assert served == len(seeds) - refused, outcomes
    assert summary.memory.peak < MEMORY_CEILING_KIB * 1024, summary.memory


MEMBER_PIECE = 64 << 20  # one frame of zeros that fills a 64 MiB window: fits one decoder's default share
MEMBERS = 4


@functools.cache
def _window_filling_zstd() -> bytes:
    """64 MiB of zeros in one zstd frame whose window is 64 MiB (what `--ultra -20` asks for)."""
    options = {pyzstd.CParameter.compressionLevel: 3, pyzstd.CParameter.windowLog: 26}
    return pyzstd.compress(bytes(MEMBER_PIECE), options)


def compressed_members_tar(path: Path) -> Path:
    """A plain tar of MEMBERS zero-filled images, each disk<N>.raw.zst of two 64 MiB-window frames."""
    member = _window_filling_zstd() * 2
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for number in range(1, MEMBERS + 1):
            info = tarfile.TarInfo(f"disk{number}.raw.zst")
            info.size, info.mtime = len(member), 1_700_000_000
            tar.addfile(info, io.BytesIO(member))
    return path


def test_compressed_members_share_one_decoder_budget(mount: MountFactory, tmp_path: Path) -> None:
    """Each compressed member served on a directory mount point gets -o decoder_memory divided by their
    number, not half of it each (four 64 MiB windows, each kept by its member's decoder: ~300 MiB): four
    members that each need a 64 MiB window are refused at the default budget with the one line, and served
    where the budget is raised to hold them all."""
    archive = compressed_members_tar(tmp_path / "disks.tar")
    line = _refusal(archive, tmp_path / "mnt")
    assert "64 MiB" in line, line
    assert "-o decoder_memory=SIZE" in line, line
    (served := tmp_path / "raised").mkdir()
    mount(archive, served, "-o", f"decoder_memory={MEMBERS * 2 * 64 + 16}M")
    for number in range(1, MEMBERS + 1):
        with (served / f"disk{number}.raw").open("rb", buffering=0) as reader:
            reader.seek(2 * MEMBER_PIECE - (1 << 20))
            assert reader.read() == bytes(1 << 20)


GZIP_MEMBERS = 8
GZIP_PIECES = 6  # of 4 MiB each, per member


def gzip_members_tar(path: Path) -> Path:
    """A plain tar of GZIP_MEMBERS images, disk<N>.raw.gz, of data that compresses 1.3:1 like a real disk's
    (random bytes of 64 values: no high ratio for rapidgzip's small chunks), one gzip piece repeated."""
    rng = random.Random(1)
    piece = rng.randbytes(4 << 20).translate(bytes(value % 64 for value in range(256)))
    member = zlib.compress(piece, 1, 31) * GZIP_PIECES
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for number in range(GZIP_MEMBERS):
            info = tarfile.TarInfo(f"disk{number}.raw.gz")
            info.size, info.mtime = len(member), 1_700_000_000
            tar.addfile(info, io.BytesIO(member))
    return path


def test_gzip_members_read_at_once_stay_under_the_ceiling(mount: MountFactory, tmp_path: Path) -> None:
    """rapidgzip's memory grows with its chunk, not with a window: each gzip member's decoders take a chunk
    in proportion to their share of the budget (eight members read at once held ~290 MiB with 2 MiB
    chunks each)."""
    archive = gzip_members_tar(tmp_path / "disks.tar")
    (served := tmp_path / "mnt").mkdir()
    # Each member is decompressed whole for its size before the mount is live: seconds, more when the
    # CPUs are shared (a fresh-clone run beside other work took over 10 s).
    daemon = mount(archive, served, timeout=120)

    def read_whole(number: int) -> None:
        with (served / f"disk{number}.raw").open("rb", buffering=0) as reader:
            while reader.read(1 << 20):
                pass

    with concurrent.futures.ThreadPoolExecutor(GZIP_MEMBERS) as readers:
        list(readers.map(read_whole, range(GZIP_MEMBERS)))
    assert (served / "disk0.raw").stat().st_size == GZIP_PIECES << 22
    peak = status_kib(daemon.process.pid, "VmHWM")
    assert peak < MEMORY_CEILING_KIB, f"peak RSS {peak // 1024} MiB"


def test_closed_xz_sources_leave_no_dictionary_behind(tmp_path: Path) -> None:
    """A mount opens decoder after decoder (the fuzzer's workers, a daemon that seeks back): python-xz's
    objects refer to one another, so each closed one kept its dictionary until the cyclic collector ran.
    Twenty sources opened, read and closed must not hold twenty dictionaries (8 MiB each, at xz -6)."""
    archive = tmp_path / "zeros.tar.xz"
    archive.write_bytes(
        lzma.compress(ratio.header(32 << 20, "disk.img") + bytes(32 << 20) + bytes(1024), preset=6)
    )
    resident_mib = [0] * 20
    gc.disable()  # the collector must not run by chance: what is freed, close() freed
    try:
        for round_ in range(len(resident_mib)):
            source = decompressed(ArchiveFile(str(archive)))
            assert source.read_at(512 + (30 << 20), 4096) == bytes(4096)
            source.close()
            resident_mib[round_] = status_kib(os.getpid(), "VmRSS") // 1024
    finally:
        gc.enable()
    assert resident_mib[-1] - resident_mib[2] < 32, resident_mib
