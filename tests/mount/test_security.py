"""Security: unprivileged mounts through setuid fusermount3, read-only at every layer, no way out of archives.

The unprivileged tests create real accounts (useradd) and remove them afterwards, so they need root; they
run tarfuse with runuser. Two host settings are changed for the length of a test and always restored:

- /etc/fuse.conf, with or without `user_allow_other`, to test both answers to `-o allow_other`;
- /dev/fuse's mode, only if users cannot open it. libfuse 3 opens /dev/fuse itself before it calls
  fusermount3, so a root-only /dev/fuse (as in some containers) stops every unprivileged mount; Debian's
  udev makes it 0666 (50-udev-default.rules), and the tests restore that stock state while they run.

The user must be able to run tarfuse's interpreter: if the venv's python lives where users cannot go (a
pyenv under /root), the same python version from /usr/bin runs the same tarfuse sources and site-packages
through PYTHONPATH (kit.users.python_for); if there is none, the tests skip and say why. The two users and
the owner's directory are the `setup` fixture of tests/mount/conftest.py.
"""

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from kit.mounts import (
    MountFactory,
    daemon_mount,
    foreground_mount,
    is_mounted,
    mount_entry,
    tarfuse_command,
    unmount,
)
from kit.sample import ArchiveFactory, SampleImage
from kit.users import Setup, as_user, sha256_as

pytestmark = pytest.mark.fuse

FUSE_CONF = Path("/etc/fuse.conf")
TIMEOUT = 30.0


# --- host state, always restored -----------------------------------------------------------------


@contextlib.contextmanager
def fuse_conf(user_allow_other: bool) -> Iterator[None]:
    """Make /etc/fuse.conf allow `-o allow_other` for users, or not; put the original back afterwards."""
    original = FUSE_CONF.read_bytes() if FUSE_CONF.exists() else None
    FUSE_CONF.write_text(
        "# written by tarfuse's tests/mount/test_security.py\n" + "user_allow_other\n" * user_allow_other
    )
    try:
        yield
    finally:
        if original is None:
            FUSE_CONF.unlink()
        else:
            FUSE_CONF.write_bytes(original)


@contextlib.contextmanager
def user_mount(setup: Setup, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """`tarfuse -f` run by the owner; unmounted (by root) and reaped at the end."""
    command = setup.python.tarfuse(setup.owner, "-f", *options, setup.archive, setup.mountpoint)
    log = setup.mountpoint.with_name("tarfuse.log")
    # No probe: root may not look into the owner's mount (no allow_other).
    with daemon_mount(command, setup.mountpoint, log, timeout=TIMEOUT, probe=False) as served:
        yield served.process


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- unprivileged use ----------------------------------------------------------------------------


def daemon_uids(runuser: subprocess.Popen[bytes]) -> list[int]:
    """The real, effective, saved and file system uids of the process that runuser started."""
    children = Path(f"/proc/{runuser.pid}/task/{runuser.pid}/children").read_text().split()
    assert len(children) == 1, children
    status = Path(f"/proc/{children[0]}/status").read_text()
    return [int(uid) for uid in next(s for s in status.splitlines() if s.startswith("Uid:")).split()[1:]]


def test_user_mounts_through_setuid_fusermount3_and_reads_the_image(
    setup: Setup, sample_image: SampleImage
) -> None:
    with user_mount(setup) as runuser:
        entry = mount_entry(setup.mountpoint)
        assert entry is not None
        assert entry.fstype == "fuse.tarfuse"
        assert f"user_id={setup.owner.uid}" in entry.super_options
        assert daemon_uids(runuser) == [setup.owner.uid] * 4, "the daemon must run as the user"
        result = sha256_as(setup.owner, setup.mountpoint / "disk.raw")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == digest(sample_image.data)


def test_root_is_denied_a_users_mount_without_allow_other(setup: Setup) -> None:
    # The kernel lets only the mounting user in (fuse_allow_current_process); root is no exception
    # unless the fuse module's allow_sys_admin_access is set.
    knob = Path("/sys/module/fuse/parameters/allow_sys_admin_access")
    if knob.exists() and knob.read_text().strip() == "Y":
        pytest.skip("fuse.allow_sys_admin_access=Y lets root into every FUSE mount")
    with user_mount(setup), pytest.raises(PermissionError) as caught:
        os.stat(setup.mountpoint / "disk.raw")
    assert caught.value.errno == errno.EACCES


def test_other_user_cannot_see_the_image_without_allow_other(setup: Setup) -> None:
    with user_mount(setup):
        listing = subprocess.run(
            as_user(setup.other, "ls", setup.mountpoint), capture_output=True, text=True, timeout=TIMEOUT
        )
        reading = sha256_as(setup.other, setup.mountpoint / "disk.raw")
    assert listing.returncode != 0
    assert "Permission denied" in listing.stderr
    assert reading.returncode != 0
    assert "Permission denied" in reading.stderr


def test_allow_other_without_user_allow_other_fails_with_one_line_saying_what_to_do(setup: Setup) -> None:
    with fuse_conf(user_allow_other=False):
        result = subprocess.run(
            setup.python.tarfuse(setup.owner, "-o", "allow_other", setup.archive, setup.mountpoint),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        mounted = is_mounted(setup.mountpoint)
    assert (result.returncode, mounted) == (1, False)
    ours = [line for line in result.stderr.splitlines() if line.startswith("tarfuse: ")]
    assert len(ours) == 1, result.stderr
    assert "user_allow_other" in ours[0]
    assert "/etc/fuse.conf" in ours[0]


def test_allow_other_with_user_allow_other_lets_other_users_and_root_read(
    setup: Setup, sample_image: SampleImage
) -> None:
    with fuse_conf(user_allow_other=True), user_mount(setup, "-o", "allow_other"):
        other = sha256_as(setup.other, setup.mountpoint / "disk.raw")
        by_root = digest((setup.mountpoint / "disk.raw").read_bytes())
    assert other.returncode == 0, other.stderr
    assert other.stdout.split()[0] == by_root == digest(sample_image.data)


# --- read-only at every layer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def mounted(archive_of: ArchiveFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One mount for the tests below, which all must fail to change it."""
    mountpoint = tmp_path_factory.mktemp("readonly") / "mnt"
    mountpoint.mkdir()
    with foreground_mount(archive_of("oldgnu"), mountpoint):
        yield mountpoint


# test_mount.py covers open for writing, truncate, chmod, creating a file and setxattr.
CHANGES: dict[str, Callable[[Path], object]] = {
    "chown": lambda mnt: os.chown(mnt / "disk.raw", 1, 1),
    "utime": lambda mnt: os.utime(mnt / "disk.raw", (0, 0)),
    "removexattr": lambda mnt: os.removexattr(mnt / "disk.raw", "user.tarfuse.member"),
    "mknod": lambda mnt: os.mknod(mnt / "fifo", 0o600 | stat.S_IFIFO),
    "mkdir": lambda mnt: os.mkdir(mnt / "dir"),
    "symlink": lambda mnt: os.symlink("disk.raw", mnt / "link"),
    "link": lambda mnt: os.link(mnt / "disk.raw", mnt / "hard"),
    "rename": lambda mnt: os.rename(mnt / "disk.raw", mnt / "other.raw"),
    "unlink": lambda mnt: os.unlink(mnt / "disk.raw"),
    "create read-only": lambda mnt: os.close(os.open(mnt / "new", os.O_CREAT | os.O_RDONLY, 0o444)),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_every_change_fails_with_erofs(mounted: Path, change: Callable[[Path], object]) -> None:
    with pytest.raises(OSError, match="Read-only") as caught:
        change(mounted)
    assert caught.value.errno == errno.EROFS
    assert sorted(os.listdir(mounted)) == ["disk.raw"]


def test_the_kernel_mount_is_read_only(mounted: Path) -> None:
    entry = mount_entry(mounted)
    assert entry is not None
    assert "ro" in entry.super_options


def open_files(pid: int) -> dict[str, int]:
    """The files process `pid` holds open, path -> open(2) flags (from /proc/PID/fdinfo)."""
    files = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            flags = next(int(line.split()[1], 8) for line in info.splitlines() if line.startswith("flags:"))
            files[target] = flags
    return files


def test_archive_is_opened_read_only_and_left_unchanged(
    sample_archive: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    archive = tmp_path / "vm.tar"
    shutil.copyfile(sample_archive, archive)
    archive.chmod(0o444)
    os.chown(archive, 65534, 65534)  # nobody's: only its mode lets anyone read it
    before = (archive.stat(), digest(archive.read_bytes()))
    (mountpoint := tmp_path / "mnt").mkdir()
    served = mount(archive, mountpoint)
    assert digest((mountpoint / "disk.raw").read_bytes()) == digest(sample_image.data)
    flags = open_files(served.process.pid).get(str(archive))
    unmount(mountpoint)
    assert flags is not None, "the daemon does not hold the archive open"
    assert flags & os.O_ACCMODE == os.O_RDONLY
    after = (archive.stat(), digest(archive.read_bytes()))
    assert after[1] == before[1]
    assert (after[0].st_mtime_ns, after[0].st_ctime_ns, after[0].st_size) == (
        before[0].st_mtime_ns,
        before[0].st_ctime_ns,
        before[0].st_size,
    )


def test_daemon_holds_nothing_open_for_writing_but_dev_fuse_and_its_log(
    sample_archive: Path, mount: MountFactory, tmp_path: Path
) -> None:
    (mountpoint := tmp_path / "mnt").mkdir()
    served = mount(sample_archive, mountpoint)
    (mountpoint / "disk.raw").read_bytes()
    allowed = {"/dev/fuse", os.devnull, str(served.stderr)}
    writable = {
        path
        for path, flags in open_files(served.process.pid).items()
        if path.startswith("/") and flags & os.O_ACCMODE != os.O_RDONLY
    }
    assert writable <= allowed


# --- names inside the archive stay inside the archive --------------------------------------------

HOST_FILE = "/etc/shadow"
DECOY = b"not the host's /etc/shadow\n" * 40_000


def tar_of(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, BytesIO(data) if data is not None else None)
    return path


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link(name: str, kind: bytes, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def run_tarfuse(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tarfuse_command(*args), capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize(
    "member",
    [link("disk.raw", tarfile.SYMTYPE, HOST_FILE), link("disk.raw", tarfile.LNKTYPE, HOST_FILE)],
    ids=["symlink", "hardlink"],
)
@pytest.mark.parametrize("options", [[], ["-o", "member=disk.raw"]], ids=["chosen", "named"])
def test_link_member_to_a_host_file_is_refused_and_nothing_mounted(
    member: tuple[tarfile.TarInfo, None], options: list[str], tmp_path: Path
) -> None:
    archive = tar_of(tmp_path / "links.tar", member)
    (mountpoint := tmp_path / "mnt").mkdir()
    try:
        result = run_tarfuse("-f", *options, archive, mountpoint)
        mounted = is_mounted(mountpoint)
    finally:
        unmount(mountpoint)
    assert (result.returncode, mounted) == (1, False), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "holds no regular files" in result.stderr  # the link is not one


def test_symlink_member_beside_an_image_is_not_served(
    sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    archive = tar_of(
        tmp_path / "mixed.tar",
        link("disk.raw", tarfile.SYMTYPE, HOST_FILE),
        regular("vm.img", sample_image.data[: 1 << 20]),
    )
    (mountpoint := tmp_path / "mnt").mkdir()
    mount(archive, mountpoint)
    assert os.listdir(mountpoint) == ["vm.img"]
    assert (mountpoint / "vm.img").read_bytes() == sample_image.data[: 1 << 20]


def test_hardlink_to_an_absolute_name_serves_the_archives_member_not_the_host_file(
    mount: MountFactory, tmp_path: Path
) -> None:
    # GNU tar -x strips the leading "/" of link targets too: the link gets the archive's etc/shadow.
    archive = tar_of(
        tmp_path / "decoy.tar",
        regular("etc/shadow", DECOY),
        link("disk.raw", tarfile.LNKTYPE, HOST_FILE),
    )
    (mountpoint := tmp_path / "mnt").mkdir()
    mount(archive, mountpoint, "-o", "member=disk.raw")
    served = (mountpoint / "disk.raw").read_bytes()
    assert served == DECOY
    assert served != Path(HOST_FILE).read_bytes()
