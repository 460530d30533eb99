"""Root opens the archive path with the rights of whoever controls it, and opens only what can be served.

The scenario is an fstab line run as root (`/home/USER/vm.tar /mnt/vm fuse.tarfuse ro,allow_other`): the
user who owns the directory swaps vm.tar for a symbolic link to a root-only loop device or file, a FIFO,
a socket or /dev/null. Root mounts and lists; the user must get nothing root could read and they could
not, and nothing may hang. The accounts are real (tests/kit/users.py), so the tests need root; the
directories live outside pytest's 0700 tmp_path, where the user can reach them.
"""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from kit.mounts import MountFactory, is_mounted, loop_device, tarfuse_command, unmount
from kit.needs import require_tool
from kit.sample import SampleImage
from kit.users import User, run_as

from tarfuse.sources import opening, sidefiles

DEADLINE = 20.0  # seconds a refusal may take, far above what it needs; a FIFO used to block for ever
SECRET = b"root's secret, not the user's. " * 64
OPENED_AS = "opened with the rights of"


@pytest.fixture
def home(top: Path, user: User) -> Path:
    """The user's directory (0755): they can put anything at any name in it."""
    (path := top / "home").mkdir()
    os.chown(path, user.uid, user.gid)
    return path


@pytest.fixture
def secret(top: Path) -> Path:
    """A root-only file (0600, in a 0700 directory) that looks like a disk image: an MBR boot sector."""
    (vault := top / "vault").mkdir(mode=0o700)
    head = bytearray(SECRET[:510]) + b"\x55\xaa"
    (path := vault / "root.img").write_bytes(bytes(head) + SECRET * 32)
    path.chmod(0o600)
    return path


def tarfuse(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run tarfuse as root; it must end by itself well within DEADLINE."""
    return subprocess.run(
        tarfuse_command(*args), capture_output=True, text=True, timeout=DEADLINE, check=False
    )


def refused(how: str, archive: Path, mountpoint: Path) -> str:
    """`tarfuse --list ARCHIVE`, or a foreground mount of it: it must fail at once with one line, mount
    nothing and show nothing of the archive; return that line."""
    mountpoint.mkdir(exist_ok=True)
    try:
        result = tarfuse("--list", archive) if how == "list" else tarfuse("-f", archive, mountpoint)
    finally:
        mounted = is_mounted(mountpoint)
        unmount(mountpoint)
    assert not mounted
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def link_as(user: User, link: Path, target: Path | str) -> None:
    run_as(user, "ln", "-s", target, link)


@pytest.mark.fuse
@pytest.mark.parametrize("how", ["list", "mount"])
def test_a_users_link_to_a_root_only_loop_device_serves_nothing(
    how: str, user: User, home: Path, secret: Path, tmp_path: Path
) -> None:
    require_tool("losetup")
    with loop_device(secret) as device:
        link_as(user, home / "vm.tar", device)
        line = refused(how, home / "vm.tar", tmp_path / "mnt")
    assert "a block device reached through a path that another user can change" in line
    assert str(home / "vm.tar") in line


@pytest.mark.fuse
@pytest.mark.parametrize("how", ["list", "mount"])
def test_a_users_link_to_a_root_only_file_serves_nothing(
    how: str, user: User, home: Path, secret: Path, tmp_path: Path
) -> None:
    link_as(user, home / "vm.tar", secret)
    line = refused(how, home / "vm.tar", tmp_path / "mnt")
    assert "Permission denied" in line
    assert f"{OPENED_AS} uid {user.uid} ({user.name})" in line


@pytest.mark.fuse
@pytest.mark.parametrize("how", ["list", "mount"])
@pytest.mark.parametrize("whose", ["the-users", "roots"])
def test_a_fifo_is_refused_at_once(how: str, whose: str, user: User, home: Path, tmp_path: Path) -> None:
    """open(2) of a FIFO for reading waits for a writer: the mount and --list hung there for ever."""
    if whose == "the-users":
        run_as(user, "mkfifo", home / "vm.tar")
        fifo = home / "vm.tar"
    else:
        os.mkfifo(fifo := tmp_path / "vm.tar")
    line = refused(how, fifo, tmp_path / "mnt")
    assert "a FIFO, not a regular file or block device" in line


def make_socket(path: Path) -> Path:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
    return path


@pytest.mark.fuse
@pytest.mark.parametrize("how", ["list", "mount"])
@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("a socket", lambda place: make_socket(place / "vm.tar")),
        ("a character device", lambda place: Path("/dev/null")),
        ("a directory", lambda place: place),
    ],
    ids=["socket", "dev-null", "directory"],
)
def test_what_is_no_file_nor_block_device_is_refused_with_one_line(
    how: str, kind: str, make: object, tmp_path: Path
) -> None:
    assert callable(make)
    (place := tmp_path / "place").mkdir()
    line = refused(how, make(place), tmp_path / "mnt")
    assert f"{kind}, not a regular file or block device" in line


@pytest.mark.fuse
def test_an_admins_own_loop_device_is_still_served(
    sample_archive: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    require_tool("losetup")
    if os.geteuid() != 0:
        pytest.skip("needs root: losetup")
    with loop_device(sample_archive) as device:
        listed = tarfuse("--list", device)
        assert listed.returncode == 0, listed.stderr
        assert "disk.raw" in listed.stdout
        (served := tmp_path / "mnt").mkdir()
        live = mount(Path(device), served)
        assert (served / "disk.raw").read_bytes() == sample_image.data
        unmount(served)
    assert OPENED_AS not in live.stderr_text() + listed.stderr


@pytest.mark.fuse
def test_a_users_own_archive_is_served_with_their_rights_and_the_log_says_so(
    user: User, home: Path, sample_archive: Path, sample_image: SampleImage, mount: MountFactory
) -> None:
    archive = home / "vm.tar"
    shutil.copyfile(sample_archive, archive)
    os.chown(archive, user.uid, user.gid)
    archive.chmod(0o600)  # theirs alone: readable with their rights
    said = f"{archive}: {OPENED_AS} uid {user.uid} ({user.name}), since {home} is owned by uid {user.uid}"
    listed = tarfuse("--list", archive)
    assert listed.returncode == 0, listed.stderr
    assert "disk.raw" in listed.stdout
    assert said in listed.stderr
    (served := home.parent / "mnt").mkdir()
    live = mount(archive, served)
    assert (served / "disk.raw").read_bytes() == sample_image.data
    assert said in live.stderr_text()


@pytest.mark.fuse
def test_roots_own_archive_in_roots_directory_is_opened_as_before(
    sample_archive: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    archive = tmp_path / "vm.tar"
    shutil.copyfile(sample_archive, archive)
    archive.chmod(0o600)
    (served := tmp_path / "mnt").mkdir()
    live = mount(archive, served)
    assert (served / "disk.raw").read_bytes() == sample_image.data
    assert OPENED_AS not in live.stderr_text()


@pytest.mark.fuse
def test_roots_file_in_a_directory_anyone_can_write_is_opened_with_nobodys_rights(
    top: Path, secret: Path, tmp_path: Path
) -> None:
    """Anyone could have put it there (a hard link, a rename): only what every user may read is served."""
    (shared := top / "shared").mkdir()
    shared.chmod(0o777)
    shutil.copyfile(secret, archive := shared / "vm.img")
    archive.chmod(0o600)
    line = refused("list", archive, tmp_path / "mnt")
    assert "Permission denied" in line
    assert "is writable by every user" in line or OPENED_AS in line


# --- the walk itself --------------------------------------------------------------------------------


def test_a_memfd_of_our_own_through_proc_self_fd_is_ours_to_open() -> None:
    """/proc/self/fd/N of a memfd reads "/memfd:name (deleted)", which is no path: the walk must not follow
    it (the fuzzer opens every case this way)."""
    fd = os.memfd_create("tarfuse-rights")
    try:
        os.write(fd, b"the bytes of a memfd")
        path = f"/proc/self/fd/{fd}"
        assert sidefiles.changers(path) == []
        opened = opening.open_archive(path)
        try:
            assert os.pread(opened, 100, 0) == b"the bytes of a memfd"
        finally:
            os.close(opened)
    finally:
        os.close(fd)


def test_the_walk_never_raises_on_what_is_missing_or_loops(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "vm.tar")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_bytes(b"")
    for name in ("dangling", "loop", "file/vm.tar", "absent"):
        assert sidefiles.changers(str(tmp_path / name)) == []


def test_in_a_sticky_directory_the_owner_of_the_file_could_swap_it(user: User, top: Path) -> None:
    (sticky := top / "tmp").mkdir()
    sticky.chmod(0o1777)
    (archive := sticky / "vm.tar").write_bytes(b"")
    os.chown(archive, user.uid, user.gid)
    assert [c.uid for c in sidefiles.changers(str(archive))] == [user.uid]
    os.chown(archive, 0, 0)
    assert sidefiles.changers(str(archive)) == []


def test_the_rights_are_one_users_one_groups_or_nobodys(user: User) -> None:
    theirs = sidefiles.Changer(user.uid, None, "theirs")
    own_group = sidefiles.Changer(None, user.gid, "their group")
    other_group = sidefiles.Changer(None, 0, "group 0")
    everyone = sidefiles.Changer(None, None, "everyone")
    assert opening.rights_of([theirs, own_group]).uid == user.uid
    assert user.gid in opening.rights_of([theirs]).groups
    group = opening.rights_of([other_group])
    assert (group.gid, group.groups) == (0, (0,))
    assert group.uid != 0
    for mixed in ([theirs, other_group], [theirs, everyone], [everyone]):
        rights = opening.rights_of(mixed)
        assert rights.uid not in (0, user.uid)
        assert rights.groups == ()
