"""tarfuse --index-only, and the published index beside an http(s) URL (tests/kit/httpserver.py): what
holds for object URLs (test_objectstores.py) holds for a web server, where `<URL>.tarfuse-index` sits
beside the archive."""

import hashlib
import json
import os
import random
import stat
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
from kit.httpserver import RangeServer
from kit.mounts import MountFactory, tarfuse_command
from kit.tarbuilder import archive, file_member

from tarfuse.sources import index as index_module

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

    packed, image = tar_gz
    index = tmp_path / "idx"
    assert run_tarfuse("--index-only", packed, "-o", f"index={index}").returncode == 0
    data = index.read_bytes()
    header_end = data.index(b"\n", len(index_module.MAGIC))
    header = json.loads(data[len(index_module.MAGIC) : header_end])
    blob_start = header_end + 1 + header["members"] + header["table"] + header["ends"]
    assert header["table"] > 100  # more than the first request brings of it
    monkeypatch.setattr(index_module, "PUBLISHED_HEAD", header_end + 1 + 100)  # the header and a bit more
    url = server.put("vm.tar.gz", packed)
    server.put("vm.tar.gz.tarfuse-index", index)
    source = open_source(url, MountOptions())
    try:
        server.reset_counters()
        published = index_module.use_published(source)  # type: ignore[arg-type]
        assert published is not None
        assert published.name == f"{url}.tarfuse-index"
        asked = [r.headers.get("Range") for r in server.requests if r.target.endswith(".tarfuse-index")]
        # then the windows the first chunk needs, which the first request would have brought
        assert asked[:2] == [f"bytes=0-{header_end + 100}", f"bytes={header_end + 101}-{blob_start - 1}"]
        assert source.read_at(512 + 20 * MiB, 4096) == image[20 * MiB : 20 * MiB + 4096]
    finally:
        source.close()


def with_members(index: bytes, members: bytes | None) -> bytes:
    """The index file `index` with its member list replaced (None: without one, as an index made before
    lists were kept), its header made to match: what a publisher could write."""
    header_end = index.index(b"\n", len(index_module.MAGIC))
    header = json.loads(index[len(index_module.MAGIC) : header_end])
    rest = index[header_end + 1 + header.pop("members", 0) :]
    header.pop("members_sha256", None)
    if members:
        header |= {"members": len(members), "members_sha256": hashlib.sha256(members).hexdigest()}
    return index_module.MAGIC + json.dumps(header).encode() + b"\n" + (members or b"") + rest


def members_of(index: bytes) -> list[list[Any]]:
    header_end = index.index(b"\n", len(index_module.MAGIC))
    header = json.loads(index[len(index_module.MAGIC) : header_end])
    return cast(list[list[Any]], json.loads(index[header_end + 1 : header_end + 1 + header["members"]]))


@pytest.fixture(scope="module")
def disk_after_notes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    """A .tar.gz whose disk image comes after 40 other files of 512 KiB that gzip cannot shrink, and the
    index --index-only makes of it: a walk of the headers fetches all of them to reach the image's."""
    directory = tmp_path_factory.mktemp("disk-after-notes")
    rng = random.Random(23)
    notes = [file_member(f"notes/{i:02}.bin", rng.randbytes(512 << 10)) for i in range(40)]
    image = rng.randbytes(2 * MiB)
    packed = directory / "vm.tar.gz"
    tar = archive(*notes, file_member("disk.raw", image))
    packed.write_bytes(
        subprocess.run(["gzip", "-1", "-n"], input=tar, capture_output=True, check=True).stdout
    )
    made = run_tarfuse("--index-only", packed, "-o", f"index={directory / 'index'}")
    assert made.returncode == 0, made.stderr
    return packed, image, (directory / "index").read_bytes()


def test_a_published_member_list_spares_the_mount_the_walk_of_the_headers(
    disk_after_notes: tuple[Path, bytes, bytes],
    server: RangeServer,
    mount: MountFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    packed, image, index = disk_after_notes
    assert [row[0] for row in members_of(index)][-2:] == ["notes/39.bin", "disk.raw"]
    url = server.put("vm.tar.gz", packed)
    fetched = {}
    for how, published in (("listed", index), ("walked", with_members(index, None))):
        server.put("vm.tar.gz.tarfuse-index", published)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"cache-{how}"))  # a cold host each
        (tmp_path / how).mkdir()
        server.reset_counters()
        served = mount(url, tmp_path / how)
        with (tmp_path / how / "disk.raw").open("rb", buffering=0) as file:
            assert os.pread(file.fileno(), 65536, MiB) == image[MiB : MiB + 65536]
        log = served.stderr_text()
        assert "loaded the published index" in log
        assert ("with the tar's member list" in log) == (how == "listed")
        served.unmount()
        server.wait_until_every_request_handled(timeout=30)
        fetched[how] = server.bytes_served
    size = packed.stat().st_size
    # listed: the index, the first chunk, the image's chunks from the seek point before it; walked: all
    assert fetched["listed"] < size // 2 < fetched["walked"], (fetched, size)


@pytest.mark.parametrize("lie", ["another member's place", "left out", "damaged"])
def test_a_member_list_that_is_not_the_archives_is_not_used(
    lie: str,
    disk_after_notes: tuple[Path, bytes, bytes],
    server: RangeServer,
    mount: MountFactory,
    tmp_path: Path,
) -> None:
    """A list that names a note's header and data as the disk's: the check of the disk's header before its
    data is read finds the note there, and the mount walks the headers (without the check, it would serve
    the note's bytes as the disk). A list that leaves the disk out: the walk finds it. A list whose bytes
    are not the ones the header's checksum names makes the whole index ignored, as any damage does."""
    packed, image, index = disk_after_notes
    rows = members_of(index)
    if lie == "damaged":
        listed = json.dumps(rows).encode()
        published = bytearray(with_members(index, listed))
        published[published.index(b"notes/07.bin")] ^= 0x01
    elif lie == "left out":  # the walk finds it: the list was not the archive's
        published = bytearray(with_members(index, json.dumps(rows[:-1]).encode()))
    else:
        disk = next(row for row in rows if row[0] == "disk.raw")
        disk[2:6] = rows[7][2:6]  # header and data offsets, stored and real sizes
        published = bytearray(with_members(index, json.dumps(rows).encode()))
    url = server.put("vm.tar.gz", packed)
    server.put("vm.tar.gz.tarfuse-index", bytes(published))
    (tmp_path / "mnt").mkdir()
    served = mount(url, tmp_path / "mnt")
    assert (tmp_path / "mnt" / "disk.raw").read_bytes() == image
    log = served.stderr_text()
    if lie == "damaged":
        assert "ignoring the published index" in log
        assert "its member list is damaged (checksum mismatch)" in log
    elif lie == "left out":
        assert "ignoring the member list of" in log
        assert "it leaves out a file the archive's headers name" in log
    else:
        assert "ignoring the member list of" in log
        assert "it lists 'disk.raw' at offset" in log
        assert "where the archive holds 'notes/07.bin'" in log


def test_list_of_a_url_uses_the_published_member_list(
    disk_after_notes: tuple[Path, bytes, bytes], server: RangeServer
) -> None:
    packed, _, index = disk_after_notes
    url = server.put("vm.tar.gz", packed)
    server.put("vm.tar.gz.tarfuse-index", index)
    listed = run_tarfuse("--list", url)
    assert listed.returncode == 0, listed.stderr
    assert "disk.raw" in listed.stdout
    assert f"index: {url}.tarfuse-index" in listed.stdout
    server.wait_until_every_request_handled(timeout=30)
    assert server.bytes_served < packed.stat().st_size // 2  # no walk through the notes
