"""The peers, measured with `--peers`: other programs that serve a member of a tar, run as their authors
document (docs/benchmarks.md). Each is installed when missing (host.py): ratarmount from PyPI into a venv
of its own, the others from Debian.
"""

from pathlib import Path

from .data import MEMBER, Dataset
from .host import CACHE, venv_install
from .tools import FuseTool, Tool, first_line


class Peer(FuseTool):
    """`PROGRAM OPTIONS... ARCHIVE MOUNTPOINT`, showing the member under its own name; PROGRAM from Debian."""

    role = "peer"

    def __init__(self, name: str, *options: str) -> None:
        self.name, self.options, self.needs = name, options, ((name, (name,)),)

    def program(self) -> str:
        return self.name

    def version(self) -> str:
        return first_line([self.program(), "--version"])

    def argv(self, dataset: Dataset, mountpoint: Path) -> tuple[list[str], Path]:
        command = [self.program(), *self.options, str(dataset.archive), str(mountpoint)]
        return command, mountpoint / MEMBER


class Ratarmount(Peer):
    """ratarmount from PyPI, in its own venv; `--index-file :memory:` so every mount indexes afresh."""

    venv = CACHE / "venv-ratarmount"

    def __init__(self) -> None:
        super().__init__("ratarmount", "-f", "--index-file", ":memory:")

    def program(self) -> str:
        return str(self.venv / "bin" / "ratarmount")

    def _setup(self) -> None:
        venv_install(self.venv, "ratarmount")


class NbdkitTar(FuseTool):
    """nbdkit's tar filter (it asks GNU tar for the member's offset) behind nbdfuse."""

    name, role = "nbdkit+nbdfuse", "peer"
    needs = (("nbdkit", ("nbdkit",)), ("nbdfuse", ("nbdfuse", "libnbd-bin")))  # Debian 12: in libnbd-bin

    def version(self) -> str:
        return f"{first_line(['nbdkit', '--version'])}; {first_line(['nbdfuse', '--version'])}"

    def argv(self, dataset: Dataset, mountpoint: Path) -> tuple[list[str], Path]:
        image = mountpoint / MEMBER
        server = ["nbdkit", "--exit-with-parent", "-r", "file", str(dataset.archive), "--filter=tar"]
        return ["nbdfuse", "-r", str(image), "[", *server, f"tar-entry={MEMBER}", "]"], image


def peers() -> list[Tool]:
    """ratarmount, nbdkit's tar filter, archivemount, and Google's fuse-archive (C++, libarchive) where
    Debian packages it (not in Debian 12)."""
    return [
        Ratarmount(),
        NbdkitTar(),
        Peer("archivemount", "-f", "-o", "readonly"),
        Peer("fuse-archive", "-f"),
    ]
