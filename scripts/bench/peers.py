"""The peers, measured with `--peers`: other programs that serve a member of a tar, run as their authors
document. Each is installed when missing (host.py): ratarmount from PyPI into a venv of its own, the others
from Debian.
"""

import os
from pathlib import Path

from .data import Dataset
from .host import CACHE, venv_install
from .tools import FuseTool, Tool, first_line


class Ratarmount(FuseTool):
    """ratarmount from PyPI, in its own venv; `--index-file :memory:` so every mount indexes afresh."""

    name, role = "ratarmount", "peer"
    venv = CACHE / "venv-ratarmount"

    def _setup(self) -> None:
        venv_install(self.venv, "ratarmount")

    def version(self) -> str:
        return first_line([str(self.venv / "bin" / "ratarmount"), "--version"])

    def argv(self, dataset: Dataset, mountpoint: Path) -> tuple[list[str], Path]:
        program = str(self.venv / "bin" / "ratarmount")
        command = [program, "-f", "--index-file", ":memory:", str(dataset.archive), str(mountpoint)]
        return command, mountpoint / dataset.member


class NbdkitTar(FuseTool):
    """nbdkit's tar filter (it asks GNU tar for the member's offset) behind nbdfuse."""

    name, role = "nbdkit+nbdfuse", "peer"
    commands = ("nbdkit", "nbdfuse")
    apt_packages = (("nbdkit",), ("nbdfuse", "libnbd-bin"))  # Debian 12 ships nbdfuse in libnbd-bin

    def version(self) -> str:
        return f"{first_line(['nbdkit', '--version'])}; {first_line(['nbdfuse', '--version'])}"

    def argv(self, dataset: Dataset, mountpoint: Path) -> tuple[list[str], Path]:
        image = mountpoint / os.path.basename(dataset.member)
        server = ["nbdkit", "--exit-with-parent", "-r", "file", str(dataset.archive), "--filter=tar"]
        return ["nbdfuse", "-r", str(image), "[", *server, f"tar-entry={dataset.member}", "]"], image


class Archivemount(FuseTool):
    name, role = "archivemount", "peer"
    commands = ("archivemount",)
    apt_packages = (("archivemount",),)

    def version(self) -> str:
        return first_line(["archivemount", "--version"])

    def argv(self, dataset: Dataset, mountpoint: Path) -> tuple[list[str], Path]:
        command = ["archivemount", "-f", "-o", "readonly", str(dataset.archive), str(mountpoint)]
        return command, mountpoint / dataset.member


class FuseArchive(FuseTool):
    """Google's fuse-archive (C++, libarchive), where Debian packages it (not in Debian 12)."""

    name, role = "fuse-archive", "peer"
    commands = ("fuse-archive",)
    apt_packages = (("fuse-archive",),)

    def version(self) -> str:
        return first_line(["fuse-archive", "--version"])

    def argv(self, dataset: Dataset, mountpoint: Path) -> tuple[list[str], Path]:
        return ["fuse-archive", "-f", str(dataset.archive), str(mountpoint)], mountpoint / dataset.member


def peers() -> list[Tool]:
    return [Ratarmount(), NbdkitTar(), Archivemount(), FuseArchive()]
