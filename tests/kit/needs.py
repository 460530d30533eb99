"""What a test needs from the machine, or it is skipped with the reason: a program, root, loop devices.

With kit.fixtures and kit.ext4, the only modules of the kit that import pytest: scripts use the rest of
the kit without it.
"""

import os
import shutil
from pathlib import Path

import pytest

from kit import sample


def require_tool(name: str) -> str:
    """Return the path of the program `name`, or skip the test that needs it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def require_root() -> None:
    """Skip the test unless it runs as root (it creates user accounts or edits host settings)."""
    if os.getuid() != 0:
        pytest.skip("needs root: the test creates user accounts or changes host settings")


def make_archive(kind: str, source: Path, archive: Path) -> Path:
    """Archive the file `source`, under its basename, as `kind` (kit.sample.ARCHIVE_KINDS); skip the test
    if the tar program of `kind` is not installed."""
    if kind != "tarfile":
        require_tool(sample.TAR_COMMANDS[kind][0])
    return sample.make_archive(kind, source, archive)


def require_loop_devices() -> None:
    """Skip the test unless it can set up loop devices (root, /dev/loop-control)."""
    if os.getuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("loop devices need root and /dev/loop-control")
