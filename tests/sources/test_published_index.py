"""tarfuse --index-only, and the published index beside an http(s) URL (tests/kit/httpserver.py): what
holds for object URLs (test_objectstores.py) holds for a web server, where `<URL>.tarfuse-index` sits
beside the archive."""

import json
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest
from kit.httpserver import RangeServer
from kit.mounts import MountFactory, tarfuse_command
from kit.tarbuilder import archive, file_member

pytestmark = pytest.mark.usefixtures("no_proxy_from_outside", "private_cache")

MiB = 1 << 20


def run_tarfuse(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tarfuse_command(*args), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def tar_gz(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    directory = tmp_path_factory.mktemp("published-http")
    image = random.Random(21).randbytes(32 * MiB)
    packed = directory / "vm.tar.gz"
    packed.write_bytes(subprocess.run(["gzip", "-1", "-n"], input=archive(file_member("disk.raw", image)),
                                      capture_output=True, check=True).stdout)  # fmt: skip
    return packed, image


def test_index_only_writes_a_private_index_and_refuses_what_needs_none(
    tar_gz: tuple[Path, bytes], tmp_path: Path
) -> None:
    packed, image = tar_gz
    missing = run_tarfuse("--index-only", packed)
    assert missing.returncode == 2
    assert "--index-only needs -o index=PATH" in missing.stderr
    plain = tmp_path / "vm.tar"
    plain.write_bytes(archive(file_member("disk.raw", image[:MiB])))
    refused = run_tarfuse("--index-only", plain, "-o", f"index={tmp_path / 'x'}")
    assert refused.returncode == 2
    assert "needs no index: a mount reads it in place" in refused.stderr
    assert not (tmp_path / "x").exists()
    made = run_tarfuse("--index-only", packed, "-o", f"index={tmp_path / 'vm.tar.gz.tarfuse-index'}")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().endswith("publish it beside the archive, as vm.tar.gz.tarfuse-index")
    written = tmp_path / "vm.tar.gz.tarfuse-index"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert written.read_bytes().startswith(b"tarfuse-index 1\n")


def test_a_url_mount_uses_the_index_published_beside_it(
    tar_gz: tuple[Path, bytes], server: RangeServer, mount: MountFactory, tmp_path: Path
) -> None:
    packed, image = tar_gz
    index = tmp_path / "idx"
    assert run_tarfuse("--index-only", packed, "-o", f"index={index}").returncode == 0  # from the local copy
    url = server.put("vm.tar.gz", packed)
    server.put("vm.tar.gz.tarfuse-index", index)
    (tmp_path / "mnt").mkdir()
    served = mount(url, tmp_path / "mnt")
    with (tmp_path / "mnt" / "disk.raw").open("rb", buffering=0) as file:
        assert os.pread(file.fileno(), 65536, 5 * MiB) == image[5 * MiB : 5 * MiB + 65536]
    log = served.stderr_text()
    assert f"loaded the published index {url}.tarfuse-index" in log
    assert "index complete" not in log  # no pass
    assert server.bytes_served < packed.stat().st_size // 3  # the first and last chunks, and the read


def test_a_presigned_url_does_not_look_beside_itself(
    tar_gz: tuple[Path, bytes], server: RangeServer, mount: MountFactory, tmp_path: Path
) -> None:
    """A query string signs one object: the same query for another path would be refused, or worse, be
    someone else's object; the mount asks for nothing beside it."""
    packed, image = tar_gz
    server.put("vm.tar.gz", packed)
    (tmp_path / "mnt").mkdir()
    served = mount(server.url("vm.tar.gz", "X-Amz-Signature=abc"), tmp_path / "mnt")
    served.wait_for_log("index complete", timeout=60)
    assert not [r for r in server.requests if "tarfuse-index" in r.target]
    assert (tmp_path / "mnt" / "disk.raw").read_bytes()[-4096:] == image[-4096:]


def test_a_table_longer_than_the_first_request_comes_in_exactly_one_more(
    tar_gz: tuple[Path, bytes], server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, with a first request shorter than the table (an archive of several GiB has thousands of
    seek points): the rest of the table and the last windows come in one request, of just that much."""
    from tarfuse.mount import open_source
    from tarfuse.options import MountOptions
    from tarfuse.sources import index as index_module

    packed, image = tar_gz
    index = tmp_path / "idx"
    assert run_tarfuse("--index-only", packed, "-o", f"index={index}").returncode == 0
    data = index.read_bytes()
    header_end = data.index(b"\n", len(index_module.MAGIC))
    header = json.loads(data[len(index_module.MAGIC) : header_end])
    blob_start = header_end + 1 + header["table"] + header["ends"]
    assert header["table"] > 100  # more than the first request brings of it
    monkeypatch.setattr(index_module, "PUBLISHED_HEAD", header_end + 1 + 100)  # the header and a bit more
    url = server.put("vm.tar.gz", packed)
    server.put("vm.tar.gz.tarfuse-index", index)
    source = open_source(url, MountOptions())
    try:
        server.reset_counters()
        assert index_module.use_published(source) == f"{url}.tarfuse-index"  # type: ignore[arg-type]
        asked = [r.headers.get("Range") for r in server.requests if r.target.endswith(".tarfuse-index")]
        # then the windows the first chunk needs, which the first request would have brought
        assert asked[:2] == [f"bytes=0-{header_end + 100}", f"bytes={header_end + 101}-{blob_start - 1}"]
        assert source.read_at(512 + 20 * MiB, 4096) == image[20 * MiB : 20 * MiB + 4096]
    finally:
        source.close()
