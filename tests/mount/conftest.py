"""Fixtures of the whole-mount tests: two throwaway users around an archive in the owner's directory."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.mounts import unmount
from kit.needs import require_root
from kit.users import Setup, dev_fuse_open_to_users, python_for, temporary_user


@pytest.fixture
def setup(sample_archive: Path) -> Iterator[Setup]:
    """An owner and another user (real accounts), the sample archive root's and 0444 in a directory of
    the owner's, and a mount point there; /dev/fuse open to users for the length of the test."""
    require_root()
    with contextlib.ExitStack() as stack:
        owner, other = stack.enter_context(temporary_user()), stack.enter_context(temporary_user())
        python = python_for(owner)
        if python is None:
            pytest.skip(f"user {owner.name} can run no python with tarfuse's packages (kit.users.python_for)")
        stack.enter_context(dev_fuse_open_to_users())
        home = Path(tempfile.mkdtemp(prefix="tarfuse-security-"))  # not under pytest's 0700 tmp_path
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        os.chown(home, owner.uid, owner.gid)
        home.chmod(0o755)
        archive = home / "vm.tar"
        shutil.copyfile(sample_archive, archive)
        archive.chmod(0o444)  # root's, read-only: the owner can read it, nobody can write it
        (mountpoint := home / "mnt").mkdir()
        os.chown(mountpoint, owner.uid, owner.gid)
        stack.callback(unmount, mountpoint)
        yield Setup(owner, other, python, archive, mountpoint)
