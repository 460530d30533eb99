"""`tarfuse --status MOUNTPOINT`: what a running mount serves, how far its background pass is, where its
index and spill are, and for a URL what it fetched; asked of the daemon itself, through its root's
user.tarfuse.status attribute, by the user who mounted it or root only.
"""

import gzip
import io
import json
import os
import random
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from kit.archives import gce_tarball
from kit.httpserver import RangeServer
from kit.mounts import MountFactory, tarfuse_command
from kit.sample import ArchiveFactory, SampleImage
from kit.users import Setup, sha256_as

pytestmark = pytest.mark.fuse

WAIT_S = 60.0


def status_of(mountpoint: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tarfuse_command("--status", mountpoint, *extra),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def status_json(mountpoint: Path) -> dict[str, Any]:
    result = status_of(mountpoint, "--json")
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def status_once_passes_end(mountpoint: Path) -> dict[str, Any]:
    """The status, asked again until no pass is running (the state the test waits for, from the daemon)."""
    for _ in range(int(WAIT_S / 0.05)):
        answer = status_json(mountpoint)
        if all(job["state"] != "running" for job in answer["passes"]):
            return answer
    raise AssertionError(f"a pass still runs: {answer}")


def test_a_compressed_mount_tells_its_files_its_pass_and_where_its_index_is(
    sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    archive = gce_tarball(sample_image, tmp_path / "image.tar.gz")
    (served := tmp_path / "mnt").mkdir()
    mount(archive, served)
    answer = status_once_passes_end(served)
    assert answer["archive"] == str(archive)
    assert answer["compression"] == "gzip"
    assert answer["files"] == [{"name": "disk.raw", "size": len(sample_image.data)}]
    assert answer["fetched_bytes"] is None  # a local file
    (job,) = answer["passes"]
    assert job["job"] == "indexing"
    assert job["state"] == "done"
    assert job["done_bytes"] == job["total_bytes"] == archive.stat().st_size
    index = Path(job["index"])
    assert index == tmp_path / "image.tar.gz.tarfuse-index"
    assert job["index_size"] == index.stat().st_size
    shown = status_of(served)
    assert shown.returncode == 0, shown.stderr
    assert "indexing: done" in shown.stdout
    assert f"index: {index}, {index.stat().st_size}" in shown.stdout
    assert "disk.raw" in shown.stdout


def test_a_plain_mount_has_no_pass_and_fetches_nothing(
    archive_of: ArchiveFactory, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    (served := tmp_path / "mnt").mkdir()
    mount(archive_of("gnu"), served)
    answer = status_json(served)
    assert answer["passes"] == []
    assert answer["compression"] is None
    assert answer["fetched_bytes"] is None
    assert answer["file_count"] == 1


def test_a_file_mount_point_answers_too(
    archive_of: ArchiveFactory, mount: MountFactory, tmp_path: Path
) -> None:
    (served := tmp_path / "disk.img").touch()
    mount(archive_of("gnu"), served)
    assert status_json(served)["files"][0]["name"] == "disk.raw"


def test_a_url_mount_counts_the_bytes_it_fetched(
    archive_of: ArchiveFactory,
    sample_image: SampleImage,
    server: RangeServer,
    mount: MountFactory,
    tmp_path: Path,
) -> None:
    url = server.put("vm.tar", archive := archive_of("gnu"))
    (served := tmp_path / "mnt").mkdir()
    mount(url, served)
    before = status_json(served)["fetched_bytes"]
    assert (served / "disk.raw").read_bytes() == sample_image.data
    after = status_json(served)["fetched_bytes"]
    # The headers at mount (for an archive this small, all of it: the first request asks for 256 KiB),
    # then the image's data as it was read.
    assert 0 < before <= after
    assert after == archive.stat().st_size  # a sparse archive: every byte of it, once
    assert after <= server.bytes_served  # what the server sent, and nothing it did not
    assert "over http(s)" in status_of(served).stdout


def test_a_single_block_xz_mount_says_where_its_index_and_spill_go_and_shows_percent(
    sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    archive = tmp_path / "vm.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(sample_image.path, "disk.raw")
    subprocess.run(["xz", "-T1", "-0", str(archive)], check=True)  # one block: no restart point
    (served := tmp_path / "mnt").mkdir()
    mounted = mount(tmp_path / "vm.tar.xz", served)
    log = mounted.stderr_text()  # said before the mount went live
    index = tmp_path / "vm.tar.xz.tarfuse-index"
    spill = tmp_path / "vm.tar.xz.tarfuse-spill.zst"
    assert f"the seek index will be kept in {index}" in log
    assert f"will be written in {spill}" in log
    assert log.index("will be written in") < log.index("serving")
    (job,) = status_once_passes_end(served)["passes"]
    assert job["state"] == "done"
    assert job["unit"] == "decompressed"  # xz says no compressed position: the known size gives the percent
    assert job["percent"] == 100.0
    assert (job["spill"], job["spill_size"]) == (str(spill), spill.stat().st_size)
    assert (served / "disk.raw").read_bytes() == sample_image.data


def test_no_tarfuse_mount_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = status_of(tmp_path)
    assert result.returncode == 1
    expected = "not a tarfuse mount point (or one mounted by a tarfuse without --status)"
    assert result.stderr.strip() == f"tarfuse: {tmp_path}: {expected}"
    assert status_of(tmp_path, "extra").returncode == 2  # one MOUNTPOINT and nothing else


def test_another_user_reads_the_image_but_not_the_status(setup: Setup, mount: MountFactory) -> None:
    # Where root keeps its index and spill is root's business, even on a mount others may read.
    mount(setup.archive, setup.mountpoint, "-o", "allow_other")
    image = setup.mountpoint / "disk.raw"
    assert sha256_as(setup.other, image).returncode == 0  # allow_other: the file is theirs to read
    asked = subprocess.run(
        setup.python.tarfuse(setup.other, "--status", setup.mountpoint),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert asked.returncode == 1
    assert "only the user who mounted it, and root, may ask for its status" in asked.stderr
    assert json.loads(os.getxattr(setup.mountpoint, "user.tarfuse.status"))["file_count"] == 1  # root may


def test_a_mount_mid_pass_tells_how_far_its_pass_is(
    sample_image: SampleImage, server: RangeServer, mount: MountFactory, tmp_path: Path
) -> None:
    # The web server holds every read past 8 MiB back: the pass stops there until the test lets it go,
    # and the status is asked while it waits, mid-pass, then again once it has ended.
    filler = random.Random(7).randbytes(16 << 20)  # stored by gzip as it is: the hold falls inside it
    archive = tmp_path / "vm.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(sample_image.path, "disk.raw")
        info = tarfile.TarInfo("filler.bin")
        info.size = len(filler)
        tar.addfile(info, io.BytesIO(filler))
    url = server.put("vm.tar.gz", gzip.compress(archive.read_bytes(), 1), held_from=8 << 20)
    (served := tmp_path / "mnt").mkdir()
    try:
        mount(url, served, "-o", "noindex")
        (job,) = status_json(served)["passes"]
        assert job["state"] == "running"
        assert job["unit"] == "compressed"
        assert 0 <= job["done_bytes"] < job["total_bytes"]
        assert 0 <= job["percent"] < 100
        shown = status_of(served).stdout
        assert re.search(r"indexing: .* of .* compressed \([0-9.]+%\)", shown), shown
        assert "index:" not in shown  # -o noindex: none is kept
    finally:
        server.release("vm.tar.gz")
    (job,) = status_once_passes_end(served)["passes"]
    assert job["state"] == "done"
    assert job["done_bytes"] == job["total_bytes"]


def test_the_status_of_many_files_names_the_first_and_counts_them_all(
    mount: MountFactory, tmp_path: Path
) -> None:
    # The answer is one extended attribute (64 KiB at most): 300 names of 100 bytes do not all fit.
    archive = tmp_path / "many.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for number in range(300):
            info = tarfile.TarInfo(f"{number:03d}-" + "n" * 96)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    (served := tmp_path / "mnt").mkdir()
    mount(archive, served, "-o", "all")
    answer = status_json(served)
    assert answer["file_count"] == 300
    assert 0 < len(answer["files"]) < 300
    assert answer["files"][0]["name"] == "000-" + "n" * 96
    assert f"and {300 - len(answer['files'])} more" in status_of(served).stdout
