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


CORE = ["tarfuse/image/mapper.py", "tarfuse/tar/archive.py", "tarfuse/sources/remote.py", "tarfuse/mount.py"]


@pytest.mark.parametrize("path", CORE)
@pytest.mark.parametrize("source", ["import pyfuse3\n", "from trio import sleep\n", "import trio.lowlevel\n"])
def test_a_core_module_that_imports_fuse_or_trio_fails_lint(path: str, source: str) -> None:
    result = ruff_on(path, source)
    assert result.returncode == 1
    assert "TID251" in result.stdout


@pytest.mark.parametrize("module", ["fs", "eventloop", "daemon"])
def test_the_fuse_side_may_import_them(module: str) -> None:
    assert ruff_on(f"tarfuse/serve/{module}.py", "import pyfuse3\nimport trio\n").returncode == 0


LOGGING_MODULES = {
    "tarfuse/cli.py",
    "tarfuse/serve/fs.py",
    "tarfuse/serve/daemon.py",
    "tarfuse/serve/workers.py",
    "tarfuse/sources/index.py",
}
LOG_CALL = re.compile(r"^\s*log(ging)?\.(debug|info|warning|error|exception|critical)\(", re.M)


def test_only_the_boundaries_and_the_background_pass_log() -> None:
    # errors.py's rule: everything else raises, and its caller decides (remote.py only quiets urllib3).
    logging_modules = {
        str(path.relative_to(PROJECT))
        for path in (PROJECT / "tarfuse").rglob("*.py")
        if LOG_CALL.search(path.read_text())
        or "getLogger(__name__)" in path.read_text()
        or 'getLogger("tarfuse")' in path.read_text()
    }
    assert logging_modules == LOGGING_MODULES
