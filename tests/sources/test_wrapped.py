"""Whatever the image comes wrapped in: bare compressed images, dictzip, a compressed member of a
tar, an image given as it is; each made by the real tool and served through a real mount, byte for byte.
"""

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from kit.ext4 import make_ext4_image, read_payload_through_loop
from kit.fixtures import BootSerial
from kit.httpserver import serve
from kit.mounts import MountFactory, tarfuse_command, unmount
from kit.needs import require_tool
from kit.sample import SampleImage

from tarfuse import mount
from tarfuse.cli import split_mount_options
from tarfuse.sources.compressed import CompressedSource

MiB = 1 << 20

# How each bare compressed image is made: the tool's command (it writes NAME + suffix), and the suffix.
COMPRESSORS: dict[str, tuple[list[str], str]] = {
    "xz-T2": (["xz", "-k", "-T2", "--block-size=1MiB"], ".xz"),  # several blocks: seekable
    "xz-single-block": (["xz", "-k", "-T1"], ".xz"),  # one block: served from a spill
    "zstd": (["zstd", "-q", "-k"], ".zst"),
    "zstd-long": (["zstd", "-q", "-k", "--long"], ".zst"),
    "pzstd": (["pzstd", "-q", "-k", "-p", "2"], ".zst"),
    "gzip": (["gzip", "-k"], ".gz"),
    "pigz": (["pigz", "-k", "-p", "2"], ".gz"),
    "bzip2": (["bzip2", "-k"], ".bz2"),
    "dictzip": (["dictzip", "-k"], ".dz"),
}


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 MiB that start like an MBR disk: random (incompressible) and zero (compressible) stretches."""
    rng = random.Random(14)
    data = bytearray()
    while len(data) < 6 * MiB:
        data += rng.randbytes(300_000) if rng.random() < 0.5 else bytes(500_000)
    data[510:512] = b"\x55\xaa"
    path = tmp_path_factory.mktemp("wrapped") / "disk.img"
    path.write_bytes(bytes(data[: 6 * MiB + 12345]))  # not a whole number of sectors
    return path


def compress(kind: str, image: Path, work: Path) -> Path:
    """Compress a copy of `image` in `work` with the real tool; return the compressed file."""
    command, suffix = COMPRESSORS[kind]
    require_tool(command[0])
    copy = work / image.name
    shutil.copyfile(image, copy)
    subprocess.run([*command, str(copy)], check=True, capture_output=True)
    return copy.with_name(copy.name + suffix)


def run_refused(*args: str | Path, target: Path) -> subprocess.CompletedProcess[str]:
    """Run `tarfuse ARGS...` that is expected to refuse; if it mounts after all, unmount before failing."""
    try:
        return subprocess.run(
            tarfuse_command(*args), capture_output=True, text=True, check=False, timeout=120
        )
    finally:
        unmount(target)


def served_file(mount: MountFactory, archive: Path | str, tmp_path: Path, *options: str) -> Path:
    target = tmp_path / "served"
    target.write_bytes(b"")
    mount(archive, target, *options)
    return target


@pytest.mark.fuse
@pytest.mark.parametrize("kind", COMPRESSORS)
def test_bare_compressed_image_is_served_whole(
    kind: str, raw_image: Path, mount: MountFactory, tmp_path: Path
) -> None:
    compressed = compress(kind, raw_image, tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(compressed, mountpoint, "-o", "index=" + str(tmp_path / "index"))
    assert os.listdir(mountpoint) == ["disk.img"]  # the name without its compression suffix
    assert (mountpoint / "disk.img").read_bytes() == raw_image.read_bytes()


@pytest.mark.fuse
@pytest.mark.parametrize("kind", COMPRESSORS)
def test_bare_compressed_image_over_http(
    kind: str, raw_image: Path, mount: MountFactory, tmp_path: Path
) -> None:
    compressed = compress(kind, raw_image, tmp_path)
    with serve() as server:
        url = server.put(compressed.name, compressed)
        target = served_file(mount, url, tmp_path, "-o", "index=" + str(tmp_path / "index"))
        data = raw_image.read_bytes()
        with target.open("rb") as served:
            for offset in random.Random(3).sample(range(len(data)), 40):
                served.seek(offset)
                assert served.read(4096) == data[offset : offset + 4096]
            served.seek(0)
            assert served.read() == data


@pytest.mark.fuse
def test_second_mount_of_a_bare_gzip_image_takes_its_size_from_the_index(
    raw_image: Path, mount: MountFactory, tmp_path: Path
) -> None:
    compressed = compress("gzip", raw_image, tmp_path)
    index = ("-o", "index=" + str(tmp_path / "disk.index"))
    first = served_file(mount, compressed, tmp_path, *index)
    assert "does not say its size: decompressing it once" in (tmp_path / "served.stderr").read_text()
    assert first.stat().st_size == raw_image.stat().st_size
    subprocess.run(["fusermount3", "-u", str(first)], check=True)
    again = tmp_path / "again"
    again.write_bytes(b"")
    running = mount(compressed, again, *index)
    assert again.read_bytes() == raw_image.read_bytes()
    assert "decompressing it once" not in running.stderr_text()


@pytest.mark.fuse
def test_ext4_in_a_bare_xz_image_through_losetup(mount: MountFactory, tmp_path: Path) -> None:
    payload = random.Random(5).randbytes(300_000)
    image = make_ext4_image(tmp_path / "rootfs.img", payload)
    (tmp_path / "xz").mkdir()
    compressed = compress("xz-T2", image, tmp_path / "xz")
    target = served_file(mount, compressed, tmp_path)
    assert read_payload_through_loop(target, tmp_path / "loop") == payload


def appliance(kind: str, outer: str, image: Path, work: Path, *others: tarfile.TarInfo) -> Path:
    """A tar (compressed with `outer`, or not) holding `image` compressed as `kind`, under images/, and
    the empty members `others`."""
    (work / "src").mkdir()
    member = compress(kind, image, work / "src")
    archive = work / f"appliance.tar{'.' + outer if outer else ''}"
    with tarfile.open(archive, f"w:{outer}") as tar:
        tar.add(member, arcname=f"images/{member.name}")
        for info in others:
            tar.addfile(info)
    return archive


@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["xz-T2", "xz-single-block", "gzip", "zstd", "dictzip"])
@pytest.mark.parametrize("outer", ["", "gz", "xz"])
def test_compressed_member_of_a_tar_is_served_decompressed(
    kind: str, outer: str, raw_image: Path, mount: MountFactory, tmp_path: Path
) -> None:
    archive = appliance(kind, outer, raw_image, tmp_path, tarfile.TarInfo("README"))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(archive, mountpoint, "-o", "index=" + str(tmp_path / "index"))
    assert os.listdir(mountpoint) == ["disk.img"]
    assert (mountpoint / "disk.img").read_bytes() == raw_image.read_bytes()


@pytest.mark.parametrize("kind", ["xz-T2", "gzip", "zstd", "bzip2"])
def test_list_of_a_bare_compressed_image_shows_its_name_format_and_size(
    kind: str, raw_image: Path, tmp_path: Path
) -> None:
    compressed = compress(kind, raw_image, tmp_path)
    listed = subprocess.run(
        tarfuse_command("--list", "--json", compressed), capture_output=True, text=True, check=False
    )
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)["images"]
    assert row["path"] == "disk.img"  # the name without its compression suffix
    assert row["size"] == raw_image.stat().st_size
    assert row["format"] == "raw"


@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["xz-T2", "gzip"])
@pytest.mark.parametrize("outer", ["", "gz"])
def test_compressed_member_of_a_tar_over_http(
    kind: str, outer: str, raw_image: Path, mount: MountFactory, tmp_path: Path
) -> None:
    """file or URL -> decompressed -> member -> decompressed -> image, with the URL at the bottom."""
    archive = appliance(kind, outer, raw_image, tmp_path)
    with serve() as server:
        url = server.put(archive.name, archive)
        target = served_file(mount, url, tmp_path, "-o", "index=" + str(tmp_path / "index"))
        assert target.read_bytes() == raw_image.read_bytes()


def test_list_of_a_tar_shows_its_compressed_member(raw_image: Path, tmp_path: Path) -> None:
    member = compress("xz-T2", raw_image, tmp_path)
    archive = tmp_path / "appliance.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(member, arcname="disk.img.xz")
    listed = subprocess.run(tarfuse_command("--list", archive), capture_output=True, text=True, check=False)
    assert listed.returncode == 0, listed.stderr
    assert "disk.img.xz" in listed.stdout
    assert "raw (xz-compressed, MBR boot sector)" in listed.stdout  # what it decompresses to


def test_compressed_members_share_one_cache_budget(raw_image: Path, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    member = compress("xz-T2", raw_image, tmp_path / "src")
    archive = tmp_path / "appliance.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(member, arcname="disk.img.xz")
    options = split_mount_options(["cache_size=16M", "noindex"])
    assembly = mount.assemble(str(archive), options)
    try:
        outer, (inner,) = assembly.archive, assembly.members
        assert isinstance(outer, CompressedSource)
        assert (outer.cache.capacity, inner.cache.capacity) == (8 * MiB, 8 * MiB)
        assert bytes(assembly.served[0].read(0, 4096)) == raw_image.read_bytes()[:4096]
    finally:
        assembly.close()


def test_gzip_whose_isize_lies_is_one_line(raw_image: Path, tmp_path: Path) -> None:
    compressed = compress("gzip", raw_image, tmp_path)
    data = bytearray(compressed.read_bytes())
    data[-4:] = (len(raw_image.read_bytes()) + 4096).to_bytes(4, "little")
    compressed.write_bytes(bytes(data))
    result = subprocess.run(
        tarfuse_command("--list", compressed, "-o", "noindex"), capture_output=True, text=True, check=False
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert "gzip" in lines[-1]


def test_compressed_member_whose_size_lies_is_one_line(raw_image: Path, tmp_path: Path) -> None:
    # The member's header says fewer bytes than its xz stream has: cut, it cannot decompress.
    (tmp_path / "src").mkdir()
    member = compress("xz-T2", raw_image, tmp_path / "src")
    data = member.read_bytes()
    archive = tmp_path / "appliance.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("disk.img.xz")
        info.size = len(data) // 2
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "mnt").mkdir()
    result = run_refused(archive, tmp_path / "mnt", "-o", "noindex", target=tmp_path / "mnt")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, lines
    assert "xz" in lines[0]
    assert not os.listdir(tmp_path / "mnt")  # nothing mounted


@pytest.mark.fuse
def test_plain_image_given_directly_is_served_with_a_note(
    raw_image: Path, mount: MountFactory, tmp_path: Path
) -> None:
    target = tmp_path / "served"
    target.write_bytes(b"")
    running = mount(raw_image, target)
    assert target.read_bytes() == raw_image.read_bytes()
    assert "is a raw (MBR boot sector) image itself, not an archive" in running.stderr_text()


@pytest.mark.fuse
def test_plain_image_over_http_is_served(raw_image: Path, mount: MountFactory, tmp_path: Path) -> None:
    with serve() as server:
        url = server.put("disk.img", raw_image)
        target = served_file(mount, url, tmp_path)
        assert target.read_bytes() == raw_image.read_bytes()


WHAT_THEY_LOOK_LIKE: dict[str, tuple[Callable[[Path], None], str]] = {
    "zip": (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(2000)), "look like a zip archive (unzip it first)"),
    "html": (lambda p: p.write_bytes(b"<!DOCTYPE html><html>" + bytes(2000)), "look like an HTML page"),
    "text": (
        lambda p: p.write_bytes(b"hello, this is no image\n" * 100),
        "look like text: 'hello, this is n'",
    ),
}


@pytest.mark.parametrize("kind", WHAT_THEY_LOOK_LIKE)
def test_neither_tar_nor_image_is_one_line_saying_what_it_looks_like(kind: str, tmp_path: Path) -> None:
    make, said = WHAT_THEY_LOOK_LIKE[kind]
    path = tmp_path / "download.bin"
    make(path)
    target = tmp_path / "served"
    target.write_bytes(b"")
    result = run_refused(path, target, target=target)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, lines
    assert "not a tar archive, and no disk image either" in lines[0]
    assert said in lines[0]


def test_three_layers_of_compression_are_refused_in_one_line(raw_image: Path, tmp_path: Path) -> None:
    inner = compress("gzip", raw_image, tmp_path)
    (tmp_path / "twice").mkdir()
    twice = tmp_path / "twice" / "disk.img.gz"  # gzip of gzip, named as one layer
    with twice.open("wb") as out:
        subprocess.run(["gzip", "-c", str(inner)], check=True, stdout=out)
    archive = tmp_path / "appliance.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(twice, arcname="disk.img.gz")
    target = tmp_path / "served"
    target.write_bytes(b"")
    result = run_refused(archive, target, "-o", "noindex", target=target)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert lines[-1].endswith(
        "member 'disk.img.gz' decompressed is gzip-compressed again: decompress it first (gunzip) "
        "at archive offset 0"
    )


def test_dictzip_with_a_broken_table_is_one_line(raw_image: Path, tmp_path: Path) -> None:
    compressed = compress("dictzip", raw_image, tmp_path)
    data = bytearray(compressed.read_bytes())
    data[22:24] = (0).to_bytes(2, "little")  # the RA chunk length: 0
    compressed.write_bytes(bytes(data))
    result = subprocess.run(
        tarfuse_command("--list", compressed), capture_output=True, text=True, check=False
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, lines
    assert "dictzip" in lines[0]


def test_truncated_bare_xz_is_one_line(raw_image: Path, tmp_path: Path) -> None:
    compressed = compress("xz-T2", raw_image, tmp_path)
    with compressed.open("r+b") as file:
        file.truncate(compressed.stat().st_size // 2)
    result = subprocess.run(
        tarfuse_command("--list", compressed), capture_output=True, text=True, check=False
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, lines


# ---- every disk of a multi-disk archive --------------------------------------------------------------


def two_disk_archive(
    raw_image: Path,
    tmp_path: Path,
    compression: str = "",
    more: Sequence[tarfile.TarInfo | tuple[str, bytes]] = (),
) -> tuple[Path, bytes, bytes]:
    """An OVA-like tar: a descriptor, disk1.img (the image) and disk2.img (other bytes) under vm/, then
    `more` members (links as TarInfo, files as (name, data))."""
    first = raw_image.read_bytes()
    second = bytes(reversed(first[: 3 * MiB]))[:-2] + b"\x55\xaa"
    archive = tmp_path / f"vm.ova{'.' + compression if compression else ''}"
    files = [("vm.ovf", b"<Envelope/>"), ("vm/disk1.img", first), ("vm/disk2.img", second)]
    with tarfile.open(archive, f"w:{compression}") as tar:
        for entry in [*files, *more]:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
                continue
            info = tarfile.TarInfo(entry[0])
            info.size = len(entry[1])
            tar.addfile(info, io.BytesIO(entry[1]))
    return archive, first, second


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.fuse
def test_every_disk_is_served_on_a_directory_mount_point(
    raw_image: Path, mount: MountFactory, tmp_path: Path
) -> None:
    archive, first, second = two_disk_archive(raw_image, tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(archive, mountpoint)
    assert os.listdir(mountpoint) == ["vm"]
    assert sorted(os.listdir(mountpoint / "vm")) == ["disk1.img", "disk2.img"]
    assert (mountpoint / "vm" / "disk1.img").read_bytes() == first
    assert (mountpoint / "vm" / "disk2.img").read_bytes() == second
    assert os.statvfs(mountpoint).f_files == 4  # the root, vm/ and the two disks


@pytest.mark.fuse
def test_compressed_multi_disk_archive_serves_every_disk_once_indexed(
    raw_image: Path, mount: MountFactory, tmp_path: Path
) -> None:
    # Without an index, finding the second disk means decompressing the whole archive: the first mount
    # serves the first disk at once and names the other; with the index it kept, the next serves both.
    archive, first, second = two_disk_archive(raw_image, tmp_path, "gz")
    index = ("-o", "index=" + str(tmp_path / "vm.index"))
    (mountpoint := tmp_path / "first").mkdir()
    running = mount(archive, mountpoint, *index)
    assert os.listdir(mountpoint) == ["disk1.img"]
    deadline = time.monotonic() + 30
    while "index saved" not in running.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "also holds 'vm/disk2.img'" in running.stderr_text()
    (again := tmp_path / "again").mkdir()
    mount(archive, again, *index)
    assert sorted(os.listdir(again / "vm")) == ["disk1.img", "disk2.img"]
    assert (again / "vm" / "disk1.img").read_bytes() == first
    assert (again / "vm" / "disk2.img").read_bytes() == second


@pytest.mark.fuse
def test_member_still_picks_one_disk(raw_image: Path, mount: MountFactory, tmp_path: Path) -> None:
    archive, _, second = two_disk_archive(raw_image, tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(archive, mountpoint, "-o", "member=vm/disk2.img")
    assert os.listdir(mountpoint) == ["disk2.img"]
    assert (mountpoint / "disk2.img").read_bytes() == second


def test_a_file_mount_point_needs_one_disk_and_lists_them(raw_image: Path, tmp_path: Path) -> None:
    archive, _, _ = two_disk_archive(raw_image, tmp_path)
    target = tmp_path / "served"
    target.write_bytes(b"")
    result = subprocess.run(tarfuse_command(archive, target), capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "holds 2 disk images (vm/disk1.img, vm/disk2.img); choose one with -o member=PATH" in result.stderr


@pytest.mark.fuse
def test_qemu_boots_the_second_disk_of_a_two_disk_ova(
    sample_image: SampleImage, mount: MountFactory, tmp_path: Path, boot_and_read_serial: BootSerial
) -> None:
    archive = tmp_path / "vm.ova"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("disk1.img")
        info.size = 1 * MiB
        tar.addfile(info, io.BytesIO(bytes(510) + b"\x55\xaa" + bytes(MiB - 512)))
        tar.add(sample_image.path, arcname="disk2.img")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(archive, mountpoint)
    serial, qemu = boot_and_read_serial(mountpoint / "disk2.img", sample_image.message)
    assert serial.startswith(sample_image.message), f"COM1: {serial!r}; QEMU: {qemu}"


@pytest.mark.fuse
@pytest.mark.parametrize("wrapping", ["bare .img.xz", "xz member of a tar"])
def test_qemu_boots_the_sample_compressed(
    wrapping: str,
    sample_image: SampleImage,
    mount: MountFactory,
    tmp_path: Path,
    boot_and_read_serial: BootSerial,
) -> None:
    compressed = compress("xz-T2", sample_image.path, tmp_path)
    source = compressed
    if wrapping == "xz member of a tar":
        source = tmp_path / "bundle.tar"
        with tarfile.open(source, "w") as tar:
            tar.add(compressed, arcname="images/disk.raw.xz")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(source, mountpoint, "-o", "index=" + str(tmp_path / "index"))
    serial, qemu = boot_and_read_serial(mountpoint / "disk.raw", sample_image.message)
    assert serial.startswith(sample_image.message), f"COM1: {serial!r}; QEMU: {qemu}"


@pytest.mark.fuse
@pytest.mark.parametrize("compression", ["", "gz"])
def test_all_serves_every_file_so_an_ova_manifest_checks(
    compression: str, raw_image: Path, mount: MountFactory, tmp_path: Path
) -> None:
    first = raw_image.read_bytes()
    second = bytes(reversed(first[: 3 * MiB]))[:-2] + b"\x55\xaa"  # as two_disk_archive makes them
    # an OVA's manifest, and a hard link: tar -x makes it the file it names
    manifest = "".join(
        f"SHA256 ({name}) = {hashlib.sha256(data).hexdigest()}\n"
        for name, data in (("vm/disk1.img", first), ("vm/disk2.img", second))
    ).encode()
    more = [("vm.mf", manifest), link("vm/same-as-disk2.img", "vm/disk2.img", tarfile.LNKTYPE)]
    archive, first, second = two_disk_archive(raw_image, tmp_path, compression, more)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(archive, mountpoint, "-o", "all,noindex")
    assert (mountpoint / "vm.ovf").read_bytes() == b"<Envelope/>"
    assert (mountpoint / "vm" / "disk1.img").read_bytes() == first
    assert (mountpoint / "vm" / "same-as-disk2.img").read_bytes() == second
    checked = subprocess.run(
        ["sha256sum", "-c", "vm.mf"], cwd=mountpoint, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.fuse
def test_all_serves_symlinks_that_stay_inside_and_leaves_out_the_others(
    raw_image: Path, mount: MountFactory, tmp_path: Path
) -> None:
    links = [
        link("vm/current.img", "disk1.img"),  # inside: tar -x makes it, and so does the mount
        link("latest", "vm/current.img"),  # a chain, inside
        link("passwd", "/etc/passwd"),  # absolute: out of the mount
        link("vm/escape", "../../secret"),  # relative, but up and out
    ]
    archive, first, _ = two_disk_archive(raw_image, tmp_path, more=links)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    running = mount(archive, mountpoint, "-o", "all")
    assert os.readlink(mountpoint / "vm" / "current.img") == "disk1.img"
    assert (mountpoint / "latest").read_bytes() == first
    assert not os.path.lexists(mountpoint / "passwd")
    assert not os.path.lexists(mountpoint / "vm" / "escape")
    assert (
        "2 symlink(s) pointing outside the mount are left out: passwd -> /etc/passwd" in running.stderr_text()
    )


@pytest.mark.fuse
def test_dictzip_of_a_tar_is_served(raw_image: Path, mount: MountFactory, tmp_path: Path) -> None:
    require_tool("dictzip")
    archive = tmp_path / "vm.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(raw_image, arcname="disk.img")
    subprocess.run(["dictzip", str(archive)], check=True)  # vm.tar.dz
    served = tmp_path / "served"
    served.write_bytes(b"")
    running = mount(tmp_path / "vm.tar.dz", served)
    assert served.read_bytes() == raw_image.read_bytes()
    listed = subprocess.run(
        tarfuse_command("--list", tmp_path / "vm.tar.dz"), capture_output=True, text=True, check=False
    )
    assert "dictzip-compressed" in listed.stdout
    assert "Traceback" not in running.stderr_text()


@pytest.mark.fuse
def test_compressed_member_known_by_its_content(mount: MountFactory, tmp_path: Path) -> None:
    # No image suffix: rootfs.zst is a candidate because its first bytes decompress to an ext4 superblock.
    payload = random.Random(9).randbytes(200_000)
    image = make_ext4_image(tmp_path / "rootfs", payload)
    subprocess.run(["zstd", "-q", str(image), "-o", str(tmp_path / "rootfs.zst")], check=True)
    archive = tmp_path / "firmware.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "rootfs.zst", arcname="rootfs.zst")
        info = tarfile.TarInfo("notes.txt.gz")  # compressed, but no image inside: not a candidate
        notes = gzip.compress(b"release notes\n" * 100)
        info.size = len(notes)
        tar.addfile(info, io.BytesIO(notes))
    listed = subprocess.run(tarfuse_command("--list", archive), capture_output=True, text=True, check=False)
    assert "raw (zstd-compressed, ext2/3/4 file system)" in listed.stdout
    assert "notes.txt.gz" not in listed.stdout
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(archive, mountpoint, "-o", "noindex")
    assert os.listdir(mountpoint) == ["rootfs"]
    assert (mountpoint / "rootfs").read_bytes() == image.read_bytes()
    assert read_payload_through_loop(mountpoint / "rootfs", tmp_path / "loop") == payload
