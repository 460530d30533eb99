"""What a test needs from the machine, or it is skipped with the reason: a program, root, loop devices.

The one module of the kit, with kit.fixtures, that imports pytest: scripts use the rest of the kit without it.
"""

import os
import shutil

import pytest


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
