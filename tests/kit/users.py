"""Throwaway user accounts for the tests that play root against another user, and commands run as them.

An account is made with useradd (its own group, no home, no login shell) and removed afterwards, so the
caller must be root. Commands run through runuser with a clean environment.
"""

import contextlib
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 30.0


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


def as_user(user: User, *command: str | Path) -> list[str]:
    """`command` run as `user` with a clean environment."""
    variables = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    settings = [f"{key}={value}" for key, value in variables.items()]
    return ["runuser", "-u", user.name, "--", "env", "-i", *settings, *map(str, command)]


def run_as(user: User, *command: str | Path) -> subprocess.CompletedProcess[str]:
    """Run `command` as `user`; raise CalledProcessError, with its output, if it fails."""
    return subprocess.run(
        as_user(user, *command), capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
