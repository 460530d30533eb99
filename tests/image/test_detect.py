"""detect + image: which member is the image, what format it is, and compressed archives refused."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from kit import tarbuilder as tb

from tarfuse.errors import CompressedArchive, NoImage
from tarfuse.image import detect
from tarfuse.image.open import list_images
from tarfuse.sources.compression import check_uncompressed

OTHERS = [("README", b"read me\n"), ("etc/config.txt", b"x = 1\n" * 200)]


def qemu_image(tmp_path: Path, fmt: str, *options: str) -> bytes:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img is not installed (apt-get install qemu-utils)")
    path = tmp_path / f"image.{fmt}"
    subprocess.run([qemu_img, "create", "-q", "-f", fmt, *options, path, "64M"], check=True)
    return path.read_bytes()


def iso_image() -> bytes:
    """The smallest thing ISO 9660 detection needs: a primary volume descriptor at sector 16."""
    image = bytearray(0x8800)
    image[0x8000:0x8007] = b"\x01CD001\x01"
    return bytes(image)


def mbr_image() -> bytes:
    image = bytearray(64 * 1024)
    image[446:462] = b"\x80" + bytes(3) + b"\x83" + bytes(3) + (2048).to_bytes(4, "little") + bytes(4)
    image[510:512] = b"\x55\xaa"
    return bytes(image)


def gpt_image() -> bytes:
    image = bytearray(mbr_image())
    image[450] = 0xEE  # protective MBR
    image[512:520] = b"EFI PART"
    return bytes(image)


@pytest.mark.parametrize(
    "name", ["vm/DISK.IMG", "a.Qcow2", "b.raw", "c.qcow", "d.vmdk", "e.vdi", "f.vhd", "g.VHDX", "h.iso"]
)
def test_candidate_by_suffix_ignores_case(name: str) -> None:
    data = tb.with_tarfile(*OTHERS, (name, b"not really an image"))
    image = tb.open_bytes(data)
    assert image.name == name
    assert image.format == detect.RAW  # named, so not sniffed; nothing recognised


@pytest.mark.parametrize(
    ("fmt", "options", "driver"),
    [
        ("qcow2", (), "qcow2"),
        ("qcow", (), "qcow"),
        ("vmdk", (), "vmdk"),
        ("vdi", (), "vdi"),
        ("vhdx", (), "vhdx"),
        ("vpc", (), "vpc"),
        ("vpc", ("-o", "subformat=fixed"), "vpc"),
    ],
)
def test_candidate_by_magic(tmp_path: Path, fmt: str, options: tuple[str, ...], driver: str) -> None:
    content = qemu_image(tmp_path, fmt, *options)
    data = tb.with_tarfile(*OTHERS, ("var/lib/vm/blob", content), ("z", b"z" * 600))
    image = tb.open_bytes(data)
    assert image.name == "var/lib/vm/blob"
    assert image.format.driver == driver
    assert image.mapper.read(0, len(content)) == content


@pytest.mark.parametrize(
    ("content", "detail"),
    [(iso_image(), "ISO 9660"), (gpt_image(), "GPT partition table"), (mbr_image(), "MBR boot sector")],
)
def test_raw_candidate_by_magic(content: bytes, detail: str) -> None:
    image = tb.open_bytes(tb.with_tarfile(*OTHERS, ("boot", content)))
    assert (image.name, image.format) == ("boot", detect.ImageFormat("raw", detail))


def test_suffix_match_wins_over_magic() -> None:
    data = tb.with_tarfile(("blob", mbr_image()), ("disk.img", b"x" * 1024))
    assert tb.open_bytes(data).name == "disk.img"


def test_format_of_a_named_image_is_detected() -> None:
    image = tb.open_bytes(tb.with_tarfile(*OTHERS, ("cd.iso", iso_image())))
    assert str(image.format) == "raw (ISO 9660)"


def test_small_files_are_not_sniffed() -> None:
    # Fewer than 512 bytes is no disk: a 2-byte file ending in 55 AA is not an MBR.
    with pytest.raises(NoImage):
        tb.open_bytes(tb.with_tarfile(("tiny", b"\x55\xaa"), ("README", b"r")))


def test_several_candidates() -> None:
    data = tb.with_tarfile(*OTHERS, ("a.img", b"a"), ("b/c.QCOW2", b"c"))
    with pytest.raises(NoImage, match=r"2 disk images \(a\.img, b/c\.QCOW2\)") as info:
        tb.open_bytes(data)
    assert "-o member=" in str(info.value)


def test_many_candidates_are_summarised() -> None:
    data = tb.with_tarfile(*[(f"disk{i:02}.img", b"d") for i in range(14)])
    with pytest.raises(NoImage, match=r"14 disk images \(disk00\.img, .*disk09\.img and 4 more\)"):
        tb.open_bytes(data)


def test_several_candidates_by_magic() -> None:
    data = tb.with_tarfile(("one", mbr_image()), ("two", iso_image()))
    with pytest.raises(NoImage, match=r"2 disk images \(one, two\).*-o member="):
        tb.open_bytes(data)


def test_no_candidate_lists_the_first_members() -> None:
    files = [(f"file{i}.txt", b"text") for i in range(8)]
    with pytest.raises(NoImage) as info:
        tb.open_bytes(tb.with_tarfile(*files))
    message = str(info.value)
    assert "'file0.txt', 'file1.txt', 'file2.txt', 'file3.txt', 'file4.txt' and 3 more" in message
    assert "-o member=" in message
    assert "*.qcow2" in message


def test_no_files_at_all() -> None:
    data = tb.with_tarfile(tb.tarinfo("dir", b"5"))
    with pytest.raises(NoImage, match="no regular files"):
        tb.open_bytes(data)


def test_list_images() -> None:
    data = tb.with_tarfile(*OTHERS, ("a.img", mbr_image()), ("b.iso", iso_image()))
    images = list_images(tb.read_at_of(data), len(data))
    assert [(i.name, i.format.detail) for i in images] == [
        ("a.img", "MBR boot sector"),
        ("b.iso", "ISO 9660"),
    ]


COMPRESSORS = [
    ("gzip", ["gzip", "-c"], b"\x1f\x8b\x08"),
    ("bzip2", ["bzip2", "-c"], b"BZh9"),
    ("xz", ["xz", "-c"], b"\xfd7zXZ\x00"),
    ("zstd", ["zstd", "-q", "-c"], b"\x28\xb5\x2f\xfd"),
    ("lz4", ["lz4", "-q", "-c"], b"\x04\x22\x4d\x18"),
    ("lzip", ["lzip", "-c"], b"LZIP"),
    ("compress (.Z)", ["compress", "-c"], b"\x1f\x9d"),
]


@pytest.mark.parametrize(("name", "command", "magic"), COMPRESSORS, ids=[c[0] for c in COMPRESSORS])
def test_compressed_archive(name: str, command: list[str], magic: bytes) -> None:
    plain = tb.with_tarfile(("disk.img", b"x" * 5000))
    if shutil.which(command[0]):
        compressed = subprocess.run(command, input=plain, capture_output=True, check=True).stdout
        assert compressed.startswith(magic)
    else:  # the tool is missing: the magic number is all that detection looks at
        compressed = magic + plain
    with pytest.raises(CompressedArchive, match=re.escape(f"{name}-compressed")) as info:
        tb.open_bytes(compressed)
    assert info.value.offset == 0


def test_uncompressed_archive_passes() -> None:
    check_uncompressed(tb.with_tarfile(("a", b"a"))[:16])
