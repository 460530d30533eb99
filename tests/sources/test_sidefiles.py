"""Side files (seek index, spill) as root, next to archives in directories other users can change.

Each attack on the files tarfuse writes, with a real throwaway user: symbolic links planted at the names
root writes, an index and a spill planted beside root's archive, world-readable side files of a
private archive, a killed daemon's temporary spill, a cache directory in another user's tree. The
archives are single-frame zstd, which gets both an index file and a spill; mounts are real, run as root.
"""

import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pyzstd
from kit.mounts import MountFactory
from kit.needs import make_archive, require_root, require_tool
from kit.sample import SampleImage
from kit.users import User

from tarfuse import passes
from tarfuse.sources import index, sidefiles
from tarfuse.sources.compressed import CompressedSource, decompressed
from tarfuse.sources.file import ArchiveFile

TIMEOUT = 30.0
EVIL = b"the other user's image, not root's " * 30_000


# --- archives, places, planted files -------------------------------------------------------------


@pytest.fixture(scope="module")
def one_frame(sample_image: SampleImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample image in a tar compressed as one zstd frame: it gets an index file and a spill."""
    require_tool("zstd")
    plain = make_archive("oldgnu", sample_image.path, tmp_path_factory.mktemp("zst") / "vm.tar")
    subprocess.run(["zstd", "-q", "--rm", str(plain)], check=True)
    return plain.with_name("vm.tar.zst")


def users_directory(top: Path, user: User, name: str = "shared") -> Path:
    """A directory the user owns (mode 0755): they can create, rename and remove anything in it."""
    (path := top / name).mkdir()
    os.chown(path, user.uid, user.gid)
    return path


def sticky_directory(top: Path, name: str = "tmp") -> Path:
    """A root-owned world-writable sticky directory, like /tmp."""
    (path := top / name).mkdir()
    path.chmod(0o1777)
    return path


def roots_archive(one_frame: Path, directory: Path, mode: int = 0o600) -> Path:
    archive = directory / "vm.tar.zst"
    shutil.copyfile(one_frame, archive)
    archive.chmod(mode)
    return archive


def give(path: Path, user: User) -> Path:
    os.lchown(path, user.uid, user.gid)
    return path


def tar_with(data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("disk.raw")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def forge(index_path: Path, archive: Path, image: bytes) -> None:
    """Write what another user can: an index naming `archive` (all its fields can be computed from a
    stat) and a spill that decompresses to a tar holding `image`."""
    plain = tar_with(image)
    spill = Path(index.spill_path(str(index_path)))
    with pyzstd.SeekableZstdFile(spill, "w", max_frame_content_size=1 << 20) as out:
        out.write(plain)
    info = archive.stat()
    header = {
        "identity": [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns],
        "compression": "zstd",
        "size": len(plain),
        "length": 0,
        "sha256": hashlib.sha256(b"").hexdigest(),
        "spill": spill.stat().st_size,
    }
    index_path.write_bytes(index.MAGIC + json.dumps(header).encode() + b"\n")


def wait_for(mount_log: Path, text: str) -> str:
    deadline = time.monotonic() + TIMEOUT
    while text not in (log := mount_log.read_text(errors="replace")):
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not logged:\n{log}")
        time.sleep(0.05)
    return log


def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "tarfuse").glob("*")) if (cache / "tarfuse").exists() else []


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def root_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Root's cache directory for this test ($XDG_CACHE_HOME, inherited by the daemons it starts)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- root writes: symbolic links planted at its names --------------------------------------------


def next_pids(count: int) -> list[int]:
    """The pids the next processes will get (the kernel hands them out in order), as an attacker guesses."""
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    highest = int(Path("/proc/sys/kernel/pid_max").read_text())
    return [300 + (last + i - 300) % (highest - 300) for i in range(1, count + 1)]


@pytest.mark.fuse
def test_symlinks_planted_at_the_names_root_writes_redirect_nothing(
    one_frame: Path, user: User, top: Path, root_cache: Path, mount: MountFactory, tmp_path: Path
) -> None:
    shared = users_directory(top, user)
    archive = roots_archive(one_frame, shared, mode=0o644)  # root opens it with the user's rights
    victims = {name: tmp_path / name for name in ("shadow-a", "shadow-b")}
    for name, victim in victims.items():
        victim.write_bytes(f"root's {name}\n".encode())
        victim.chmod(0o600)
    base = f"{archive}.tarfuse"
    links = {Path(f"{base}-index"): victims["shadow-a"], Path(f"{base}-spill.zst"): victims["shadow-b"]}
    for pid in next_pids(400):  # the temporary names, for the next 400 pids
        links[Path(f"{base}-index.{pid}.tmp")] = victims["shadow-a"]
        links[Path(f"{base}-spill.zst.{pid}.tmp")] = victims["shadow-b"]
    for link, victim in links.items():
        link.symlink_to(victim)
        give(link, user)
    (served := tmp_path / "mnt").mkdir()
    live = mount(archive, served)
    log = wait_for(live.stderr, "index saved")
    for name, victim in victims.items():
        assert victim.read_bytes() == f"root's {name}\n".encode(), f"{name} overwritten:\n{log}"
    assert all(os.readlink(link) == str(victim) for link, victim in links.items())
    kept = cache_files(root_cache)
    assert [p.suffix for p in kept] == [".tarfuse-index", ".zst", ".tarfuse-use"], log  # cachedir.py
    assert all(mode_of(p) == 0o600 and p.stat().st_uid == 0 for p in kept)
    assert "ignoring" in log
    assert f"{shared} is owned by uid {user.uid}" in log


# --- root reads back: an index and a spill planted beside its archive ----------------------------


@pytest.mark.fuse
@pytest.mark.parametrize("place", ["users-directory", "sticky-directory"])
def test_an_index_and_spill_planted_beside_roots_archive_are_not_used(
    place: str,
    one_frame: Path,
    sample_image: SampleImage,
    user: User,
    top: Path,
    root_cache: Path,
    mount: MountFactory,
    tmp_path: Path,
) -> None:
    shared = users_directory(top, user) if place == "users-directory" else sticky_directory(top)
    archive = roots_archive(one_frame, shared, mode=0o644)
    planted = Path(f"{archive}{index.SUFFIX}")
    forge(planted, archive, EVIL)
    for path in (planted, Path(index.spill_path(str(planted)))):
        give(path, user)
    (served := tmp_path / "mnt").mkdir()
    live = mount(archive, served)
    assert (served / "disk.raw").read_bytes() == sample_image.data
    log = live.stderr_text()
    assert "loaded index" not in log
    assert f"ignoring {planted}" in log
    reason = f"is owned by uid {user.uid}" if place == "users-directory" else "writable by every user"
    assert reason in log


@pytest.mark.fuse
def test_a_planted_index_at_the_path_of_o_index_is_not_used_nor_written_over(
    one_frame: Path, sample_image: SampleImage, user: User, top: Path, mount: MountFactory, tmp_path: Path
) -> None:
    (roots := tmp_path / "archive").mkdir()
    archive = roots_archive(one_frame, roots)
    planted = users_directory(top, user) / "vm.idx"
    forge(planted, archive, EVIL)
    before = {p: p.read_bytes() for p in planted.parent.iterdir()}
    (served := tmp_path / "mnt").mkdir()
    live = mount(archive, served, "-o", f"index={planted}")
    assert (served / "disk.raw").read_bytes() == sample_image.data
    log = wait_for(live.stderr, "index complete")
    assert "loaded index" not in log
    assert f"index {planted} is unusable: it is not trusted" in log
    assert f"not keeping the index at {planted}" in log
    assert {p: p.read_bytes() for p in planted.parent.iterdir()} == before


def open_zst(path: Path) -> CompressedSource:
    source = decompressed(ArchiveFile(str(path)))
    assert isinstance(source, CompressedSource)
    return source


def index_and_spill(one_frame: Path, directory: Path) -> tuple[Path, Path, Path]:
    """Root's archive in `directory`, indexed by a real pass: (archive, index file, spill)."""
    archive = roots_archive(one_frame, directory)
    where = Path(f"{archive}{index.SUFFIX}")
    with open_zst(archive) as source:
        passes.IndexingPass(source, "disk.raw", str(where)).run(threading.Event())
    return archive, where, Path(index.spill_path(str(where)))


def symlink_to_a_copy(path: Path) -> None:
    copy = path.with_name(path.name + ".copy")
    shutil.copy2(path, copy)
    path.unlink()
    path.symlink_to(copy)


TAMPERING: dict[str, tuple[str, str, Callable[[Path, User], object]]] = {
    "index-owned-by-the-user": ("index", "owned by uid", lambda p, u: give(p, u)),
    "index-writable-by-all": ("index", "writable by every user", lambda p, u: p.chmod(0o666)),
    "index-writable-by-its-group": ("index", "writable by group", lambda p, u: p.chmod(0o660)),
    "index-a-symlink": ("index", "is a symbolic link", lambda p, u: symlink_to_a_copy(p)),
    "spill-owned-by-the-user": ("spill", "owned by uid", lambda p, u: give(p, u)),
    "spill-a-symlink": ("spill", "is a symbolic link", lambda p, u: symlink_to_a_copy(p)),
}


@pytest.mark.parametrize("case", TAMPERING.values(), ids=TAMPERING.keys())
def test_an_index_or_spill_that_someone_else_could_have_written_is_not_loaded(
    case: tuple[str, str, Callable[[Path, User], object]],
    one_frame: Path,
    user: User,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    which, reason, tamper = case
    archive, where, spill = index_and_spill(one_frame, tmp_path)
    tamper(where if which == "index" else spill, user)
    with open_zst(archive) as source:
        assert not index.use_saved_index(str(where), source)
        assert source.spill is None
    assert reason in caplog.text


def test_the_index_untampered_is_loaded(one_frame: Path, tmp_path: Path) -> None:
    archive, where, spill = index_and_spill(one_frame, tmp_path)
    with open_zst(archive) as source:
        assert index.use_saved_index(str(where), source)
        assert source.spill == str(spill)


def test_a_spill_whose_first_chunk_is_not_the_archives_is_not_served(
    one_frame: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As if the archive had been rewritten in place with its size and mtime kept: the index's identity
    # matches, its spill holds another tar.
    (a := tmp_path / "a").mkdir()
    (b := tmp_path / "b").mkdir()
    _, where_a, spill_a = index_and_spill(one_frame, a)
    other = b / "vm.tar.zst"
    other.write_bytes(pyzstd.compress(tar_with(EVIL)))
    header, _, blob = where_a.read_bytes()[len(index.MAGIC) :].partition(b"\n")
    fields = json.loads(header)
    info = other.stat()
    fields["identity"] = [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns]
    where_b = Path(f"{other}{index.SUFFIX}")
    where_b.write_bytes(index.MAGIC + json.dumps(fields).encode() + b"\n" + blob)
    where_b.chmod(0o600)
    shutil.copy(spill_a, index.spill_path(str(where_b)))
    with open_zst(other) as source:
        assert not index.use_saved_index(str(where_b), source)
        assert source.spill is None
        assert source.read_at(512, 64) == EVIL[:64]  # the archive's bytes, not the spill's
    assert "are not the archive's" in caplog.text


# --- a private archive: private side files -------------------------------------------------------


@pytest.mark.fuse
def test_the_side_files_of_a_private_archive_are_private(
    one_frame: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    require_root()
    old = os.umask(0o022)  # the usual umask: files made with 0666 would be -rw-r--r--
    try:
        (roots := tmp_path / "archive").mkdir()
        roots.chmod(0o755)
        archive = roots_archive(one_frame, roots, mode=0o600)
        (served := tmp_path / "mnt").mkdir()
        live = mount(archive, served)
        wait_for(live.stderr, "index saved")
    finally:
        os.umask(old)
    sides = sorted(roots.glob("vm.tar.zst.tarfuse-*"))
    assert [p.name for p in sides] == ["vm.tar.zst.tarfuse-index", "vm.tar.zst.tarfuse-spill.zst"]
    assert {p.name: oct(mode_of(p)) for p in sides} == {p.name: "0o600" for p in sides}


def test_a_side_file_an_older_tarfuse_made_world_readable_is_made_private_when_read(
    one_frame: Path, tmp_path: Path
) -> None:
    archive, where, spill = index_and_spill(one_frame, tmp_path)
    where.chmod(0o644)
    spill.chmod(0o644)
    with open_zst(archive) as source:
        assert index.use_saved_index(str(where), source)
    assert (mode_of(where), mode_of(spill)) == (0o600, 0o600)


# --- a killed daemon's temporary files ---------------------------------------------------------------


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


KILLED_WRITER = """
import os, signal, sys
from tarfuse.sources.spill import SpillWriter
writer = SpillWriter.named(sys.argv[1])
writer.write(os.urandom(3 << 20))
writer.file.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.fuse
@pytest.mark.parametrize("naming", ["ours", "older tarfuse's"])
def test_a_killed_daemons_temporary_spill_is_removed_at_the_next_mount(
    naming: str, one_frame: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    (roots := tmp_path / "archive").mkdir()
    archive = roots_archive(one_frame, roots)
    spill = index.spill_path(f"{archive}{index.SUFFIX}")
    if naming == "ours":  # our spill writer, killed while it writes
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_WRITER, spill], check=False, capture_output=True
        )
        assert killed.returncode == -9, killed.stderr
    else:  # what tarfuse before this change left: PATH.PID.tmp
        Path(f"{spill}.{dead_pid()}.tmp").write_bytes(os.urandom(1 << 20))
    (left,) = [p for p in roots.iterdir() if p != archive]
    (served := tmp_path / "mnt").mkdir()
    live = mount(archive, served)
    assert not left.exists(), live.stderr_text()
    assert f"removed {left}" in live.stderr_text()
    assert (served / "disk.raw").read_bytes() == sample_image.data


def test_only_our_own_dead_temporaries_are_removed(user: User, tmp_path: Path) -> None:
    name = "vm.tar.zst.tarfuse-spill.zst"
    files = {
        "dead": f"{name}.{dead_pid()}.abcdefgh{sidefiles.TEMPORARY_SUFFIX}",
        "alive": f"{name}.{os.getpid()}.abcdefgh{sidefiles.TEMPORARY_SUFFIX}",
        "the user's": f"{name}.{dead_pid()}.ijklmnop{sidefiles.TEMPORARY_SUFFIX}",
        "not ours": f"{name}.{dead_pid()}.tmp.bak",
        "pid 0": f"{name}.0.abcdefgh{sidefiles.TEMPORARY_SUFFIX}",
    }
    for path in (tmp_path / f for f in files.values()):
        path.write_bytes(b"x")
    give(tmp_path / files["the user's"], user)
    assert sidefiles.remove_stale(str(tmp_path)) == [files["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(files.values()) - {files["dead"]})


def test_nothing_is_removed_from_a_directory_others_can_change(user: User, top: Path) -> None:
    shared = users_directory(top, user)
    left = shared / f"vm.idx.{dead_pid()}.abcdefgh{sidefiles.TEMPORARY_SUFFIX}"
    left.write_bytes(b"x")
    with pytest.raises(sidefiles.Untrusted):
        sidefiles.remove_stale(str(shared))
    assert left.exists()


# --- where side files go ---------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["XDG_CACHE_HOME", "HOME"])
def test_a_cache_directory_in_another_users_tree_is_not_used(
    variable: str, user: User, top: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sudo -E keeps the caller's $HOME and $XDG_CACHE_HOME: root's cache would be in their tree.
    users_home = users_directory(top, user, "home")
    (users_home / ".cache").mkdir()
    give(users_home / ".cache", user)
    (roots_home := tmp_path / "root-home").mkdir()
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(roots_home))
    monkeypatch.setenv(variable, str(users_home / ".cache" if variable == "XDG_CACHE_HOME" else users_home))
    monkeypatch.setattr(sidefiles, "_passwd_home", lambda: str(roots_home))
    archive = users_directory(top, user, "archives") / "vm.tar.zst"
    where = index.default_path(str(archive), [1, 2, 3, 4])
    assert where is not None
    assert Path(where).parent == roots_home / ".cache" / "tarfuse"
    assert mode_of(Path(where).parent) == 0o700
    assert list(users_home.rglob("*")) == [users_home / ".cache"]


def test_root_with_no_trusted_home_keeps_its_index_in_the_system_cache(
    user: User, top: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users_home = users_directory(top, user, "home")
    monkeypatch.setenv("HOME", str(users_home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(sidefiles, "_passwd_home", lambda: str(users_home))
    monkeypatch.setattr(sidefiles, "SYSTEM_CACHE", str(tmp_path / "var" / "cache" / "tarfuse"))
    assert sidefiles.cache_dir() == str(tmp_path / "var" / "cache" / "tarfuse")
    assert list(users_home.iterdir()) == []


@pytest.mark.fuse
def test_a_mount_of_an_archive_in_a_users_directory_keeps_nothing_in_their_tree(
    one_frame: Path, sample_image: SampleImage, user: User, top: Path, mount: MountFactory, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    users_home = users_directory(top, user, "home")
    archive = roots_archive(one_frame, users_directory(top, user), mode=0o644)  # opened with their rights
    monkeypatch.setenv("XDG_CACHE_HOME", str(users_home / ".cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "root-home"))
    (served := tmp_path / "mnt").mkdir()
    live = mount(archive, served)
    log = wait_for(live.stderr, "index saved")
    assert list(users_home.iterdir()) == []
    assert sorted(p.name for p in archive.parent.iterdir()) == ["vm.tar.zst"]
    saved = re.search(r"index saved to (\S+) ", log)
    assert saved is not None
    assert Path(saved[1]).parent == tmp_path / "root-home" / ".cache" / "tarfuse"
    assert (served / "disk.raw").read_bytes() == sample_image.data


# --- what is trusted -----------------------------------------------------------------------------------


def test_a_sticky_directory_on_the_way_is_trusted_but_not_as_the_place(top: Path) -> None:
    tmp = sticky_directory(top)
    (mine := tmp / "mine").mkdir(mode=0o700)
    assert sidefiles.check_directory(str(mine)) == str(mine)
    with pytest.raises(sidefiles.Untrusted, match="sticky: anyone can create a name there first"):
        sidefiles.check_directory(str(tmp))
    assert sidefiles.check_directory(str(tmp), names=False) == str(tmp)


def test_a_directory_reached_through_another_users_symlink_is_not_trusted(user: User, top: Path) -> None:
    tmp = sticky_directory(top)
    (mine := top / "mine").mkdir(mode=0o700)
    link = tmp / "link"
    link.symlink_to(mine)
    give(link, user)  # in a sticky directory its owner can replace it at any time
    with pytest.raises(sidefiles.Untrusted, match=f"{link} is owned by uid {user.uid}"):
        sidefiles.check_directory(str(link))
    os.lchown(link, 0, 0)
    assert sidefiles.check_directory(str(link)) == str(mine)


def test_a_directory_below_another_users_directory_is_not_trusted(user: User, top: Path) -> None:
    (inner := users_directory(top, user) / "roots").mkdir(mode=0o700)  # theirs to rename and replace
    with pytest.raises(sidefiles.Untrusted, match="is owned by uid"):
        sidefiles.check_directory(str(inner))


def test_a_directory_made_for_side_files_is_0700_and_refused_under_another_users(
    user: User, top: Path
) -> None:
    made = sidefiles.make_directory(str(top / "a" / "b"))
    assert (mode_of(top / "a"), mode_of(Path(made))) == (0o700, 0o700)
    with pytest.raises(sidefiles.Untrusted):
        sidefiles.make_directory(str(users_directory(top, user) / "c"))
    assert not (top / "shared" / "c").exists()


def test_side_files_are_written_0600_under_a_name_of_ours(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        sidefiles.write_file(str(tmp_path / "x.idx"), b"data")
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["x.idx"]
    assert mode_of(tmp_path / "x.idx") == 0o600


def test_open_trusted_does_not_wait_on_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.idx", 0o600)
    with pytest.raises(sidefiles.Untrusted, match="not a regular file"):
        sidefiles.open_trusted(str(tmp_path / "x.idx"))
