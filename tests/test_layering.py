"""The layering is a lint rule (pyproject.toml, ruff TID251): core modules cannot import pyfuse3 or trio."""

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


@pytest.mark.parametrize("source", ["import pyfuse3\n", "from trio import sleep\n", "import trio.lowlevel\n"])
def test_a_core_module_that_imports_fuse_or_trio_fails_lint(source: str) -> None:
    result = ruff_on("tarfuse/mapper.py", source)
    assert result.returncode == 1
    assert "TID251" in result.stdout


@pytest.mark.parametrize("module", ["fs", "eventloop", "daemon"])
def test_the_fuse_side_may_import_them(module: str) -> None:
    assert ruff_on(f"tarfuse/{module}.py", "import pyfuse3\nimport trio\n").returncode == 0
