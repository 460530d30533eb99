"""Compressed archives through real mounts: bytes, the saved index, QEMU boot, ext4 over a loop device."""

import errno
import gzip
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from kit import tarbuilder as tb
from kit.archives import gce_tarball
from kit.ext4 import make_ext4_image, read_payload_through_loop
from kit.fixtures import BootSerial
from kit.mounts import MountFactory, status_kib, tarfuse_command
from kit.needs import make_archive, require_tool
from kit.sample import SampleImage

pytestmark = pytest.mark.fuse


def test_a_tar_gz_mounts_and_serves_the_original_bytes(
    sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    archive = gce_tarball(sample_image, tmp_path / "image.tar.gz")
    (served := tmp_path / "mnt").mkdir()
    mount(archive, served)
    assert (served / "disk.raw").read_bytes() == sample_image.data


def test_the_second_mount_uses_the_saved_index(
    sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    archive = gce_tarball(sample_image, tmp_path / "image.tar.gz")
    index = tmp_path / "image.tar.gz.tarfuse-index"
    (served := tmp_path / "mnt").mkdir()
    first = mount(archive, served)
    deadline = time.monotonic() + 20
    while not index.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert index.exists(), first.stderr_text()
    first.unmount()
    second = mount(archive, served)
    assert (served / "disk.raw").read_bytes() == sample_image.data
    assert "loaded index" in second.stderr_text()
    assert "index complete" not in second.stderr_text()  # no second pass


@pytest.mark.parametrize(("suffix", "command"), [("zst", ["zstd", "-q"]), ("xz", ["xz", "-T1", "-0"])])
def test_the_second_mount_of_a_one_frame_archive_serves_from_the_spill(
    sample_image: SampleImage, mount: MountFactory, tmp_path: Path, suffix: str, command: list[str]
) -> None:
    require_tool(command[0])
    plain = make_archive("oldgnu", sample_image.path, tmp_path / "image.tar")
    subprocess.run([*command, str(plain)], check=True)  # one zstd frame, one xz block
    archive = tmp_path / f"image.tar.{suffix}"
    spill = tmp_path / f"image.tar.{suffix}.tarfuse-spill.zst"
    (served := tmp_path / "mnt").mkdir()
    first = mount(archive, served)
    deadline = time.monotonic() + 20
    while "index saved" not in first.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spill.exists(), first.stderr_text()
    assert "reads are served from it" in first.stderr_text()
    assert (served / "disk.raw").read_bytes() == sample_image.data
    first.unmount()
    second = mount(archive, served)
    assert (served / "disk.raw").read_bytes() == sample_image.data
    assert f"reads are served from the spill {spill}" in second.stderr_text()
    assert "index complete" not in second.stderr_text()  # no second pass


def test_noindex_keeps_nothing_and_index_chooses_the_place(
    sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    archive = gce_tarball(sample_image, tmp_path / "image.tar.gz")
    (a := tmp_path / "a").mkdir()
    (b := tmp_path / "b").mkdir()
    chosen = tmp_path / "elsewhere" / "x.idx"
    mount(archive, a, "-o", "noindex")
    done = mount(archive, b, "-o", f"index={chosen}")
    deadline = time.monotonic() + 20
    while not chosen.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chosen.exists(), done.stderr_text()
    assert not (tmp_path / "image.tar.gz.tarfuse-index").exists()


def test_list_says_the_compression_and_the_index(sample_image: SampleImage, tmp_path: Path) -> None:
    archive = gce_tarball(sample_image, tmp_path / "image.tar.gz")
    result = subprocess.run(tarfuse_command("--list", archive), capture_output=True, text=True, check=True)
    assert "gzip-compressed, index: none" in result.stdout
    assert "disk.raw" in result.stdout


def test_a_corrupt_region_reads_as_eio(mount: MountFactory, tmp_path: Path) -> None:
    data = random.Random(7).randbytes(12 << 20)
    (image := tmp_path / "data.img").write_bytes(data)
    plain = make_archive("gnu", image, tmp_path / "data.tar")
    compressed = subprocess.run(["gzip", "-1", "-c", str(plain)], capture_output=True, check=True).stdout
    middle = len(compressed) // 2
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(compressed[:middle] + bytes(4096) + compressed[middle + 4096 :])
    (served := tmp_path / "mnt").mkdir()
    live = mount(archive, served, "-o", "noindex")
    # Random data is stored, not Huffman-coded: the damage decodes, and only the CRC at the end of the
    # stream shows it. The background pass finds it; from then on every read fails.
    deadline = time.monotonic() + 20
    while "reads fail from now on" not in live.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    with (served / "data.img").open("rb", buffering=0) as file:
        file.seek(len(data) - 4096)
        with pytest.raises(OSError, match="Input/output error") as info:
            file.read(4096)
    assert info.value.errno == errno.EIO
    assert "decompressed offset" in live.stderr_text()


def test_qemu_boots_from_a_mounted_tar_gz(
    sample_image: SampleImage, mount: MountFactory, tmp_path: Path, boot_and_read_serial: BootSerial
) -> None:
    archive = gce_tarball(sample_image, tmp_path / "image.tar.gz")
    (served := tmp_path / "mnt").mkdir()
    mount(archive, served)
    serial, qemu = boot_and_read_serial(served / "disk.raw", sample_image.message)
    assert serial.startswith(sample_image.message), f"COM1: {serial!r}; QEMU: {qemu}"


def test_ext4_in_a_tar_zst_mounts_through_a_loop_device(mount: MountFactory, tmp_path: Path) -> None:
    require_tool("zstd")
    content = random.Random(5).randbytes(300_000)
    image = make_ext4_image(tmp_path / "ext4.img", content)
    plain = make_archive("gnu", image, tmp_path / "fs.tar")
    subprocess.run(["zstd", "-q", "--rm", str(plain)], check=True)
    (served := tmp_path / "mnt").mkdir()
    mount(tmp_path / "fs.tar.zst", served)
    assert read_payload_through_loop(served / "ext4.img", tmp_path / "inner") == content


# --- a name that occurs more than once (tar -r): tar -x keeps the last copy -------------------------------

COPIES = 3
COPY_SIZE = 1 << 20


def appended_copies(tmp_path: Path, name: str) -> tuple[Path, list[bytes]]:
    """`tar -r` the same path three times with other content, then gzip: archives as tar -r leaves them.

    Each copy is 512 bytes longer than the one before: a mount that has read nothing serves a later copy
    of the same size instead (test_duplicate_member.py); one of another size, whose first size a
    stat may have shown, fails reads as below."""
    tree = tmp_path / "tree"
    (tree / "foo" / "fighter").mkdir(parents=True)
    plain = tmp_path / "ufo.tar"
    contents = []
    for copy in range(COPIES):
        data = random.Random(copy).randbytes(COPY_SIZE + 512 * copy)
        (tree / "foo" / "fighter" / name).write_bytes(data)
        subprocess.run(["tar", "-rf", str(plain), "-C", str(tree), f"foo/fighter/{name}"], check=True)
        contents.append(data)
    subprocess.run(["gzip", "-k", str(plain)], check=True)
    return plain.with_name("ufo.tar.gz"), contents


@pytest.mark.parametrize(("name", "options"), [("ufo.img", ()), ("ufo", ("-o", "member=foo/fighter/ufo"))])
def test_a_compressed_archive_whose_image_is_replaced_later_never_serves_the_first_copy_unsaid(
    mount: MountFactory, tmp_path: Path, name: str, options: tuple[str, ...]
) -> None:
    archive, contents = appended_copies(tmp_path, name)
    (served := tmp_path / "mnt").mkdir()
    first = mount(archive, served, *options)
    log = first.wait_for_log("index saved")
    assert f"a later member named 'foo/fighter/{name}' replaces the one this mount served" in log
    assert "unmount and mount again" in log
    with pytest.raises(OSError, match="Input/output error") as failed:
        (served / name).read_bytes()
    assert failed.value.errno == errno.EIO

    first.unmount()
    second = mount(archive, served, *options)
    assert (served / name).read_bytes() == contents[-1]  # what tar -x leaves
    assert "replaces" not in second.stderr_text()


def test_without_an_index_the_message_says_a_new_mount_would_not_help(
    mount: MountFactory, tmp_path: Path
) -> None:
    archive, _ = appended_copies(tmp_path, "ufo.img")
    (served := tmp_path / "mnt").mkdir()
    mounted = mount(archive, served, "-o", "noindex")
    log = mounted.wait_for_log("replaces the one this mount served")
    assert "a new mount would serve the first copy again: mount it with an index kept" in log
    with pytest.raises(OSError, match="Input/output error") as failed:
        (served / "ufo.img").read_bytes()
    assert failed.value.errno == errno.EIO


def test_damage_after_the_served_member_of_a_compressed_archive_fails_reads(
    mount: MountFactory, tmp_path: Path
) -> None:
    # A plain tar damaged after its image is refused at mount; a compressed one was served before the
    # damage was reached: the pass finds it, and since a later copy may lie beyond, reads fail from then on.
    image = random.Random(4).randbytes(COPY_SIZE)
    tar = tb.archive(tb.file_member("disk.img", image), b"\xff" * 512, tb.file_member("disk.img", b"x" * 512))
    archive = tmp_path / "damaged.tar.gz"
    archive.write_bytes(gzip.compress(tar))
    (served := tmp_path / "mnt").mkdir()
    mounted = mount(archive, served, "-o", "noindex")
    log = mounted.wait_for_log("reads fail from now on")
    assert "the archive is damaged after the member this mount serves (bad header checksum" in log
    with pytest.raises(OSError, match="Input/output error"):
        (served / "disk.img").read_bytes()


def test_a_plain_archive_with_the_image_three_times_serves_the_last(
    mount: MountFactory, tmp_path: Path
) -> None:
    archive, contents = appended_copies(tmp_path, "ufo.img")
    (served := tmp_path / "mnt").mkdir()
    mount(archive.with_suffix(""), served)
    assert (served / "ufo.img").read_bytes() == contents[-1]


MEMORY_CEILING_KIB = 256 * 1024  # the ceiling: any archive, at any point of a mount's life


@pytest.mark.parametrize(("suffix", "command"), [("gz", ["gzip", "-1"]), ("zst", ["zstd", "-q", "-1"])])
def test_a_live_mount_stays_under_the_memory_ceiling_through_its_life(
    mount: MountFactory, tmp_path: Path, suffix: str, command: list[str]
) -> None:
    """The ceiling held by a mount, not only by --list and the fuzzer (which mounts nothing): a 160 MiB
    image that does not compress, read whole while the indexing pass runs, then at random until the
    chunk cache has turned over, then whole again; the daemon's peak RSS (VmHWM) stays under 256 MiB."""
    require_tool(command[0])
    image = tmp_path / "disk.raw"
    with image.open("wb") as out:
        for _ in range(160):
            out.write(random.randbytes(1 << 20))
    plain = make_archive("gnu", image, tmp_path / "vm.tar")
    image.unlink()
    archive = tmp_path / f"vm.tar.{suffix}"
    with plain.open("rb") as source, archive.open("wb") as out:
        subprocess.run([*command, "-c"], stdin=source, stdout=out, check=True)
    plain.unlink()
    (served := tmp_path / "mnt").mkdir()
    daemon = mount(archive, served)
    served_image = served / "disk.raw"
    rng = random.Random(7)
    with served_image.open("rb", buffering=0) as reader:
        while reader.read(1 << 20):
            pass
        size = served_image.stat().st_size
        for _ in range(2000):
            reader.seek(rng.randrange(0, size - (1 << 16)))
            reader.read(1 << 16)
        os.posix_fadvise(reader.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        reader.seek(0)
        while reader.read(1 << 20):
            pass
    peak = status_kib(daemon.process.pid, "VmHWM")
    assert peak < MEMORY_CEILING_KIB, f"peak RSS {peak // 1024} MiB"
