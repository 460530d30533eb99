"""Compressed archives over HTTP: decoders reading through a RemoteArchive, the seek index in the cache.

In-process first (CompressedSource over a RemoteArchive, no FUSE), then real mounts of URLs served by
tests/kit/httpserver.py on 127.0.0.1.
"""

import io
import os
import random
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
import pyzstd
from kit.archives import gce_tarball
from kit.httpserver import RangeServer
from kit.mounts import MountFactory, status_kib, tarfuse_command
from kit.sample import SampleImage

from tarfuse import passes
from tarfuse.sources import index
from tarfuse.sources.blockcache import BLOCK_SIZE
from tarfuse.sources.compressed import CompressedSource, decompressed
from tarfuse.sources.decoders import GZIP_REMOTE_CHUNK_SIZE
from tarfuse.sources.http.archive import COMPRESSED_LEAST_FETCH, PROBE, RemoteArchive

pytestmark = pytest.mark.usefixtures("no_proxy_from_outside", "private_cache")


MiB = 1 << 20


def random_tar(size: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        data = random.Random(size).randbytes(size)
        info = tarfile.TarInfo("disk.raw")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def compress(plain: bytes, command: list[str]) -> bytes:
    return subprocess.run(command, input=plain, capture_output=True, check=True).stdout


def zstd_layout(plain: bytes, layout: str) -> bytes:
    """One frame (`zstd`), pzstd's frames (each after a skippable frame holding its size), or the seekable
    format (frames, then a seek table), as pyzstd writes it with 1 MiB frames."""
    if layout == "seekable":
        out = io.BytesIO()
        with pyzstd.SeekableZstdFile(out, "w", max_frame_content_size=MiB) as sink:
            sink.write(plain)
        return out.getvalue()
    return compress(
        plain, {"one-frame": ["zstd", "-q", "-c"], "pzstd": ["pzstd", "-q", "-p", "2", "-c"]}[layout]
    )


ZSTD_LAYOUTS = ["one-frame", "pzstd", "seekable"]


def saved_indexes(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "tarfuse").glob("*.tarfuse-index"))


def wait_for_index(tmp_path: Path, count: int = 1) -> list[Path]:
    deadline = time.monotonic() + 30
    while len(saved_indexes(tmp_path)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return saved_indexes(tmp_path)


def index_on_first_mount(mount: MountFactory, url: str, served: Path, tmp_path: Path) -> None:
    """Mount `url` until its background pass has saved the index, then unmount."""
    first = mount(url, served)
    assert len(wait_for_index(tmp_path)) == 1, first.stderr_text()
    first.unmount()


# --- in-process --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["gzip", "-1", "-c"], ["bzip2", "-1", "-c"], ["xz", "-0", "-c"]], ids=["gzip", "bzip2", "xz"]
)
def test_remote_decompressed_reads_match_the_tar(server: RangeServer, command: list[str]) -> None:
    plain = random_tar(3 * MiB)
    check_random_reads(RemoteArchive(server.put("a", compress(plain, command))), plain, seed=3)


@pytest.mark.parametrize("layout", ZSTD_LAYOUTS)
def test_remote_tar_zst_reads_match_the_tar(server: RangeServer, layout: str) -> None:
    plain = random_tar(3 * MiB)
    check_random_reads(RemoteArchive(server.put("a.tar.zst", zstd_layout(plain, layout))), plain, seed=4)


def check_random_reads(archive: RemoteArchive, plain: bytes, seed: int) -> None:
    """Reads at random places of the decompressed view of `archive` give the bytes of `plain`."""
    source = decompressed(archive)
    assert isinstance(source, CompressedSource)
    with source:
        rng = random.Random(seed)
        for _ in range(20):
            offset, size = rng.randrange(len(plain)), rng.choice([512, 4096, 300_000])
            assert source.read_at(offset, size) == plain[offset : offset + size]


@pytest.mark.parametrize("layout", ZSTD_LAYOUTS)
def test_reading_the_first_mib_of_a_remote_tar_zst_fetches_little(server: RangeServer, layout: str) -> None:
    plain = random_tar(40 * MiB)  # random: compressed as large as the tar
    archive = zstd_layout(plain, layout)
    with (
        RemoteArchive(server.put("big.tar.zst", archive)) as remote,
        CompressedSource(remote, "zstd") as source,
    ):
        assert source.size_known == (layout == "seekable")  # the seek table, one read at the end
        assert source.read_at(512, MiB) == plain[512 : 512 + MiB]
    assert server.bytes_served < 6 * MiB, f"{server.bytes_served} of {len(archive)} bytes fetched"


def test_a_remote_one_frame_tar_zst_is_served_from_its_spill_after_the_pass(server: RangeServer) -> None:
    plain = random_tar(6 * MiB)
    url = server.put("a.tar.zst", zstd_layout(plain, "one-frame"))
    with RemoteArchive(url) as remote, CompressedSource(remote, "zstd") as source:
        where = index.default_path(url, source.identity(), beside=False)
        passes.IndexingPass(source, "disk.raw", where).run(threading.Event())
        assert source.spill == index.spill_path(where)
        server.reset_counters()
        rng = random.Random(5)
        for _ in range(20):
            offset = rng.randrange(len(plain))
            assert source.read_at(offset, 4096) == plain[offset : offset + 4096]
        assert server.bytes_served == 0  # every read came from the spill in the cache directory


def test_a_remote_index_is_keyed_by_url_size_and_validators(server: RangeServer) -> None:
    url = server.put("a.tar.gz", compress(random_tar(MiB), ["gzip", "-c"]))
    with RemoteArchive(url + "?token=secret") as source:
        assert source.identity() == [url, source.size, '"v1"', "Tue, 14 Nov 2023 22:13:21 GMT"]


# --- real mounts -------------------------------------------------------------------------------------


@pytest.mark.fuse
def test_a_remote_tar_gz_serves_the_original_bytes_and_indexes_in_the_cache(
    server: RangeServer, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    url = server.put("image.tar.gz", gce_tarball(sample_image, tmp_path / "image.tar.gz").read_bytes())
    (served := tmp_path / "mnt").mkdir()
    live = mount(url, served)
    assert (served / "disk.raw").read_bytes() == sample_image.data
    assert len(wait_for_index(tmp_path)) == 1, live.stderr_text()


@pytest.mark.fuse
def test_the_second_mount_of_a_remote_tar_gz_fetches_only_what_is_read(
    server: RangeServer, mount: MountFactory, tmp_path: Path
) -> None:
    # With the index saved, mounting decompresses the checkpoint span holding the tar header and the last
    # one (every header is read, as tar -x does): the first request, then a cold fetch of at least
    # COMPRESSED_LEAST_FETCH at each (one more block for a read that starts inside one). A small read, the
    # 1 MiB cache chunk around it, which lies in at most two spans of GZIP_REMOTE_CHUNK_SIZE compressed
    # bytes (random data does not compress). The block cache's readahead adds at most half the run it
    # follows; FADV_RANDOM keeps the kernel's out.
    plain = random_tar(40 * MiB)
    archive = compress(plain, ["gzip", "-1", "-c"])
    url = server.put("big.tar.gz", archive)
    (served := tmp_path / "mnt").mkdir()
    index_on_first_mount(mount, url, served, tmp_path)
    server.reset_counters()
    second = mount(url, served)
    at_mount = server.bytes_served
    fd = os.open(served / "disk.raw", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        offset = 512 + 20 * MiB  # the image's data starts after the member's header
        assert os.pread(fd, 65536, 20 * MiB) == plain[offset : offset + 65536]
    finally:
        os.close(fd)
    read = server.bytes_served - at_mount
    assert "loaded index" in second.stderr_text()
    assert at_mount <= PROBE + 2 * (COMPRESSED_LEAST_FETCH + BLOCK_SIZE), f"{at_mount} bytes fetched to mount"
    assert read <= 3 * GZIP_REMOTE_CHUNK_SIZE, f"{read} bytes fetched to read 64 KiB"


@pytest.mark.fuse
def test_a_changed_remote_object_does_not_use_the_old_index(
    server: RangeServer, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    data = gce_tarball(sample_image, tmp_path / "image.tar.gz").read_bytes()
    url = server.put("image.tar.gz", data)
    (served := tmp_path / "mnt").mkdir()
    index_on_first_mount(mount, url, served, tmp_path)
    server.put("image.tar.gz", data)  # a new version: another ETag and Last-Modified
    second = mount(url, served)
    assert (served / "disk.raw").read_bytes() == sample_image.data
    assert len(wait_for_index(tmp_path, 2)) == 2, second.stderr_text()
    assert "loaded index" not in second.stderr_text()


def test_list_of_a_remote_tar_gz(server: RangeServer, sample_image: SampleImage, tmp_path: Path) -> None:
    url = server.put("image.tar.gz", gce_tarball(sample_image, tmp_path / "image.tar.gz").read_bytes())
    result = subprocess.run(tarfuse_command("--list", url), capture_output=True, text=True, check=True)
    assert "gzip-compressed, index: none" in result.stdout
    assert "disk.raw" in result.stdout


def test_list_of_a_remote_tar_zst(server: RangeServer) -> None:
    url = server.put("image.tar.zst", compress(random_tar(MiB), ["zstd", "-q", "-c"]))
    result = subprocess.run(tarfuse_command("--list", url), capture_output=True, text=True, check=True)
    assert "zstd-compressed, index: none" in result.stdout
    assert "disk.raw" in result.stdout


@pytest.mark.fuse
@pytest.mark.parametrize("layout", ZSTD_LAYOUTS)
def test_a_remote_tar_zst_mounts_and_serves_the_original_bytes(
    server: RangeServer, sample_image: SampleImage, mount: MountFactory, tmp_path: Path, layout: str
) -> None:
    subprocess.run(
        ["tar", "--format=oldgnu", "-Scf", str(plain := tmp_path / "image.tar"), "-C",
         str(sample_image.path.parent), "disk.raw"],
        check=True,
    )  # fmt: skip
    url = server.put("image.tar.zst", zstd_layout(plain.read_bytes(), layout))
    (served := tmp_path / "mnt").mkdir()
    mount(url, served)
    assert (served / "disk.raw").read_bytes() == sample_image.data


@pytest.mark.fuse
def test_the_first_mount_of_a_remote_seekable_tar_zst_fetches_only_what_is_read(
    server: RangeServer, mount: MountFactory, tmp_path: Path
) -> None:
    # The seek table gives every frame: no pass, and a read fetches its frames (plus readahead) only.
    archive = zstd_layout(random_tar(40 * MiB), "seekable")
    url = server.put("big.tar.zst", archive)
    (served := tmp_path / "mnt").mkdir()
    live = mount(url, served)
    with (served / "disk.raw").open("rb") as image:
        assert image.read(MiB) == random.Random(40 * MiB).randbytes(MiB)
    assert "indexing" not in live.stderr_text()
    assert server.bytes_served < len(archive) // 4, f"{server.bytes_served} of {len(archive)} bytes fetched"


@pytest.mark.fuse
def test_a_live_mount_of_a_remote_tar_gz_stays_under_the_memory_ceiling(
    server: RangeServer, mount: MountFactory, tmp_path: Path
) -> None:
    """The memory ceiling (256 MiB at any point of a mount's life) over http(s), where the block cache
    and the chunk cache share one budget: read whole while the pass runs, at random, then whole again."""
    plain = random_tar(96 * MiB)
    url = server.put("big.tar.gz", compress(plain, ["gzip", "-1", "-c"]))
    (served := tmp_path / "mnt").mkdir()
    daemon = mount(url, served)
    rng = random.Random(11)
    with (served / "disk.raw").open("rb", buffering=0) as reader:
        while reader.read(MiB):
            pass
        for _ in range(500):
            reader.seek(rng.randrange(0, 95 * MiB))
            reader.read(1 << 16)
        os.posix_fadvise(reader.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        reader.seek(0)
        assert reader.read(MiB) == plain[512 : 512 + MiB]
        while reader.read(MiB):
            pass
    peak = status_kib(daemon.process.pid, "VmHWM")
    assert peak < 256 * 1024, f"peak RSS {peak // 1024} MiB"
