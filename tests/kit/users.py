"""Throwaway user accounts for the tests that play root against another user, and commands run as them.

An account is made with useradd (its own group, no home, no login shell) and removed afterwards, so the
caller must be root. Commands run through runuser with a clean environment. `python_for` finds an
interpreter the user can run tarfuse with, and `dev_fuse_open_to_users` lets users open /dev/fuse for the
length of a test, so that a user can mount through setuid fusermount3.
"""

import contextlib
import os
import pwd
import stat
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tarfuse

TIMEOUT = 30.0
DEV_FUSE = Path("/dev/fuse")
PROJECT = Path(tarfuse.__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: int
    gid: int


@contextlib.contextmanager
def temporary_user(prefix: str = "tfuser") -> Iterator[User]:
    """A fresh unprivileged account with its own group and no home; removed afterwards."""
    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)  # if userdel left it


def as_user(user: User, *command: str | Path, env: dict[str, str] | None = None) -> list[str]:
    """`command` run as `user` with a clean environment, plus the variables `env`."""
    variables = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", **(env or {})}
    settings = [f"{key}={value}" for key, value in variables.items()]
    return ["runuser", "-u", user.name, "--", "env", "-i", *settings, *map(str, command)]


def run_as(user: User, *command: str | Path) -> subprocess.CompletedProcess[str]:
    """Run `command` as `user`; raise CalledProcessError, with its output, if it fails."""
    return subprocess.run(
        as_user(user, *command), capture_output=True, text=True, timeout=TIMEOUT, check=True
    )


def sha256_as(user: User, path: Path) -> subprocess.CompletedProcess[str]:
    """`sha256sum path` run as `user`, whether it succeeds or not."""
    return subprocess.run(
        as_user(user, "sha256sum", path), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


@dataclass(frozen=True, slots=True)
class Python:
    """An interpreter a user can run, with what it needs to import tarfuse."""

    executable: str
    env: dict[str, str]

    def tarfuse(self, user: User, *args: str | Path) -> list[str]:
        return as_user(user, self.executable, "-m", "tarfuse", *args, env=self.env)


def python_for(user: User) -> Python | None:
    """The venv's interpreter if `user` can run it; else the same python version from /usr/bin with
    tarfuse's sources and site-packages on PYTHONPATH (the venv may live where users cannot go, as a
    pyenv under /root); None if the user can run neither."""
    paths = os.pathsep.join([str(PROJECT), sysconfig.get_paths()["purelib"]])
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Python(sys.executable, {}), Python(system, {"PYTHONPATH": paths})):
        check = as_user(user, candidate.executable, "-c", "import tarfuse, pyfuse3, trio", env=candidate.env)
        if subprocess.run(check, capture_output=True, timeout=TIMEOUT, check=False).returncode == 0:
            return candidate
    return None


@contextlib.contextmanager
def dev_fuse_open_to_users() -> Iterator[None]:
    """Give /dev/fuse Debian's mode 0666 if users cannot open it; restore it afterwards.

    libfuse 3 opens /dev/fuse itself before it calls fusermount3, so a root-only /dev/fuse (as in some
    containers) stops every unprivileged mount; Debian's udev makes it 0666 (50-udev-default.rules).
    """
    mode = stat.S_IMODE(DEV_FUSE.stat().st_mode)
    wanted = mode | 0o666
    if wanted != mode:
        DEV_FUSE.chmod(wanted)
    try:
        yield
    finally:
        if wanted != mode:
            DEV_FUSE.chmod(mode)


@dataclass(frozen=True, slots=True)
class Setup:
    """An owner and another user, a directory of the owner's holding a root-owned 0444 archive."""

    owner: User
    other: User
    python: Python
    archive: Path
    mountpoint: Path
