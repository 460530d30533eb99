"""`tarfuse --cache [--prune] [--json]`: what tarfuse keeps in the cache directory, and cleaning it.

Real mounts of a one-frame .tar.zst on a read-only bind mount, whose index and spill can only go to the
cache directory ($XDG_CACHE_HOME/tarfuse, set for the test's processes); then the command itself, run as a
user runs it.
"""

import json
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from kit.mounts import Mount, MountFactory
from kit.needs import require_tool

BLOCK = 3 << 19  # 1.5 MiB of random bytes: a spill of its own, a few megabytes in all
TIMEOUT = 60.0


def tarfuse(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tarfuse", *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT
    )


def write_tar_zst(out: Path) -> None:
    """A one-frame .tar.zst of disk.raw (a random block, twice): zstd -d must spill to read it backwards."""
    require_tool("zstd")
    data = random.Random(7).randbytes(BLOCK) * 2
    raw = out.with_suffix(".raw-tar")
    with tarfile.open(raw, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("disk.raw")
        info.size = len(data)
        source = out.with_name("disk.raw")
        source.write_bytes(data)
        with source.open("rb") as reader:
            tar.addfile(info, reader)
        source.unlink()
    subprocess.run(["zstd", "-q", "--single-thread", "--rm", "-o", out, raw], check=True)


def mounted_with_cache_entry(
    read_only: tuple[Path, Path], mount: MountFactory, tmp_path: Path
) -> tuple[Path, Mount]:
    """Mount ro/vm.tar.zst; return its path and the mount, once its index and spill are in the cache."""
    rw, ro = read_only
    write_tar_zst(rw / "vm.tar.zst")
    (served := tmp_path / "mnt").mkdir()
    live = mount(ro / "vm.tar.zst", served)
    live.wait_for_log("index saved")
    return ro / "vm.tar.zst", live


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.fuse
def test_cache_lists_a_mounted_archive_s_entry_in_use(
    read_only: tuple[Path, Path], user_cache: Path, mount: MountFactory, tmp_path: Path
) -> None:
    archive, _ = mounted_with_cache_entry(read_only, mount, tmp_path)
    shown = tarfuse("--cache")
    assert shown.returncode == 0, shown.stderr
    header, row, total = shown.stdout.splitlines()
    assert header.split() == ["KIND", "SIZE", "LAST", "USE", "STATE", "ARCHIVE"]
    assert row.startswith("index+spill ")
    assert row.endswith(f"  in use  {archive}")
    assert total.startswith("total: 1 entry, ")
    assert total.endswith(f" in {user_cache}")
    listed = json.loads(tarfuse("--cache", "--json").stdout)
    assert listed["directory"] == str(user_cache)
    [entry] = listed["entries"]
    on_disk = sum(p.stat().st_blocks * 512 for p in user_cache.iterdir())
    assert entry["archive"] == str(archive)
    assert entry["member"] is False
    assert entry["kinds"] == ["index", "spill"]
    assert entry["size"] == listed["size"] == on_disk
    assert entry["size"] > 2 * BLOCK // 2  # the spill holds the decompressed archive, once
    assert entry["in_use"] is True
    assert entry["writing"] is False
    assert abs(entry["last_used_unix"] - time.time()) < 3600
    assert (user_cache / f"{entry['key']}.tarfuse-spill.zst").exists()


@pytest.mark.fuse
def test_prune_keeps_an_entry_in_use_and_removes_it_after_unmount(
    read_only: tuple[Path, Path], user_cache: Path, mount: MountFactory, tmp_path: Path
) -> None:
    archive, live = mounted_with_cache_entry(read_only, mount, tmp_path)
    rw, _ = read_only
    before = {"rw": tree(rw), "xdg": tree(user_cache.parent)}
    kept = tarfuse("--cache", "--prune")
    assert kept.returncode == 0, kept.stderr
    assert f"kept {archive} (" in kept.stdout
    assert "in use by a mount" in kept.stdout
    assert kept.stdout.splitlines()[-1] == f"freed 0 in {user_cache}"
    assert {"rw": tree(rw), "xdg": tree(user_cache.parent)} == before
    live.unmount()
    size = json.loads(tarfuse("--cache", "--json").stdout)["size"]
    pruned = tarfuse("--cache", "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert f"removed {archive} (index+spill, {size} (" in pruned.stdout
    assert pruned.stdout.splitlines()[-1].startswith(f"freed {size} (")
    assert list(user_cache.iterdir()) == []
    assert tree(rw) == before["rw"]  # the archive, and nothing else, untouched
    assert tree(user_cache.parent) == ["tarfuse"]
    assert tarfuse("--cache").stdout.splitlines()[-1] == f"total: 0 entries, 0, in {user_cache}"


def test_prune_json_and_a_dead_tarfuse_s_temporary_file(user_cache: Path) -> None:
    user_cache.mkdir(parents=True, mode=0o700)
    key = "ab" * 16
    url = "http://127.0.0.1:1/vm.tar.gz"
    (user_cache / f"{key}.tarfuse-index").write_bytes(b"x" * 5000)
    (user_cache / f"{key}.tarfuse-use").write_text(
        json.dumps({"archive": None, "identity": [url, 9, None, None]})
    )
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free: a tarfuse of that pid is gone
    stale = user_cache / f"{'cd' * 16}.tarfuse-spill.zst.{dead.pid}.abcdefgh.tarfuse-tmp"
    stale.write_bytes(b"y" * 9000)
    other = user_cache / "notes.txt"
    other.write_text("not ours")
    for path in user_cache.iterdir():
        path.chmod(0o600)
    stale_size = stale.stat().st_blocks * 512
    [row] = [line for line in tarfuse("--cache").stdout.splitlines() if line.endswith(f"  {url}")]
    assert row.split()[0] == "index"  # a URL's entry names its URL
    shown = tarfuse("--cache", "--prune", "--json")
    assert shown.returncode == 0, shown.stderr
    pruned = json.loads(shown.stdout)
    assert set(pruned) == {"directory", "removed", "stale", "kept", "freed"}
    [removed] = pruned["removed"]
    assert (removed["key"], removed["archive"], removed["kinds"]) == (key, url, ["index"])
    assert pruned["stale"] == [{"name": stale.name, "size": stale_size}]
    assert pruned["kept"] == []
    assert pruned["freed"] == removed["size"] + stale_size
    assert sorted(p.name for p in user_cache.iterdir()) == ["notes.txt"]


def test_a_cache_directory_not_made_yet_is_said_and_not_made(user_cache: Path) -> None:
    shown = tarfuse("--cache")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"no cache directory: {user_cache} does not exist (a mount would make it)\n"
    assert not user_cache.exists()
    assert json.loads(tarfuse("--cache", "--json").stdout)["entries"] == []
    assert not user_cache.exists()


@pytest.mark.parametrize(
    ("words", "said"),
    [
        (["--cache", "vm.tar"], "--cache takes no ARCHIVE, MOUNTPOINT or --list (vm.tar)"),
        (["--cache", "vm.tar", "/mnt"], "(vm.tar /mnt)"),
        (["--cache", "--list"], "(--list)"),
        (["--prune"], "--prune goes with --cache"),
        ([], "the following arguments are required: ARCHIVE"),
    ],
)
def test_cache_words_that_do_not_go_together_are_usage_errors(
    words: list[str], said: str, user_cache: Path
) -> None:
    shown = tarfuse(*words)
    assert shown.returncode == 2
    assert said in shown.stderr
    assert not user_cache.exists()
