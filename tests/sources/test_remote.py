"""Archives served over HTTP(S) from a test server on 127.0.0.1 (tests/kit/httpserver.py), faults included.

The first half drives http.archive.RemoteArchive in-process (no FUSE); the second mounts URLs for real and
compares the served bytes with the sample image, boots it in QEMU, and counts the bytes fetched.
"""

import contextlib
import gzip
import os
import random
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from kit.fixtures import BootSerial
from kit.httpserver import RangeServer, serve
from kit.mounts import MountFactory, mount_entry, tarfuse_command
from kit.readers import in_threads, read_at_random
from kit.sample import ArchiveFactory, DataRun, SampleImage, boot_sector, data_runs

from tarfuse import mount
from tarfuse.cli import split_mount_options
from tarfuse.errors import ArchiveChanged, RemoteError, UsageError
from tarfuse.sources import DEFAULT_CACHE_SIZE
from tarfuse.sources.blockcache import BLOCK_SIZE
from tarfuse.sources.compressed import CompressedSource
from tarfuse.sources.http.archive import RemoteArchive
from tarfuse.sources.http.options import RemoteOptions, parse_options
from tarfuse.sources.locations import display_name, open_location

pytestmark = pytest.mark.usefixtures("no_proxy_from_outside")


MiB = 1 << 20


@pytest.fixture(scope="module")
def blob() -> bytes:
    return random.Random(7).randbytes(5 * MiB + 12_345)


def remote(url: str, cache_size: int = DEFAULT_CACHE_SIZE, **options: object) -> RemoteArchive:
    return RemoteArchive(url, RemoteOptions(**options), cache_size)  # type: ignore[arg-type]


# --- the source, in-process --------------------------------------------------------------------------


def test_reads_at_any_offset_match_the_object(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob))
    assert source.size == len(blob)
    rng = random.Random(1)
    for _ in range(300):
        offset, size = rng.randrange(len(blob) + 10), rng.choice([1, 511, 4096, BLOCK_SIZE + 3, 700_000])
        assert source.read_at(offset, size) == blob[offset : offset + size]


def test_concurrent_readers_get_their_own_bytes(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob), cache_size=4 * BLOCK_SIZE)

    def read(offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        return bytes(buffer[: source.pread_into(memoryview(buffer), offset)])

    tally = in_threads(8, lambda seed: read_at_random(read, blob, seed, 60, 300_000))
    assert tally.wrong == tally.short == 0, tally.notes


def test_one_read_over_missing_blocks_is_one_request(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob))
    server.reset_counters()
    assert source.read_at(2 * MiB, MiB) == blob[2 * MiB : 3 * MiB]
    assert len(server.requests) == 1
    assert server.requests[0].headers["Range"] == f"bytes={2 * MiB}-{3 * MiB - 1}"


def test_readers_of_the_same_block_share_one_request(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob))
    server.reset_counters()
    server.faults.slow, server.faults.delay = 1, 0.3
    threads = [threading.Thread(target=source.read_at, args=(3 * MiB + i, 100)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(server.requests) == 1


def test_cache_is_bounded_and_least_recently_used_goes_first(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob), cache_size=2 * BLOCK_SIZE)
    far = [block * BLOCK_SIZE for block in (2, 20, 40)]  # far apart: no reader looks sequential
    server.reset_counters()
    source.read_at(far[0], 10)
    source.read_at(far[1], 10)
    source.read_at(far[0], 10)  # cached; far[1] is now the least recently used
    source.read_at(far[2], 10)  # evicts far[1]
    source.read_at(far[0], 10)  # still cached
    assert len(server.requests) == 3
    source.read_at(far[1], 10)
    assert len(server.requests) == 4


def test_sequential_reader_is_served_by_readahead(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob))
    server.reset_counters()
    reads = 0
    for offset in range(BLOCK_SIZE, len(blob), 64 * 1024):
        assert source.read_at(offset, 64 * 1024) == blob[offset : offset + 64 * 1024]
        reads += 1
    assert len(server.requests) <= reads // 4
    assert server.bytes_served <= len(blob)  # fetched ahead, never twice


def test_a_short_run_is_read_ahead_by_at_most_half_its_length(server: RangeServer, blob: bytes) -> None:
    # What a decompressor does to serve one read: its 1 MiB from a checkpoint on, in small reads.
    source = remote(server.put("blob", blob))
    server.reset_counters()
    for offset in range(BLOCK_SIZE, BLOCK_SIZE + MiB, 64 * 1024):
        assert source.read_at(offset, 64 * 1024) == blob[offset : offset + 64 * 1024]
    source._blocks._quiesce()  # the readahead threads have ended: every request they make was made
    server.wait_until_every_request_handled(timeout=60)  # and every byte of the answers counted
    assert server.bytes_served <= MiB + MiB // 2


def test_dropped_connections_are_retried(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob))
    server.faults.drop = 2
    assert source.read_at(3 * MiB, 1000) == blob[3 * MiB : 3 * MiB + 1000]


def test_truncated_response_resumes_where_it_broke_off(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob))
    server.reset_counters()
    server.faults.truncate = 1
    assert source.read_at(2 * MiB, MiB) == blob[2 * MiB : 3 * MiB]
    ranges = [request.headers["Range"] for request in server.requests]
    assert ranges == [f"bytes={2 * MiB}-{3 * MiB - 1}", f"bytes={2 * MiB + MiB // 2}-{3 * MiB - 1}"]


def test_slow_response_times_out_and_is_retried(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob), timeout=0.3)
    server.faults.slow, server.faults.delay = 1, 1.0
    assert source.read_at(3 * MiB, 1000) == blob[3 * MiB : 3 * MiB + 1000]


def test_a_few_503s_are_retried(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob), retries=3)
    server.faults.error = 3
    assert source.read_at(3 * MiB, 1000) == blob[3 * MiB : 3 * MiB + 1000]


def test_endless_503s_fail_after_the_retries(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob), retries=2)
    server.reset_counters()
    server.faults.error = -1
    with pytest.raises(RemoteError, match="HTTP 503"):
        source.read_at(3 * MiB, 1000)
    assert len(server.requests) == 3


def test_missing_object_fails_at_once(server: RangeServer) -> None:
    with pytest.raises(RemoteError, match="HTTP 404"):
        remote(server.url("nothing"))
    assert len(server.requests) == 1


def test_server_ignoring_range_is_refused_without_downloading(server: RangeServer) -> None:
    big = bytes(64 * MiB)
    url = server.put("big", big)
    server.faults.ignore_range = True
    with pytest.raises(RemoteError, match="ignored the Range header"):
        remote(url)
    server.wait_until_every_request_handled(timeout=60)  # the server has noticed the hang-up
    assert server.bytes_served < len(big) // 2


def test_changed_object_fails_reads_and_every_later_check(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob))
    assert source.read_at(0, 10) == blob[:10]
    server.put("blob", blob[::-1])  # same size, new ETag
    with pytest.raises(ArchiveChanged, match="ETag"):
        source.read_at(4 * MiB, 10)
    with pytest.raises(ArchiveChanged):
        source.check_unchanged()


def test_shrunk_object_is_a_change(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob))
    server.put("blob", blob[:MiB])
    with pytest.raises(ArchiveChanged, match="shorter"):
        source.read_at(4 * MiB, 10)


def test_headers_are_sent_with_every_request(server: RangeServer, blob: bytes) -> None:
    source = remote(server.put("blob", blob), headers=(("Authorization", "Bearer s3cret"),))
    source.read_at(4 * MiB, 10)
    assert {r.headers.get("Authorization") for r in server.requests} == {"Bearer s3cret"}


def test_proxy_from_the_environment(
    server: RangeServer, blob: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.put("blob", blob)
    monkeypatch.setenv("HTTP_PROXY", server.base)
    source = remote("http://archive.invalid/blob")  # resolvable by the proxy only
    assert source.read_at(4 * MiB, 100) == blob[4 * MiB : 4 * MiB + 100]
    assert server.requests[0].target == "http://archive.invalid/blob"


def test_no_proxy_bypasses_the_proxy(
    server: RangeServer, blob: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    source = remote(server.put("blob", blob), retries=0)
    assert source.read_at(0, 100) == blob[:100]


def test_https_with_a_ca_file(tls_files: tuple[Path, Path], blob: bytes) -> None:
    with serve(tls=tls_files) as https:
        source = remote(https.put("blob", blob), ca_file=str(tls_files[0]))
        assert source.read_at(MiB, 100) == blob[MiB : MiB + 100]


def test_https_with_an_unknown_certificate_fails_at_once(tls_files: tuple[Path, Path]) -> None:
    with serve(tls=tls_files) as https:
        url = https.put("blob", b"x" * 1000)
        with pytest.raises(RemoteError, match="TLS"):
            remote(url)
        assert len(https.requests) == 0


def test_display_name_hides_query_and_user_info() -> None:
    assert (
        display_name("https://user:pw@host:8443/a/vm.tar?X-Amz-Signature=abc#f")
        == "https://host:8443/a/vm.tar"
    )
    assert display_name("vm.tar") == os.path.abspath("vm.tar")


def test_remote_options_parse() -> None:
    options = parse_options(["header=Authorization: Bearer t", "header=X-A:1", "timeout=2.5"])
    assert options.headers == (("Authorization", "Bearer t"), ("X-A", "1"))
    assert (options.timeout, options.retries) == (2.5, 5)


@pytest.mark.parametrize(
    "word", ["header=NoColon", "header=Range:bytes=0-", "cache_size=8M", "timeout=0", "ca_file=/no/such"]
)
def test_bad_remote_options_are_usage_errors(word: str) -> None:
    with pytest.raises(UsageError):
        parse_options([word])


def test_remote_options_go_through_the_command_line_parser() -> None:
    options = split_mount_options(["header=A:b,cache_size=1M,ro", "header=C:d"])
    assert options.http.headers == (("A", "b"), ("C", "d"))
    assert options.cache_size == MiB  # not a remote option: one budget for every layer (mount.py)


def test_remote_options_on_a_local_archive_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="header= applies only to remote"):
        open_location(str(tmp_path / "vm.tar"), parse_options(["header=A:b"]))


def test_cache_size_is_the_chunk_cache_of_a_local_compressed_archive(tmp_path: Path) -> None:
    archive = tmp_path / "vm.tar.gz"
    archive.write_bytes(gzip.compress(bytes(10240)))
    with contextlib.closing(
        mount.open_source(str(archive), split_mount_options(["cache_size=8M"]))
    ) as source:
        assert isinstance(source, CompressedSource)
        assert source.cache.capacity == 8 * MiB


def test_cache_size_is_one_budget_for_a_compressed_archive_on_a_url(server: RangeServer) -> None:
    url = server.put("vm.tar.gz", gzip.compress(bytes(10240)))
    with contextlib.closing(mount.open_source(url, split_mount_options(["cache_size=16M"]))) as source:
        assert isinstance(source, CompressedSource)
        assert isinstance(source.archive, RemoteArchive)
        assert (source.cache.capacity, source.archive.cache_capacity) == (12 * MiB, 4 * MiB)
    plain_url = server.put("vm.tar", bytes(10240))
    with contextlib.closing(mount.open_source(plain_url, split_mount_options(["cache_size=16M"]))) as plain:
        assert isinstance(plain, RemoteArchive)
        assert plain.cache_capacity == 16 * MiB  # no decompressed chunks: the whole budget is its blocks


# --- the command line and real mounts -----------------------------------------------------------------


def run_tarfuse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(tarfuse_command(*args), capture_output=True, text=True, timeout=30, check=False)


def test_list_a_url(server: RangeServer, archive_of: ArchiveFactory, sample_image: SampleImage) -> None:
    result = run_tarfuse("--list", server.put("vm.tar", archive_of("gnu")))
    assert result.returncode == 0, result.stderr
    assert "disk.raw" in result.stdout
    assert str(len(sample_image.data)) in result.stdout


def test_a_refused_connection_is_said_in_plain_words(tmp_path: Path) -> None:
    import socket

    with socket.socket() as closed:  # a port that nothing listens on once this block ends
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"http://127.0.0.1:{port}/vm.tar"
    (mnt := tmp_path / "mnt").mkdir()
    for result in (run_tarfuse("--list", url), run_tarfuse("-f", url, str(mnt))):
        assert result.returncode == 1
        assert (
            result.stderr
            == f"tarfuse: {url}: GET {url}: cannot connect to 127.0.0.1:{port}: connection refused\n"
        )
    assert mount_entry(mnt) is None


def test_a_missing_object_is_its_http_status_and_no_offset(server: RangeServer) -> None:
    url = server.url("nothing.tar")
    result = run_tarfuse("--list", url)
    assert result.returncode == 1
    assert result.stderr == f"tarfuse: {url}: GET {url}: HTTP 404 Not Found\n"


def test_mount_of_a_server_ignoring_range_fails_clearly(server: RangeServer, tmp_path: Path) -> None:
    url = server.put("vm.tar", b"\0" * MiB)
    server.faults.ignore_range = True
    (mnt := tmp_path / "mnt").mkdir()
    result = run_tarfuse("-f", url, str(mnt))
    assert result.returncode == 1
    assert "ignored the Range header" in result.stderr
    assert mount_entry(mnt) is None


@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["gnu", "pax0.1", "pax1.0"])
def test_mounted_bytes_equal_the_image(
    kind: str,
    server: RangeServer,
    archive_of: ArchiveFactory,
    sample_image: SampleImage,
    mount: MountFactory,
    tmp_path: Path,
) -> None:
    (mnt := tmp_path / "mnt").mkdir()
    mount(server.put("vm.tar", archive_of(kind)), mnt)
    assert (mnt / "disk.raw").read_bytes() == sample_image.data


def write_plain_tar_of_sparse_image(archive: Path, size: int, runs: list[DataRun]) -> None:
    """A ustar archive of a `size`-byte image stored whole (no sparse map), itself a sparse file on disk."""
    info = tarfile.TarInfo("disk.raw")
    info.size, info.mtime, info.mode = size, 1_700_000_000, 0o644
    with archive.open("wb") as file:
        file.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        for run in runs:
            os.pwrite(file.fileno(), run.data, 512 + run.offset)
        file.truncate(512 + -(-size // 512) * 512 + 1024)


@pytest.fixture(scope="module")
def gib_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    message = "tarfuse remote 1 GiB booted"
    archive = tmp_path_factory.mktemp("gib") / "gib.tar"
    size = 1 << 30
    write_plain_tar_of_sparse_image(
        archive, size, [DataRun(0, boot_sector(message + "\r\n")), *data_runs(size)]
    )
    return archive, message


@pytest.mark.fuse
def test_reading_the_first_sectors_of_a_remote_gib_image_fetches_little(
    server: RangeServer, gib_archive: tuple[Path, str], mount: MountFactory, tmp_path: Path
) -> None:
    archive, message = gib_archive
    (mnt := tmp_path / "mnt").mkdir()
    mount(server.put("gib.tar", archive), mnt)
    with (mnt / "disk.raw").open("rb") as disk:
        assert disk.read(512) == boot_sector(message + "\r\n")
        assert os.fstat(disk.fileno()).st_size == 1 << 30
    assert server.bytes_served <= 2 * MiB


@pytest.mark.fuse
def test_qemu_boots_a_remote_gib_image_fetching_a_few_mib(
    server: RangeServer,
    gib_archive: tuple[Path, str],
    mount: MountFactory,
    tmp_path: Path,
    boot_and_read_serial: BootSerial,
) -> None:
    archive, message = gib_archive
    (mnt := tmp_path / "mnt").mkdir()
    mount(server.put("gib.tar", archive), mnt)
    serial, qemu = boot_and_read_serial(mnt / "disk.raw", message)
    assert serial.startswith(message), f"COM1: {serial!r}; QEMU: {qemu}"
    assert server.bytes_served <= 4 * MiB


@pytest.fixture
def random_archive(tmp_path: Path) -> tuple[Path, bytes]:
    """A 4 MiB image of random bytes, stored whole: every read past the first block needs a fetch."""
    data = random.Random(3).randbytes(4 * MiB)
    (image := tmp_path / "disk.raw").write_bytes(data)
    with tarfile.open(archive := tmp_path / "random.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(image, arcname="disk.raw")
    return archive, data


def read_at(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@pytest.mark.fuse
def test_changed_object_gives_eio_and_a_log_line(
    server: RangeServer, random_archive: tuple[Path, bytes], mount: MountFactory, tmp_path: Path
) -> None:
    archive, data = random_archive
    (mnt := tmp_path / "mnt").mkdir()
    mounted = mount(server.put("vm.tar", archive), mnt)
    assert read_at(mnt / "disk.raw", MiB, 4096) == data[MiB : MiB + 4096]
    replaced = archive.read_bytes()
    server.put("vm.tar", replaced[:4096] + bytes(len(replaced) - 4096))  # same size, new ETag
    with pytest.raises(OSError, match="Input/output error"):
        read_at(mnt / "disk.raw", 3 * MiB, 4096)
    assert "changed on the server" in mounted.stderr_text()


@pytest.mark.fuse
def test_endless_503s_give_eio(
    server: RangeServer, random_archive: tuple[Path, bytes], mount: MountFactory, tmp_path: Path
) -> None:
    archive, data = random_archive
    (mnt := tmp_path / "mnt").mkdir()
    mounted = mount(server.put("vm.tar", archive), mnt, "-o", "retries=2")
    server.faults.error = -1
    with pytest.raises(OSError, match="Input/output error"):
        read_at(mnt / "disk.raw", 3 * MiB, 4096)
    server.faults.error = 0
    assert read_at(mnt / "disk.raw", 2 * MiB, 4096) == data[2 * MiB : 2 * MiB + 4096]  # it heals
    assert "HTTP 503" in mounted.stderr_text()


@pytest.mark.fuse
def test_secrets_stay_out_of_mount_output_logs_and_ps(
    server: RangeServer, random_archive: tuple[Path, bytes], mount: MountFactory, tmp_path: Path
) -> None:
    archive, data = random_archive
    token, header_secret = "querytokenSECRET42", "headerSECRET99"
    url = server.put("vm.tar", archive) + f"?X-Amz-Signature={token}"
    (mnt := tmp_path / "mnt").mkdir()
    mounted = mount(url, mnt, "-d", "-o", f"header=Authorization:Bearer {header_secret},retries=1")
    assert read_at(mnt / "disk.raw", MiB, 4096) == data[MiB : MiB + 4096]
    server.faults.error = -1  # an error line too, with its request in it
    with pytest.raises(OSError, match="Input/output error"):
        read_at(mnt / "disk.raw", 3 * MiB, 4096)
    findmnt = subprocess.run(
        [shutil.which("findmnt") or "findmnt", "-n", "-o", "SOURCE,OPTIONS", str(mnt)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert findmnt.split()[0] == server.url("vm.tar")
    logs = mounted.stderr_text()
    assert "HTTP 503" in logs
    cmdline = Path(f"/proc/{mounted.process.pid}/cmdline").read_bytes().decode(errors="replace")
    assert "vm.tar" in cmdline  # what ps shows: the URL without its query string, header names only
    assert "Authorization:***" in cmdline
    for seen in (findmnt, logs, Path("/proc/self/mountinfo").read_text(), cmdline):
        assert token not in seen
        assert header_secret not in seen
    assert {r.headers.get("Authorization") for r in server.requests} == {f"Bearer {header_secret}"}
