"""Data ISO 9660 and UDF images, bare or compressed: served as images, not taken for an empty tar.

A data ISO (a cloud-init `cidata` seed, a driver disk) has no boot record: its first 32 KiB are zeros, as an
empty tar's record is. Only the volume descriptors at 32 KiB tell them apart.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from kit import tarbuilder as tb
from kit.mounts import MountFactory, tarfuse_command
from kit.needs import require_tool


@pytest.fixture
def seed_iso(tmp_path: Path) -> Path:
    """A cloud-init seed as `xorriso -as mkisofs` (the `genisoimage` of Debian) writes it."""
    xorriso = require_tool("xorriso")
    content = tmp_path / "seed"
    content.mkdir()
    (content / "meta-data").write_text("instance-id: iid-tarfuse\n")
    (content / "user-data").write_text("#cloud-config\n")
    iso = tmp_path / "seed.iso"
    subprocess.run(
        [xorriso, "-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-r", "-o", str(iso), str(content)],
        check=True,
        capture_output=True,
    )
    assert not any(iso.read_bytes()[:0x8000]), "the test needs an ISO whose first 32 KiB are zeros"
    return iso


@pytest.fixture
def udf_image(tmp_path: Path) -> Path:
    """An empty UDF file system as mkudffs writes it: zeros up to the recognition sequence at 32 KiB."""
    mkudffs = require_tool("mkudffs")
    image = tmp_path / "disk.udf"
    with image.open("wb") as sink:
        sink.truncate(4 << 20)
    subprocess.run([mkudffs, "-b", "2048", "--media-type=hd", str(image)], check=True, capture_output=True)
    assert not any(image.read_bytes()[:0x8000]), "the test needs a UDF image whose first 32 KiB are zeros"
    return image


def _listed(source: Path) -> dict[str, object]:
    listed = subprocess.run(
        tarfuse_command("--list", "--json", source), capture_output=True, text=True, check=False
    )
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)["images"]
    assert isinstance(row, dict)
    return row


@pytest.mark.fuse
def test_a_bare_data_iso_is_served_whole(seed_iso: Path, mount: MountFactory, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(seed_iso, mountpoint)
    assert os.listdir(mountpoint) == ["seed.iso"]
    assert (mountpoint / "seed.iso").read_bytes() == seed_iso.read_bytes()


@pytest.mark.parametrize("compressor", ["xz", "gzip", "zstd"])
def test_a_compressed_data_iso_is_listed_as_iso_9660(seed_iso: Path, compressor: str) -> None:
    require_tool(compressor)
    subprocess.run([compressor, "-k", "-q", str(seed_iso)], check=True)
    suffix = {"xz": ".xz", "gzip": ".gz", "zstd": ".zst"}[compressor]
    row = _listed(seed_iso.with_name(seed_iso.name + suffix))
    assert row["path"] == "seed.iso"
    assert row["size"] == seed_iso.stat().st_size
    assert row["format_detail"] == "ISO 9660"


def test_a_bare_udf_image_is_listed_as_udf(udf_image: Path) -> None:
    row = _listed(udf_image)
    assert row["size"] == udf_image.stat().st_size
    assert row["format_detail"] == "UDF"


def test_the_same_iso_inside_a_tar_is_found_by_its_content(seed_iso: Path, tmp_path: Path) -> None:
    archive = tmp_path / "seed.tar"
    archive.write_bytes(tb.with_tarfile(("seed-data", seed_iso.read_bytes())))
    row = _listed(archive)
    assert row["path"] == "seed-data"
    assert row["format_detail"] == "ISO 9660"


def test_an_empty_tar_is_still_an_empty_tar(tmp_path: Path) -> None:
    archive = tmp_path / "empty.tar"
    subprocess.run(["tar", "-cf", str(archive), "-T", "/dev/null"], check=True)
    listed = subprocess.run(tarfuse_command("--list", archive), capture_output=True, text=True, check=False)
    assert listed.returncode == 1
    assert "no disk image found" in listed.stderr
