"""-o all's symlinks: only those the kernel cannot follow out of the mount are served.

The unit tests give tarfuse.image.links the served files and the archive's links as mount.py does; the
mount test builds the tree with real links, tars it with GNU tar, mounts it with -o all and asks the kernel
and `readlink -f` where every served link leads.
"""

import os
import random
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.mounts import MountFactory
from kit.needs import require_tool

from tarfuse.image.links import LOOP, MAX_HOPS, NOWHERE, OUTSIDE, notes_on, symlinks_inside

FILES = ["vm/disk.img", "vm/same.img", "vm.mf"]  # vm/same.img: what tar -x makes of a hard link
DEEP = "a/b/c/d/e/f/g/h"  # eight directories, as in the attack below
ATTACK = [
    (f"{DEEP}/up", "../../../../../../../.."),  # the mount's root: inside, on paper and in the kernel
    ("shadow", f"{DEEP}/up/../../../../../../../../../etc/shadow"),  # lexically inside; in fact /etc/shadow
]


def split(
    links: Sequence[tuple[str, str]], files: Sequence[str] = FILES
) -> tuple[dict[str, str], dict[str, str]]:
    """{path: target} of the links served, {name: reason} of those left out."""
    kept, left_out = symlinks_inside(files, links)
    return dict(kept), {entry.name: entry.reason for entry in left_out}


def chain(names: Sequence[str], end: str) -> list[tuple[str, str]]:
    """names[0] -> names[1] -> ... -> names[-1] -> end."""
    return [(name, target) for name, target in zip(names, [*names[1:], end], strict=True)]


def test_the_link_to_the_root_is_kept_and_the_link_through_it_to_etc_shadow_is_left_out() -> None:
    kept, left_out = split(ATTACK)
    assert kept == {f"{DEEP}/up": "../../../../../../../.."}
    assert left_out == {"shadow": OUTSIDE}


@pytest.mark.parametrize("depth", range(1, 11))
def test_dot_dot_through_a_link_is_the_parent_of_where_the_link_leads(depth: int) -> None:
    below = "/".join(f"d{i}" for i in range(depth))
    up = "/".join([".."] * depth)
    links = [
        (f"{below}/root", up),  # back to the root: kept
        (f"{below}/above", f"{up}/.."),  # one more: out
        ("through", f"{below}/root/.."),  # up from the root the link leads to: out
        ("into", f"{below}/root/vm/disk.img"),  # down from it: kept
        ("lexical", f"{below}/root/{up}/vm.mf"),  # as text d0/vm.mf, inside; followed, out
    ]
    kept, left_out = split(links)
    assert sorted(kept) == sorted([f"{below}/root", "into"])
    assert left_out == {f"{below}/above": OUTSIDE, "through": OUTSIDE, "lexical": OUTSIDE}


def test_dot_dot_after_a_link_to_a_directory_is_not_taken_as_text() -> None:
    # Lexically deep/vm/disk.img, which does not exist; in the kernel, vm/.. is the root: vm/disk.img.
    kept, left_out = split([("deep/vm", "../vm"), ("x", "deep/vm/../vm/disk.img")])
    assert kept == {"deep/vm": "../vm", "x": "deep/vm/../vm/disk.img"}
    assert left_out == {}


def test_a_chain_of_links_inside_is_kept() -> None:
    kept, left_out = split([("a", "b"), ("b", "vm/disk.img"), ("vm/dir", "."), ("c", "vm/dir/dir/disk.img")])
    assert set(kept) == {"a", "b", "vm/dir", "c"}
    assert left_out == {}


def test_a_link_to_a_link_to_a_hard_link_is_kept() -> None:
    kept, left_out = split([("vm/current", "latest"), ("vm/latest", "same.img")])
    assert kept == {"vm/current": "latest", "vm/latest": "same.img"}
    assert left_out == {}


def test_a_chain_of_the_kernels_40_links_is_kept_and_one_more_is_a_loop() -> None:
    names = [f"l{i}" for i in range(MAX_HOPS + 1)]  # l0 -> l1 -> ... -> l40 -> the image: 41 links from l0
    kept, left_out = split(chain(names, "vm/disk.img"))
    assert set(kept) == set(names[1:])
    assert left_out == {"l0": LOOP}


@pytest.mark.parametrize(
    "links",
    [
        [("self", "self")],
        [("self", "./self")],
        [("one", "two"), ("two", "one")],
        [("one", "two"), ("two", "vm/../three"), ("three", "one")],
        [("deeper", "deeper/x")],
        [("vm/up", "../vm/up/disk.img")],
    ],
    ids=["itself", "itself-dot", "two", "three", "through-itself", "through-itself-up"],
)
def test_loops_are_left_out(links: list[tuple[str, str]]) -> None:
    kept, left_out = split(links)
    assert kept == {}
    assert left_out == {name: LOOP for name, _ in links}


def test_a_link_into_a_loop_is_left_out_and_the_others_stay() -> None:
    kept, left_out = split([("in", "one/x"), ("one", "two"), ("two", "one"), ("fine", "vm.mf")])
    assert kept == {"fine": "vm.mf"}
    assert left_out == {"in": LOOP, "one": LOOP, "two": LOOP}


@pytest.mark.parametrize("target", ["/", "/etc/shadow", "//etc", "/dev/vda", "/vm/disk.img"])
def test_absolute_targets_are_left_out(target: str) -> None:
    assert split([("abs", target), ("via", "abs")]) == ({}, {"abs": OUTSIDE, "via": OUTSIDE})


@pytest.mark.parametrize(
    "target",
    [
        "",
        "nothing",
        "vm/nothing",
        "vm/disk.img/",
        "vm/disk.img/.",
        "vm/disk.img/..",
        "vm/disk.img/x",
        "x" * 4096,
    ],
    ids=["empty", "missing", "missing-in-dir", "slash", "dot", "dot-dot", "below", "too-long"],
)
def test_links_that_lead_nowhere_in_the_mount_are_left_out(target: str) -> None:
    kept, left_out = split([("nowhere", target), ("ok", "vm")])
    assert kept == {"ok": "vm"}
    assert left_out == {"nowhere": NOWHERE}


def test_a_link_to_a_file_followed_by_a_slash_is_left_out() -> None:
    kept, left_out = split([("image", "vm/disk.img"), ("dir", "image/")])
    assert kept == {"image": "vm/disk.img"}
    assert left_out == {"dir": NOWHERE}


def test_a_link_through_a_directory_that_only_a_left_out_link_made_is_left_out() -> None:
    # q/ exists only for q/evil: served without it, there is no q/, and y would lead nowhere.
    kept, left_out = split([("q/evil", "/etc"), ("y", "q/../vm/disk.img"), ("z", "y")])
    assert kept == {}
    assert left_out == {"q/evil": OUTSIDE, "y": NOWHERE, "z": NOWHERE}
    kept, _ = split([("q/evil", "/etc"), ("q/fine", "../vm.mf"), ("y", "q/../vm/disk.img")])
    assert set(kept) == {"q/fine", "y"}  # q/ stays for q/fine, and y with it


def test_links_with_no_place_in_the_tree_are_neither_served_nor_named() -> None:
    # serve/fs.py drops these too: a path taken by a file, one under a file, one under a link.
    kept, left_out = split(
        [("vm/disk.img", "vm.mf"), ("vm.mf/x", "vm"), ("l", "vm"), ("l/x", "vm"), ("./l", "x")]
    )
    assert kept == {"l": "vm"}
    assert left_out == {}


def test_paths_are_the_served_paths_and_a_link_with_none_is_named() -> None:
    kept, left_out = split([("./vm/./link", "disk.img"), ("./", "vm")])
    assert kept == {"vm/link": "disk.img"}
    assert left_out == {"./": NOWHERE}


def test_a_chain_as_long_as_an_archive_is_wide_is_walked_once() -> None:
    # Each link resolved once, without recursion: 20,000 links, each the next one's target.
    names = [f"n{i}" for i in range(20_000)]
    kept, left_out = split(chain(names, "vm/disk.img"))
    assert len(kept) == MAX_HOPS
    assert len(left_out) == len(names) - MAX_HOPS
    assert set(left_out.values()) == {LOOP}


def test_the_notes_name_a_few_left_out_links_escaped() -> None:
    links = [(f"evil{i}\n\x1b[8m", f"/etc/{i}\x1b]0;x\x07") for i in range(7)] + [("gone", "x/" * 2000)]
    _, left_out = symlinks_inside(FILES, links)
    outside, nowhere = notes_on(left_out)
    assert outside.startswith(r"-o all: 7 symlink(s) pointing outside the mount are left out: evil0\n\x1b[8m")
    assert r"/etc/0\x1b]0;x\x07" in outside
    assert outside.endswith(", ...")
    assert "evil5" not in outside
    assert "1 symlink(s) leading nowhere in the mount" in nowhere
    assert nowhere.endswith("gone -> " + "x/" * 60 + "...")  # a target can be long: the line is not
    assert not any(ord(char) < 0x20 for char in outside + nowhere)
    assert notes_on([]) == ()


SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None  # tmpfs: hundreds of small trees, made fast
NAMES = st.sampled_from(["a", "b", "c"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map("/".join)
TARGETS = st.builds(
    lambda absolute, parts: ("/" if absolute else "") + ("/".join(parts) or "."),
    st.integers(0, 5).map(lambda n: n == 0),  # absolute, now and then
    st.lists(st.sampled_from(["a", "b", "c", "..", "..", ".", ""]), min_size=1, max_size=6),
)


def build(root: Path, files: Sequence[str], links: Sequence[tuple[str, str]]) -> None:
    """Make on disk the tree serve/fs.py makes: files first, then links; an entry whose path is taken or
    runs through something that is not a directory is skipped. (Decided here with lstat, not by links.py.)"""
    root.mkdir()
    for path, target in [*((path, None) for path in files), *links]:
        *directories, name = path.split("/")
        parent = root
        for directory in directories:
            parent /= directory
            if not os.path.lexists(parent):
                parent.mkdir()
            elif not stat.S_ISDIR(parent.lstat().st_mode):
                break
        else:
            if os.path.lexists(parent / name):
                continue
            if target is None:
                (parent / name).write_bytes(b"")
            else:
                os.symlink(target, parent / name)


def reaches_inside(root: Path, path: str) -> bool:
    """Whether the kernel follows `path` (under `root`) to something, and that something is in `root`."""
    try:
        os.stat(root / path)  # the kernel's walk: its 40-link limit, .. after a link
    except OSError:
        return False
    return (os.path.realpath(root / path) + os.sep).startswith(str(root) + os.sep)


@settings(max_examples=100, deadline=None)
@given(
    files=st.lists(PATHS, min_size=1, max_size=4),
    links=st.lists(st.tuples(PATHS, TARGETS), max_size=8),
)
def test_the_kernel_agrees_on_random_trees(files: list[str], links: list[tuple[str, str]]) -> None:
    """Every kept link reaches inside once the others are gone; a link left out, put back alone, does not."""
    kept, left_out = symlinks_inside(files, links)
    with tempfile.TemporaryDirectory(dir=SCRATCH) as top:
        served = Path(top, "mnt-root")  # a name no path uses: a walk that leaves cannot come back in
        build(served, files, kept)
        for path, _ in kept:
            assert reaches_inside(served, path), (path, kept)
        for i, entry in enumerate(left_out):
            alone = Path(top, f"alone{i}", "mnt-root")
            alone.parent.mkdir()
            build(alone, files, [*kept, (entry.name, entry.target)])
            assert not reaches_inside(alone, entry.name), entry


def make_tree(top: Path, image: bytes) -> None:
    """The files, a hard link and links of every kind, as real links, for GNU tar to archive."""
    (top / "vm").mkdir(parents=True)
    (top / "vm" / "disk.img").write_bytes(image)
    os.link(top / "vm" / "disk.img", top / "vm" / "same.img")  # GNU tar stores it as a hard link
    deep = top / DEEP
    deep.mkdir(parents=True)
    links = [
        *ATTACK,
        ("vm/current", "latest"),  # a link to a link to a hard link
        ("vm/latest", "same.img"),
        ("a-chain", "b-chain"),
        ("b-chain", "vm/disk.img"),
        ("dev", f"{DEEP}/up/../../../../../../../../../dev/vda"),
        ("root", "vm/../../../../../../../../.."),
        ("abs", "/etc/passwd"),
        ("loop", "loop2/x"),
        ("loop2", "loop"),
        ("missing", "vm/nothing"),
        *chain([f"hop{i:02}" for i in range(MAX_HOPS + 1)], "vm/disk.img"),
    ]
    for name, target in links:
        os.symlink(target, top / name)


@pytest.mark.fuse
def test_every_link_served_by_a_mount_of_a_gnu_tar_stays_inside(mount: MountFactory, tmp_path: Path) -> None:
    require_tool("tar")
    image = random.Random(20).randbytes(64 * 1024)
    make_tree(tmp_path / "tree", image)
    archive = tmp_path / "vm.tar"
    subprocess.run(
        ["tar", "--format=gnu", "--sort=name", "-cf", archive, "-C", tmp_path / "tree", "."], check=True
    )
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    running = mount(archive, mountpoint, "-o", "all")
    served = sorted(
        Path(top, name)
        for top, dirs, files in os.walk(mountpoint)
        for name in dirs + files
        if Path(top, name).is_symlink()
    )
    names = {str(path.relative_to(mountpoint)) for path in served}
    assert names == {
        f"{DEEP}/up",
        "vm/current",
        "vm/latest",
        "a-chain",
        "b-chain",
        *(f"hop{i:02}" for i in range(1, 41)),
    }
    inside = str(mountpoint) + os.sep
    for path in served:
        assert (os.path.realpath(path, strict=True) + os.sep).startswith(inside), path
    followed = subprocess.run(["readlink", "-f", *served], capture_output=True, text=True, check=True).stdout
    assert all(line.startswith(inside) or line == str(mountpoint) for line in followed.splitlines())
    assert (mountpoint / "a-chain").read_bytes() == image
    assert (mountpoint / "vm" / "current").read_bytes() == image
    assert (mountpoint / "hop01").read_bytes() == image  # 40 links: as many as the kernel follows
    assert (mountpoint / DEEP / "up" / "vm" / "disk.img").read_bytes() == image
    for name in ("shadow", "dev", "root", "abs", "loop", "loop2", "missing", "hop00"):
        assert not os.path.lexists(mountpoint / name), name
    log = running.stderr_text()
    assert "4 symlink(s) pointing outside the mount are left out: ./abs -> /etc/passwd, ./dev -> " in log
    assert "4 symlink(s) leading nowhere in the mount" in log
