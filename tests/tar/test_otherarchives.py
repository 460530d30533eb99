"""Archives that tar programs forgive: each served as GNU tar -x leaves it, or refused with the reason.

Every case is built here, with GNU tar, tarfile or header bytes, and the served bytes are compared with
the file that `tar -x` (GNU tar 1.34) extracts; a few cases go through a real mount as well. Beside each
case: what GNU tar, bsdtar 3.6 (libarchive) and tarfile (Python 3.11) do with it, as run by hand.
"""

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from kit import tarbuilder as tb
from kit.mounts import MountFactory, tarfuse_command
from kit.needs import require_tool

from tarfuse.errors import BadHeader, NoImage
from tarfuse.tar import archive
from tarfuse.tar.archive import Member, scan_members

IMAGE = bytes(range(256)) * 9 + b"the end"  # 2311 bytes: not a whole number of blocks
HEADER_MTIME = 1_700_000_000  # what tarbuilder writes in every header

# typeflag -> (name, linkname) of a member of each type that carries no data
NO_DATA = {
    b"1": ("hardlink", "ufo"),
    b"2": ("symlink", "ufo"),
    b"3": ("chardev", ""),
    b"4": ("blockdev", ""),
    b"5": ("directory/", ""),
    b"6": ("fifo", ""),
}


def served(data: bytes, wanted: str | None = None) -> tuple[str, bytes]:
    image = tb.open_bytes(data, wanted)
    return image.name, image.mapper.read(0, image.mapper.size + 1)


def members(data: bytes) -> list[Member]:
    return list(scan_members(tb.read_at_of(data), len(data)))


def gnu_tar_extracts(data: bytes, name: str, tmp_path: Path) -> bytes | None:
    """What `tar -x` leaves at `name`: the file's bytes, or None if no regular file is there."""
    require_tool("tar")
    work = tmp_path / f"gnutar{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    (work / "archive.tar").write_bytes(data)
    (work / "out").mkdir()
    subprocess.run(["tar", "-xf", "../archive.tar"], cwd=work / "out", capture_output=True, check=False)
    path = work / "out" / name
    return path.read_bytes() if path.is_file() and not path.is_symlink() else None


def mounted_file(mount: MountFactory, data: bytes, tmp_path: Path, *options: str) -> Path:
    """Mount `data` on a file mount point (the image itself) and return the mount point."""
    archive_path = tmp_path / "archive.tar"
    archive_path.write_bytes(data)
    target = tmp_path / "served"
    target.write_bytes(b"")
    mount(archive_path, target, *options)
    return target


# ---- headers whose size field is not data ----------------------------------------------------------
# Some old tars write a size for hard links; GNU tar lists the link with size 0 and extracts fine.
# GNU tar -x, bsdtar and tarfile: no data for 1-6, the next header follows at once (GNU tar -t does skip
# the size of 2, 3, 4 and 6, and says "Skipping to next header"). '5' was right before the others were.


@pytest.mark.parametrize("typeflag", NO_DATA, ids=[name for name, _ in NO_DATA.values()])
def test_size_field_of_a_type_without_data_is_not_skipped(typeflag: bytes, tmp_path: Path) -> None:
    name, linkname = NO_DATA[typeflag]
    data = tb.archive(
        tb.file_member("ufo", b"ufo's data"),
        tb.header(name, size=321, typeflag=typeflag, linkname=linkname),  # no data follows
        tb.file_member("disk.img", IMAGE),
    )
    assert served(data) == ("disk.img", IMAGE)
    assert gnu_tar_extracts(data, "disk.img", tmp_path) == IMAGE


@pytest.mark.parametrize("typeflag", NO_DATA, ids=[name for name, _ in NO_DATA.values()])
def test_size_field_of_a_type_without_data_at_the_archive_end(typeflag: bytes, tmp_path: Path) -> None:
    # Before: "needs 321 bytes of data but the archive ends at 3584" (no end-of-archive blocks here).
    name, linkname = NO_DATA[typeflag]
    data = tb.archive(
        tb.file_member("ufo.img", IMAGE),
        tb.header(name, size=321, typeflag=typeflag, linkname=linkname.replace("ufo", "ufo.img")),
        end=False,
    )
    assert served(data, "ufo.img") == ("ufo.img", IMAGE)
    assert gnu_tar_extracts(data, "ufo.img", tmp_path) == IMAGE


@pytest.mark.fuse
def test_hard_link_with_a_size_serves_its_target(mount: MountFactory, tmp_path: Path) -> None:
    data = tb.archive(
        tb.file_member("store/blob", IMAGE),
        tb.header("vm/disk.img", size=321, typeflag=b"1", linkname="store/blob"),
        tb.file_member("vm/notes.txt", b"after the link\n"),
    )
    assert gnu_tar_extracts(data, "vm/disk.img", tmp_path) == IMAGE
    assert mounted_file(mount, data, tmp_path).read_bytes() == IMAGE


def test_pax_hard_link_that_has_its_data_is_refused_with_the_reason(tmp_path: Path) -> None:
    # POSIX 2001 lets a pax hard link carry data. bsdtar reads it (and writes it into the target too);
    # GNU tar reads no data for a hard link, "Skipping to next header"; tarfile stops there, silently.
    # The programs disagree on the file's bytes: refused, and the message says why.
    data = tb.archive(
        tb.file_member("ufo.img", IMAGE),
        tb.pax_header([("size", "321")]),
        tb.header("link.img", typeflag=b"1", linkname="ufo.img") + tb.pad(b"L" * 321),
        tb.file_member("after.txt", b"after\n"),
    )
    with pytest.raises(
        BadHeader, match=r"after 'link\.img', whose size of 321 bytes GNU tar does not"
    ) as info:
        tb.open_bytes(data, "ufo.img")
    assert info.value.offset == (1 + 5 + 2 + 1) * 512  # the link's would-be data, after its header
    assert gnu_tar_extracts(data, "link.img", tmp_path) == IMAGE


@pytest.mark.parametrize("typeflag", [b"7", b"D"], ids=["contiguous", "gnu-dumpdir"])
def test_size_field_of_contiguous_files_and_directory_dumps_is_data(typeflag: bytes, tmp_path: Path) -> None:
    # '7' is a regular file for all three. GNU 'D' holds the directory's list of names: GNU tar and bsdtar
    # make a directory, tarfile a regular file of those names; all skip the data.
    listing = b"Ydisk.img\0Nold\0\0"
    data = tb.archive(
        tb.header("dump/", size=len(listing), typeflag=typeflag, magic=tb.GNU) + tb.pad(listing),
        tb.file_member("disk.img", IMAGE, typeflag=typeflag if typeflag == b"7" else b"0"),
    )
    assert served(data) == ("disk.img", IMAGE)
    assert gnu_tar_extracts(data, "disk.img", tmp_path) == IMAGE


# ---- a hard link to its own name ----------------------------------------------------------------------
# GNU tar and tarfile extract the file intact; bsdtar too, saying "Skipping hardlink pointing to itself"
# (exit 1), except when the link spells the name differently ("./ufo"): it removes ufo, then cannot link.


@pytest.mark.parametrize(
    "links",
    [["disk.img"], ["disk.img", "disk.img"], ["./disk.img"]],
    ids=["one", "two", "dot-slash"],
)
def test_hard_link_to_its_own_name_keeps_the_file(links: list[str], tmp_path: Path) -> None:
    data = tb.archive(
        tb.file_member("disk.img", IMAGE),
        *[tb.header("disk.img", typeflag=b"1", linkname=link) for link in links],
    )
    assert served(data) == ("disk.img", IMAGE)
    assert gnu_tar_extracts(data, "disk.img", tmp_path) == IMAGE


def test_link_to_a_file_that_linked_to_itself(tmp_path: Path) -> None:
    data = tb.archive(
        tb.file_member("store/blob", IMAGE),
        tb.header("store/blob", typeflag=b"1", linkname="store/blob"),
        tb.header("disk.img", typeflag=b"1", linkname="store/blob"),
    )
    assert served(data) == ("disk.img", IMAGE)
    assert gnu_tar_extracts(data, "disk.img", tmp_path) == IMAGE


def test_hard_link_to_its_own_name_alone_is_no_file(tmp_path: Path) -> None:
    # GNU tar: "Cannot hard link to 'disk.img'", bsdtar skips it, tarfile: KeyError. Nothing to serve.
    data = tb.archive(tb.header("disk.img", typeflag=b"1", linkname="disk.img"))
    with pytest.raises(NoImage, match="no regular files"):
        tb.open_bytes(data)
    assert gnu_tar_extracts(data, "disk.img", tmp_path) is None


@pytest.mark.fuse
def test_gnu_tar_archive_naming_the_image_twice(mount: MountFactory, tmp_path: Path) -> None:
    # `tar -cf x.tar disk.img disk.img` stores the second as "disk.img link to disk.img".
    require_tool("tar")
    source = tmp_path / "src"
    source.mkdir()
    (source / "disk.img").write_bytes(IMAGE)
    made = tmp_path / "made.tar"
    subprocess.run(["tar", "-cf", made, "-C", source, "disk.img", "disk.img"], check=True)
    data = made.read_bytes()
    assert [(m.kind, m.linkname) for m in members(data)] == [("file", ""), ("hardlink", "disk.img")]
    assert gnu_tar_extracts(data, "disk.img", tmp_path) == IMAGE
    assert mounted_file(mount, data, tmp_path).read_bytes() == IMAGE


# ---- metadata that does not parse is no reason to refuse the image ----------------------------------
# The mtime does not change the bytes served: a bad one falls back (PAX to the header's, the header's to
# 0) with one warning on the member, which the CLI logs. What the others make of each PAX mtime:
#   999xxx9324, 1748089464.951928467a, 12.x: GNU tar and bsdtar read the digits before the garbage (999,
#       1748089464.951928467, 12), silently; tarfile uses 0.
#   "", --1, +5: GNU tar "Malformed extended header: invalid mtime=...", the header's (exit 2); bsdtar 0;
#       tarfile 0 ("+5": 5).
#   99999999999999999999 and -99999999999999999999: GNU tar "is out of range", the header's (exit 2);
#       bsdtar clamps (15032385535, -2147483648); tarfile raises OverflowError at utime and stops.

NOT_A_NUMBER = ["999xxx9324", "1748089464.951928467a", "12.x", "", "--1", "+5", "1e9", "\u0661\u0662"]
OUT_OF_RANGE = ["99999999999999999999", "-99999999999999999999", "1" * 5000, str(archive.MAX_MTIME + 1)]


@pytest.mark.parametrize("value", NOT_A_NUMBER + OUT_OF_RANGE)
def test_unusable_pax_mtime_falls_back_to_the_header(value: str, tmp_path: Path) -> None:
    pax = tb.pax_header([("mtime", value)])
    data = tb.archive(pax, tb.file_member("disk.img", IMAGE))
    (member,) = members(data)
    assert member.mtime == HEADER_MTIME
    (warning,) = member.warnings
    why = "out of range" if value in OUT_OF_RANGE else "not a number"
    assert f"PAX mtime={value[:40]!r} is {why}" in warning
    assert warning.endswith(f"the header's mtime {HEADER_MTIME} as its mtime, at archive offset {len(pax)}")
    assert served(data) == ("disk.img", IMAGE)
    assert gnu_tar_extracts(data, "disk.img", tmp_path) == IMAGE


@pytest.mark.parametrize(
    ("field", "why"),
    [(b"zzzzzzzzzzz\0", "not a number"), (tb.base256(2**80, 12), "out of range")],
    ids=["garbage", "base256-huge"],
)
def test_unusable_header_mtime_is_0(field: bytes, why: str, tmp_path: Path) -> None:
    # GNU tar: "Archive contains 'zzzzzzzzzzz' where numeric time_t value expected" or "Archive base-256
    # value is out of time_t range", -1, exit 2. bsdtar refuses the garbage ("Unrecognized archive
    # format") and clamps the other; tarfile refuses the garbage ("invalid header") and raises
    # OverflowError at utime on the other.
    data = tb.archive(tb.file_member("disk.img", IMAGE, fields={136: field}))
    (member,) = members(data)
    assert (member.mtime, len(member.warnings)) == (0, 1)
    assert f"the header's mtime is {why}" in member.warnings[0]
    assert "; serving 0 (1970-01-01) as its mtime, at archive offset 0" in member.warnings[0]
    assert served(data) == ("disk.img", IMAGE)
    assert gnu_tar_extracts(data, "disk.img", tmp_path) == IMAGE


def test_unusable_pax_and_header_mtime_is_0() -> None:
    pax = tb.pax_header([("mtime", "soon")])
    data = tb.archive(pax, tb.file_member("disk.img", IMAGE, fields={136: b"later\0"}))
    (member,) = members(data)
    assert member.mtime == 0
    assert member.warnings == (
        "member 'disk.img': PAX mtime='soon' is not a number; serving 0 (1970-01-01) as its mtime, "
        "at archive offset 1024",
    )


@pytest.mark.parametrize(
    "record",
    [
        ("atime", "99x"),
        ("ctime", "-"),
        ("uid", "x1"),
        ("gid", "99999999999999999999999"),
        ("uname", "\udcff\udcfe"),
        ("SCHILY.xattr.user.blob", "\udc80binary"),
        ("LIBARCHIVE.creationtime", "never"),
    ],
    ids=lambda r: r[0] if isinstance(r, tuple) else r,
)
def test_metadata_tarfuse_does_not_use_is_not_read(record: tuple[str, str], tmp_path: Path) -> None:
    # GNU tar warns for uid=x1 ("Malformed extended header", exit 2), bsdtar for a uname that is not
    # UTF-8 (exit 1); both extract the file, as tarfile does.
    data = tb.archive(tb.pax_header([record]), tb.file_member("disk.img", IMAGE))
    (member,) = members(data)
    assert (member.mtime, member.warnings) == (HEADER_MTIME, ())
    assert served(data) == ("disk.img", IMAGE)
    assert gnu_tar_extracts(data, "disk.img", tmp_path) == IMAGE


@pytest.mark.fuse
@pytest.mark.parametrize("value", ["1748089464.951928467a", "99999999999999999999"])
def test_unusable_pax_mtime_through_a_mount(value: str, mount: MountFactory, tmp_path: Path) -> None:
    # Before: the first refused the archive, the second crashed the daemon at the first stat.
    data = tb.archive(tb.pax_header([("mtime", value)]), tb.file_member("disk.img", IMAGE))
    archive_path = tmp_path / "archive.tar"
    archive_path.write_bytes(data)
    target = tmp_path / "served"
    target.write_bytes(b"")
    running = mount(archive_path, target)
    assert os.stat(target).st_mtime == HEADER_MTIME
    assert target.read_bytes() == IMAGE
    assert (
        f"tarfuse: {archive_path}: warning: member 'disk.img': PAX mtime={value!r}" in running.stderr_text()
    )


def test_unusable_mtime_is_a_warning_of_list(tmp_path: Path) -> None:
    archive_path = tmp_path / "archive.tar"
    archive_path.write_bytes(
        tb.archive(tb.pax_header([("mtime", "soon")]), tb.file_member("disk.img", IMAGE))
    )
    listed = subprocess.run(
        tarfuse_command("--list", archive_path), capture_output=True, text=True, check=False
    )
    assert listed.returncode == 0, listed.stderr
    assert "disk.img" in listed.stdout
    assert listed.stderr == (
        f"tarfuse: {archive_path}: warning: member 'disk.img': PAX mtime='soon' is not a number; serving the "
        f"header's mtime {HEADER_MTIME} as its mtime, at archive offset 1024\n"
    )


# ---- a name that occurs twice -------------------------------------------------------------------------


def test_name_appended_three_times_serves_the_last_copy(tmp_path: Path) -> None:
    # tar -r appends; tar -x (GNU tar, bsdtar, tarfile) leaves the last copy. The walk and resolve_files
    # keep the last; which copy a compressed archive serves before its pass has seen the later ones is
    # tests/sources/test_duplicate_member.py's.
    require_tool("tar")
    source = tmp_path / "src" / "foo" / "fighter"
    source.mkdir(parents=True)
    made = tmp_path / "made.tar"
    for copy in (b"first", b"second", IMAGE):
        (source / "ufo").write_bytes(copy)
        subprocess.run(["tar", "-rf", made, "-C", tmp_path / "src", "foo/fighter/ufo"], check=True)
    data = made.read_bytes()
    assert [m.name for m in members(data)].count("foo/fighter/ufo") == 3
    assert served(data, "foo/fighter/ufo") == ("foo/fighter/ufo", IMAGE)
    assert gnu_tar_extracts(data, "foo/fighter/ufo", tmp_path) == IMAGE
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        extracted = tar.extractfile("foo/fighter/ufo")
        assert extracted is not None
        assert extracted.read() == IMAGE
