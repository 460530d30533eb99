"""What the mount of a plain local tar imports: nothing that only compressed or http(s) archives need.

Imports are most of the time a mount takes to become ready (docs/benchmarks.md, ready time): the HTTP
client, the decompressors, the seek index and json are imported where they are used. trio and pyfuse3
import ssl, hashlib, lzma and bz2 themselves (through shutil and trio's TLS streams), so those are not
checked here.
"""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

NOT_FOR_A_PLAIN_MOUNT = (
    # http(s) archives
    "urllib3",
    "urllib.request",
    "http.client",
    "concurrent.futures",  # the block cache's futures
    # compressed archives and members
    "gzip",
    "rapidgzip",
    "xz",
    "pyzstd",
    "tarfuse.sources.index",
    "tarfuse.sources.spill",
    "tarfuse.sources.dictzip",
    "tarfuse.sources.zstdframes",
    "json",  # --list --json and the gzip index
    # what the command does only when asked
    "tarfuse.manpage",
    "setproctitle",
)

# The mount path up to the FUSE mount itself: the command's modules, then the archive opened and the image
# built, as _mount does before daemon.mount.
PROBE = """
import sys
import tarfuse.cli
from tarfuse.mount import assemble
from tarfuse.options import MountOptions

assembly = assemble(sys.argv[1], MountOptions(), several=True)
assembly.close()
print(*(f"module {name}" for name in sys.modules), sep="\\n")
"""


def modules_after(code: str, *args: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (its own sys.modules, not this one's)."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, timeout=60
    )
    return {line.split()[1] for line in result.stdout.splitlines() if line.startswith("module ")}


@pytest.fixture
def plain_tar(tmp_path: Path) -> Path:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\xeb\x63\x90" + bytes(64 * 1024 - 3))
    archive = tmp_path / "vm.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(image, "disk.raw")
    return archive


def test_a_plain_mount_imports_nothing_that_only_other_archives_need(plain_tar: Path) -> None:
    imported = modules_after(PROBE, str(plain_tar))
    assert "tarfuse.serve.daemon" in imported  # the probe ran the mount path
    assert sorted(imported.intersection(NOT_FOR_A_PLAIN_MOUNT)) == []


def test_the_probe_sees_what_is_imported_when_it_is_used(plain_tar: Path) -> None:
    code = PROBE.replace("print(", "tarfuse.cli.main(['--list', '--json', sys.argv[1]])\nprint(", 1)
    assert "json" in modules_after(code, str(plain_tar))
