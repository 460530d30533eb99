"""Compressed archives over HTTP: decoders reading through remote.RemoteArchive, the seek index in the cache.

In-process first (CompressedSource over a RemoteArchive, no FUSE), then real mounts of URLs served by
tests/httpserver.py on 127.0.0.1.
"""

import io
import random
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MountFactory, SampleImage, tarfuse_command
from httpserver import RangeServer, serve

from tarfuse.compressed import CompressedSource, decompressed
from tarfuse.errors import CompressedArchive
from tarfuse.remote import RemoteArchive

MiB = 1 << 20
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def _local_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxy between the tests and 127.0.0.1; the index cache in the test's own directory."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def server() -> Iterator[RangeServer]:
    with serve() as running:
        yield running


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


def gce_tarball(sample_image: SampleImage, out: Path) -> Path:
    """`tar --format=oldgnu -Sczf image.tar.gz disk.raw`, the way GCE images are made."""
    subprocess.run(
        ["tar", "--format=oldgnu", "-Sczf", str(out), "-C", str(sample_image.path.parent), "disk.raw"],
        check=True,
    )
    return out


def saved_indexes(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "tarfuse").glob("*.tarfuse-index"))


def wait_for_index(tmp_path: Path, count: int = 1) -> list[Path]:
    deadline = time.monotonic() + 30
    while len(saved_indexes(tmp_path)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return saved_indexes(tmp_path)


# --- in-process --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["gzip", "-1", "-c"], ["bzip2", "-1", "-c"], ["xz", "-0", "-c"]], ids=["gzip", "bzip2", "xz"]
)
def test_remote_decompressed_reads_match_the_tar(server: RangeServer, command: list[str]) -> None:
    plain = random_tar(3 * MiB)
    source = decompressed(RemoteArchive(server.put("a", compress(plain, command))))
    assert isinstance(source, CompressedSource)
    with source:
        rng = random.Random(3)
        for _ in range(20):
            offset, size = rng.randrange(len(plain)), rng.choice([512, 4096, 300_000])
            assert source.pread(size, offset) == plain[offset : offset + size]


def test_a_remote_tar_zst_is_refused_without_downloading_it(server: RangeServer) -> None:
    url = server.put("a.tar.zst", compress(random_tar(4 * MiB), ["zstd", "-q", "-c"]))
    with pytest.raises(CompressedArchive, match="local file"):
        decompressed(RemoteArchive(url))
    assert server.bytes_served < MiB


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
    # Reading 1 MiB fetches a bounded amount (~13 MiB here: kernel readahead, rapidgzip's 4 MiB chunks,
    # the block cache's readahead), not the stream up to there: measure it against a larger archive.
    archive = compress(random_tar(40 * MiB), ["gzip", "-1", "-c"])
    url = server.put("big.tar.gz", archive)
    (served := tmp_path / "mnt").mkdir()
    first = mount(url, served)
    assert len(wait_for_index(tmp_path)) == 1, first.stderr_text()
    subprocess.run(["fusermount3", "-u", str(served)], check=True)
    first.process.wait(10)
    server.reset_counters()
    second = mount(url, served)
    with (served / "disk.raw").open("rb") as image:
        assert image.read(MiB) == random.Random(40 * MiB).randbytes(MiB)
    assert "loaded index" in second.stderr_text()
    assert server.bytes_served < len(archive) // 2, f"{server.bytes_served} of {len(archive)} bytes fetched"


@pytest.mark.fuse
def test_a_changed_remote_object_does_not_use_the_old_index(
    server: RangeServer, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    data = gce_tarball(sample_image, tmp_path / "image.tar.gz").read_bytes()
    url = server.put("image.tar.gz", data)
    (served := tmp_path / "mnt").mkdir()
    first = mount(url, served)
    assert len(wait_for_index(tmp_path)) == 1, first.stderr_text()
    subprocess.run(["fusermount3", "-u", str(served)], check=True)
    first.process.wait(10)
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


def test_list_of_a_remote_tar_zst_says_why_not(server: RangeServer) -> None:
    url = server.put("image.tar.zst", compress(random_tar(MiB), ["zstd", "-q", "-c"]))
    result = subprocess.run(tarfuse_command("--list", url), capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "zstd-compressed archives can only be read from a local file" in result.stderr
