"""--help, the man page and the README's option table are made from one list: they say the same."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tarfuse
from tarfuse import cli, manpage

README = Path(tarfuse.__file__).resolve().parents[1] / "README.md"
LICENSE = README.with_name("LICENSE")


def test_the_readme_option_table_is_the_generated_one() -> None:
    """Fails when cli.py's options change and the README was not regenerated (the command says how)."""
    text = README.read_text()
    begin, end = text.index(manpage.README_BEGIN), text.index(manpage.README_END)
    assert text[begin : end + len(manpage.README_END)] + "\n" == manpage.render_readme_table()


def test_help_names_every_mount_option() -> None:
    shown = subprocess.run([sys.executable, "-m", "tarfuse", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    for words, _ in cli.MOUNT_OPTION_HELP:
        assert f"  {words}\n" in shown.stdout


def test_the_man_page_renders_without_warnings_and_names_every_option(tmp_path: Path) -> None:
    if subprocess.run(["which", "man"], capture_output=True).returncode != 0:
        pytest.skip("man is not installed (Debian package man-db)")
    page = tmp_path / "tarfuse.1"
    page.write_text(manpage.render_man_page())
    shown = subprocess.run(
        ["man", "--warnings", "-l", page],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "200"},
    )
    assert shown.returncode == 0
    assert shown.stderr == ""
    for words, _ in cli.MOUNT_OPTION_HELP:
        assert f"-o {words}" in shown.stdout
    for flag in ("--foreground", "--list", "--json", "--debug-fuse", "--version"):
        assert flag in shown.stdout


def test_the_license_file_matches_pyproject() -> None:
    assert LICENSE.read_text().startswith("MIT License")
    assert 'license = "MIT"' in README.with_name("pyproject.toml").read_text()
