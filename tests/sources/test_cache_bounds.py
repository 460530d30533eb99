"""The cache directory's bound (tarfuse/sources/cachedir.py): entries of archives that are gone or
changed are removed, then the least recently used past -o cache_max; an entry in use stays.

First the sweep itself on entries made by hand (a use file records what an entry belongs to, as a mount
writes it), then real mounts of archives on a read-only bind mount, whose index and spill can only go to
the cache directory.
"""

import fcntl
import json
import os
from pathlib import Path

import pytest
from kit.archives import repeated_block_tar_zst
from kit.mounts import MountFactory

from tarfuse.sources import cachedir

MiB = 1 << 20


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    (where := tmp_path / "cache").mkdir(mode=0o700)
    return where


def key_of(n: int) -> str:
    return f"{n:032x}"


def make_entry(
    cache: Path, key: str, archive: Path | str | None, identity: list[object], size: int, used: float
) -> list[Path]:
    """An index, a spill of `size` bytes and a use file, last used at `used`, as a mount leaves them."""
    files = [cache / f"{key}.tarfuse-index", cache / f"{key}.tarfuse-spill.zst", cache / f"{key}.tarfuse-use"]
    files[0].write_bytes(b"tarfuse-index 1\n{}\n")
    files[1].write_bytes(os.urandom(size))  # real blocks: the sweep counts what is on disk
    record = {"archive": None if archive is None else str(archive), "identity": identity}
    files[2].write_text(json.dumps(record))
    for path in files:
        path.chmod(0o600)
        os.utime(path, (used, used))
    return files


def identity_of(archive: Path) -> list[object]:
    info = archive.stat()
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns]


def archive_with_entry(tmp_path: Path, cache: Path, n: int, used: float = 1e9) -> tuple[Path, list[Path]]:
    archive = tmp_path / f"a{n}.tar.zst"
    archive.write_bytes(b"archive %d" % n)
    return archive, make_entry(cache, key_of(n), archive, identity_of(archive), MiB, used)


def removed_keys(removed: list[tuple[cachedir.Entry, str]]) -> set[str]:
    return {entry.key for entry, _ in removed}


def test_the_entry_of_an_archive_that_is_gone_is_removed(tmp_path: Path, cache: Path) -> None:
    archive, files = archive_with_entry(tmp_path, cache, 1)
    archive.unlink()
    removed = cachedir.sweep(str(cache), 1 << 40)
    assert [why for _, why in removed] == [f"its archive {str(archive)!r} is gone"]
    assert not any(p.exists() for p in files)


def test_the_entry_of_an_archive_that_changed_is_removed(tmp_path: Path, cache: Path) -> None:
    archive, files = archive_with_entry(tmp_path, cache, 1)
    _, kept_files = archive_with_entry(tmp_path, cache, 2)
    os.utime(archive, ns=(0, 1_000_000_000))  # `touch`: the archive is another version now
    assert removed_keys(cachedir.sweep(str(cache), 1 << 40)) == {key_of(1)}
    assert not any(p.exists() for p in files)
    assert all(p.exists() for p in kept_files)


def test_an_entry_of_a_url_or_without_a_record_is_never_taken_for_gone(cache: Path) -> None:
    url = make_entry(cache, key_of(1), None, ["http://127.0.0.1:1/vm.tar.gz", 5, '"etag"', None], MiB, 1e9)
    member = make_entry(cache, key_of(2), None, [1, 2, 3, 4, 512], MiB, 1e9)
    older = make_entry(cache, key_of(3), None, [], MiB, 1e9)
    older[2].unlink()  # an entry from before use files
    assert cachedir.sweep(str(cache), 1 << 40) == []
    assert all(p.exists() for p in url + member + older[:2])


def test_the_least_recently_used_entries_go_past_cache_max(tmp_path: Path, cache: Path) -> None:
    entries = {n: archive_with_entry(tmp_path, cache, n, used=1e9 + n)[1] for n in (3, 1, 4, 2)}
    removed = cachedir.sweep(str(cache), 2 * MiB + 64 * 1024)  # room for two spills and their small files
    assert removed_keys(removed) == {key_of(1), key_of(2)}
    assert all("least recently used" in why for _, why in removed)
    assert [n for n, files in sorted(entries.items()) if files[1].exists()] == [3, 4]


def test_an_entry_in_use_stays_until_its_mount_ends(tmp_path: Path, cache: Path) -> None:
    archive, files = archive_with_entry(tmp_path, cache, 1)
    archive.unlink()
    fd = os.open(files[2], os.O_RDONLY)  # a running mount's lock, as cachedir.hold takes it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert cachedir.sweep(str(cache), 0) == []
        assert all(p.exists() for p in files)
    finally:
        os.close(fd)
    assert removed_keys(cachedir.sweep(str(cache), 0)) == {key_of(1)}


def test_an_entry_being_written_stays(tmp_path: Path, cache: Path) -> None:
    archive, files = archive_with_entry(tmp_path, cache, 1)
    archive.unlink()
    writing = cache / f"{key_of(1)}.tarfuse-spill.zst.{os.getpid()}.abcdefgh.tarfuse-tmp"  # sidefiles.create
    writing.write_bytes(b"")
    writing.chmod(0o600)
    assert cachedir.sweep(str(cache), 0) == []
    assert all(p.exists() for p in [*files, writing])


def test_the_sweep_touches_nothing_but_its_own_names(tmp_path: Path, cache: Path) -> None:
    others = [cache / "notes.txt", cache / "vm.tar.zst.tarfuse-index", cache / f"{key_of(1)}.other"]
    for path in others:
        path.write_bytes(os.urandom(MiB))
    (cache / f"{key_of(2)}.tarfuse-index").symlink_to(others[0])
    assert cachedir.sweep(str(cache), 0) == []
    assert all(p.exists() for p in others)


# --- real mounts -------------------------------------------------------------------------------------


def spills(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("*.tarfuse-spill.zst"))


@pytest.mark.fuse
def test_a_touched_archive_leaves_no_second_spill_in_the_cache(
    read_only: tuple[Path, Path], user_cache: Path, mount: MountFactory, tmp_path: Path
) -> None:
    rw, ro = read_only
    data = repeated_block_tar_zst(rw / "vm.tar.zst", 2)
    (served := tmp_path / "mnt").mkdir()
    first = mount(ro / "vm.tar.zst", served)
    first.wait_for_log("index saved")
    first.unmount()
    (old,) = spills(user_cache)
    os.utime(rw / "vm.tar.zst")  # touch: another version of the archive for the next mount
    second = mount(ro / "vm.tar.zst", served)
    log = second.wait_for_log("index saved")
    assert f"removed {old.split('.')[0]}" in log
    assert "changed since" in log
    assert len(spills(user_cache)) == 1
    assert spills(user_cache) != [old]
    assert (served / "disk.raw").read_bytes() == data


@pytest.mark.fuse
def test_a_running_mount_keeps_its_entry_whatever_the_sweep_of_another(
    read_only: tuple[Path, Path], user_cache: Path, mount: MountFactory, tmp_path: Path
) -> None:
    rw, ro = read_only
    data = repeated_block_tar_zst(rw / "a.tar.zst", 2)
    repeated_block_tar_zst(rw / "b.tar.zst", 3)
    (a := tmp_path / "a").mkdir()
    (b := tmp_path / "b").mkdir()
    running = mount(ro / "a.tar.zst", a)
    running.wait_for_log("index saved")
    (held,) = user_cache.glob("*.tarfuse-index")
    (rw / "a.tar.zst").unlink()  # gone, while its mount reads it through its descriptor
    other = mount(ro / "b.tar.zst", b, "-o", "cache_max=1")
    other.wait_for_log("index saved")
    assert held.exists(), other.stderr_text()  # neither gone nor least recently used: in use
    assert (a / "disk.raw").read_bytes() == data
    running.unmount()
    other.unmount()
    third = mount(ro / "b.tar.zst", b)
    assert f"removed {held.name.split('.')[0]}" in third.wait_for_log("is gone")
    assert not held.exists()
