"""Seed archives for the fuzzer, written by real tar programs into a scratch directory.

GNU tar (gnu, oldgnu, posix with sparse 0.0/0.1/1.0, a 9 GiB sparse image), bsdtar (pax) and Python's
tarfile (ustar, pax, gnu), over one small tree: a sparse disk image, long names (ustar prefix, GNU 'L',
PAX path), a hard link, a symlink, directories. GNU tar and bsdtar also append changed copies of the
image with `-r`, so that it is in the archive two or three times. The committed GNU tar fixtures in
tests/data join them. Every seed is a few KiB to a few hundred KiB, and the same bytes on every run (see
`_normalize`).
"""

import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from kit import sparsegen
from kit import tarbuilder as tb
from tarfuse.tar.header import checksum_ok

DATA_DIR = Path(__file__).parents[2] / "data"  # tests/data
MTIME = 1_700_000_000
GIB = 1 << 30
# vm/disk.img: eight 4 KiB runs (the filesystem's hole granularity), the first one with an MBR signature;
# nine map entries with GNU tar's closing (size, 0), so old GNU needs one extension block.
DISK = sparsegen.Layout(320 * 1024 + 1000, tuple((o * 4096, 4096) for o in (0, 2, 10, 17, 30, 44, 60, 77)))
BIG = sparsegen.Layout(9 * GIB, ((0, 4096), (4 * GIB, 4096), (9 * GIB - 8192, 4096)))
PREFIX_NAME = "vm/" + "a" * 80 + "/" + "b" * 60 + ".txt"  # fits ustar only split into prefix + name
LONG_NAME = "vm/" + "c" * 120 + ".txt"  # no ustar split fits: GNU 'L' or PAX path

_GNU_COMMON = ["--sparse", "--owner=0", "--group=0", "--numeric-owner", f"--mtime=@{MTIME}"]
_POSIX = ["--format=posix", "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime"]
# name -> (program and options, tree); bsdtar re-archives the gnu seed, so no ctime or inode gets in.
_COMMANDS: dict[str, tuple[list[str], str]] = {
    "gnutar-gnu": (["tar", "--format=gnu", *_GNU_COMMON], "disk"),
    "gnutar-oldgnu": (["tar", "--format=oldgnu", *_GNU_COMMON], "disk"),
    "gnutar-pax0.0": (["tar", *_POSIX, "--sparse-version=0.0", *_GNU_COMMON], "disk"),
    "gnutar-pax0.1": (["tar", *_POSIX, "--sparse-version=0.1", *_GNU_COMMON], "disk"),
    "gnutar-pax1.0": (
        ["tar", *_POSIX, "--pax-option=comment=tarfuse fuzz seed", "--sparse-version=1.0", *_GNU_COMMON],
        "disk",
    ),
    "gnutar-gnu-9g": (["tar", "--format=gnu", *_GNU_COMMON], "big"),
    "gnutar-pax1.0-9g": (["tar", *_POSIX, "--sparse-version=1.0", *_GNU_COMMON], "big"),
}
# name -> (program and options, times the image is in the archive): created, then the image changed and
# appended with -r (tar -x keeps the last copy). GNU tar 1.34 appends to a posix archive without --sparse.
_APPENDED: dict[str, tuple[list[str], int]] = {
    "gnutar-gnu-appended": (["tar", "--format=gnu", *_GNU_COMMON], 3),
    "gnutar-pax1.0-appended": (["tar", *_POSIX, "--sparse-version=1.0", *_GNU_COMMON], 2),
}
_TARFILE_FORMATS = {
    "tarfile-ustar": tarfile.USTAR_FORMAT,
    "tarfile-pax": tarfile.PAX_FORMAT,
    "tarfile-gnu": tarfile.GNU_FORMAT,
}


@dataclass(frozen=True, slots=True)
class Seed:
    """One unmutated archive and the program that wrote it."""

    name: str
    data: bytes


def make_seeds(work: Path) -> list[Seed]:
    """Write every seed archive under `work` (which must exist) and return them, in a fixed order.

    Raises:
        FileNotFoundError: GNU tar or bsdtar is not installed.
    """
    trees = {"disk": work / "disk", "big": work / "big", "small": work / "small"}
    _make_tree(trees["disk"], DISK)
    _make_tree(trees["big"], BIG, image="big.img")
    _make_tree(trees["small"], sparsegen.Layout(16 * 1024, ((0, 16 * 1024),)))
    seeds = []
    for name, (command, tree) in _COMMANDS.items():
        path = work / f"{name}.tar"
        _run([*command, "-cf", str(path), "-C", str(trees[tree]), "vm"])
        seeds.append(Seed(name, _normalize(path.read_bytes())))
    bsdtar = work / "bsdtar-pax.tar"
    _run(["bsdtar", "--format=pax", "-cf", str(bsdtar), f"@{work / 'gnutar-gnu.tar'}"])
    seeds.append(Seed("bsdtar-pax", bsdtar.read_bytes()))
    seeds += [_tarfile_seed(name, fmt, trees["small"]) for name, fmt in _TARFILE_FORMATS.items()]
    seeds += [_appended_seed(work, name, *how) for name, how in _APPENDED.items()]
    bsdtar = work / "bsdtar-pax-appended.tar"  # from an archive, as above: no ctime or inode gets in
    _run(["bsdtar", "--format=pax", "-cf", str(bsdtar), f"@{work / 'gnutar-gnu-appended.tar'}"])
    seeds.append(Seed("bsdtar-pax-appended", bsdtar.read_bytes()))
    seeds += [Seed(f"fixture-{p.stem}", p.read_bytes()) for p in sorted(DATA_DIR.glob("*.tar"))]
    return seeds


def _make_tree(top: Path, layout: sparsegen.Layout, image: str = "disk.img") -> None:
    """vm/IMAGE (sparse, MBR-signed) beside text files with long names, a hard link and a symlink."""
    vm = top / "vm"
    (vm / PREFIX_NAME.split("/")[1]).mkdir(parents=True)
    with open(vm / image, "wb") as f:  # not sparsegen.write_sparse_file: it builds the image in memory
        for seed, (offset, length) in enumerate(layout.extents):
            os.pwrite(f.fileno(), sparsegen.fill(length, seed), offset)
        os.pwrite(f.fileno(), b"\x55\xaa", 510)  # an MBR signature: sniffable without its name
        f.truncate(layout.size)
    (vm / "notes.txt").write_text("not the image\n")
    (top / PREFIX_NAME).write_text("a name split into ustar prefix and name\n")
    (top / LONG_NAME).write_text("a name longer than any ustar field\n")
    os.link(vm / image, vm / "disk.hardlink")
    (vm / "current").symlink_to(image)
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            os.utime(os.path.join(directory, name), (MTIME, MTIME), follow_symlinks=False)


def _appended_seed(work: Path, name: str, command: list[str], copies: int) -> Seed:
    """An archive of the disk tree, then `copies - 1` times: change the image, append it with -r."""
    tree, path = work / name, work / f"{name}.tar"
    _make_tree(tree, DISK)
    _run([*command, "-cf", str(path), "-C", str(tree), "vm"])
    image = tree / "vm" / "disk.img"
    for copy in range(1, copies):
        with open(image, "r+b") as f:  # a data run of its own, changed in place: the holes stay holes
            os.pwrite(f.fileno(), sparsegen.fill(4096, 100 + copy), DISK.extents[copy][0])
        os.utime(image, (MTIME + copy, MTIME + copy))
        _run([*command, "-rf", str(path), "-C", str(tree), "vm/disk.img"])
    return Seed(name, _normalize(path.read_bytes()))


def _run(command: list[str]) -> None:
    if shutil.which(command[0]) is None:
        raise FileNotFoundError(f"{command[0]} is not installed (make deps installs it)")
    subprocess.run(command, check=True, capture_output=True)


def _tarfile_seed(name: str, fmt: int, tree: Path) -> Seed:
    path = tree.parent / f"{name}.tar"
    gnu_or_pax = fmt != tarfile.USTAR_FORMAT

    def adjust(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not gnu_or_pax and info.name == LONG_NAME:
            return None  # ustar cannot store it at all
        if gnu_or_pax and info.name == "vm/notes.txt":
            info.uid = 3_000_000  # past 7 octal digits: base-256 in GNU, a PAX uid record in PAX
        return info

    pax_headers = {"comment": "tarfuse fuzz seed"} if fmt == tarfile.PAX_FORMAT else None
    with tarfile.open(path, "w", format=fmt, pax_headers=pax_headers) as tar:
        tar.add(tree / "vm", arcname="vm", filter=adjust)
    return Seed(name, path.read_bytes())


_PSEUDO_NAME = re.compile(rb"GNUSparseFile\.[0-9]+/")


def _normalize(data: bytes) -> bytes:
    """Make GNU tar's output the same on every run: the PID in PAX 0.1/1.0 pseudo names, global header time.

    GNU tar names the ustar header of a PAX 0.1/1.0 sparse member "GNUSparseFile.%p/NAME", and gives a
    global header the current time; both are rewritten (and the header re-signed), nothing else.
    """
    out = bytearray(data)
    for start in range(0, len(out) - tb.BLOCK + 1, tb.BLOCK):
        block = out[start : start + tb.BLOCK]
        if block[257:262] != b"ustar" or not checksum_ok(bytes(block)):
            continue  # not a header block (data, map, extension block)
        name = _PSEUDO_NAME.sub(b"GNUSparseFile.0/", block[:100].rstrip(b"\0"))
        block[:100] = name.ljust(100, b"\0")
        if block[156] == ord("g"):
            block[136:148] = tb.octal(MTIME, 12)
        out[start : start + tb.BLOCK] = tb.set_checksum(block)
    return bytes(out)
