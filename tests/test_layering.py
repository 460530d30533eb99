"""The layering is a lint rule (pyproject.toml, ruff TID251): core modules cannot import pyfuse3 or trio."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tarfuse

PROJECT = Path(tarfuse.__file__).resolve().parents[1]


def ruff_on(path: str, source: str) -> subprocess.CompletedProcess[str]:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install .[dev])")
    return subprocess.run(
        [ruff, "check", "--select", "TID251", "--stdin-filename", path, "-"],
        input=source,
        capture_output=True,
        text=True,
        cwd=PROJECT,
    )


CORE = [
    "tarfuse/image/mapper.py",
    "tarfuse/tar/archive.py",
    "tarfuse/sources/http/archive.py",
    "tarfuse/mount.py",
    "tarfuse/passes.py",
]


@pytest.mark.parametrize("path", CORE)
@pytest.mark.parametrize("source", ["import pyfuse3\n", "from trio import sleep\n", "import trio.lowlevel\n"])
def test_a_core_module_that_imports_fuse_or_trio_fails_lint(path: str, source: str) -> None:
    result = ruff_on(path, source)
    assert result.returncode == 1
    assert "TID251" in result.stdout


@pytest.mark.parametrize("module", ["fs", "eventloop", "daemon"])
def test_the_fuse_side_may_import_them(module: str) -> None:
    assert ruff_on(f"tarfuse/serve/{module}.py", "import pyfuse3\nimport trio\n").returncode == 0


# Imports against the layering (tar, sources < image < the assembly < cli; serve beside the assembly),
# each one that was in the code once or would be the easy mistake: lint must refuse every one.
LEAKS = [
    ("tarfuse/sources/index.py", "from tarfuse.image.detect import has_image_suffix\n"),
    ("tarfuse/sources/index.py", "from tarfuse.tar.archive import scan_members\n"),
    ("tarfuse/sources/compressed.py", "from tarfuse.passes import IndexingPass\n"),
    ("tarfuse/sources/http/archive.py", "from tarfuse.options import MountOptions\n"),
    ("tarfuse/mount.py", "from tarfuse.serve.fs import ServedFile\n"),
    ("tarfuse/mount.py", "from tarfuse.serve.daemon import BackgroundJob\n"),
    ("tarfuse/background.py", "from tarfuse.serve import daemon\n"),
    ("tarfuse/serve/fs.py", "from tarfuse.mount import Assembly\n"),
    ("tarfuse/serve/daemon.py", "from tarfuse.sources.file import ArchiveFile\n"),
    ("tarfuse/image/open.py", "from tarfuse.mount import assemble\n"),
    ("tarfuse/tar/archive.py", "from tarfuse.sources.file import ByteSource\n"),
]


@pytest.mark.parametrize(("path", "source"), LEAKS)
def test_an_import_against_the_layering_fails_lint(path: str, source: str) -> None:
    result = ruff_on(path, source)
    assert result.returncode == 1, result.stdout
    assert "TID251" in result.stdout


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("tarfuse/cli.py", "from tarfuse.serve import daemon\n"),
        ("tarfuse/mount.py", "from tarfuse.served import ServedFile\n"),
        ("tarfuse/serve/fs.py", "from tarfuse.served import ServedFile\n"),
        ("tarfuse/image/open.py", "from tarfuse.sources.file import ByteSource\n"),
        ("tarfuse/passes.py", "from tarfuse.tar.archive import scan_members\n"),
    ],
)
def test_the_imports_the_layering_allows_pass_lint(path: str, source: str) -> None:
    assert ruff_on(path, source).returncode == 0


LOGGING_MODULES = {
    "tarfuse/cli.py",
    "tarfuse/serve/fs.py",
    "tarfuse/serve/daemon.py",
    "tarfuse/serve/workers.py",
    "tarfuse/sources/index.py",
    "tarfuse/passes.py",
}
LOG_CALL = re.compile(r"^\s*log(ging)?\.(debug|info|warning|error|exception|critical)\(", re.M)


def test_only_the_boundaries_and_the_background_pass_log() -> None:
    # errors.py's rule: everything else raises, and its caller decides (http/pools.py only quiets urllib3).
    logging_modules = {
        str(path.relative_to(PROJECT))
        for path in (PROJECT / "tarfuse").rglob("*.py")
        if LOG_CALL.search(path.read_text())
        or "getLogger(__name__)" in path.read_text()
        or 'getLogger("tarfuse")' in path.read_text()
    }
    assert logging_modules == LOGGING_MODULES


def test_no_module_of_the_package_is_over_500_lines() -> None:
    # A module past this does more than one job: split it along its jobs (README, the layer table).
    lengths = {
        str(p.relative_to(PROJECT)): len(p.read_text().splitlines())
        for p in (PROJECT / "tarfuse").rglob("*.py")
    }
    assert {path: n for path, n in lengths.items() if n > 500} == {}
