"""--help, the man page and the README's option table are made from one list: they say the same."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tarfuse
from tarfuse import cli, helptext, manpage
from tarfuse.sources import index, sidefiles

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
    for words, _ in helptext.MOUNT_OPTION_HELP:
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
    for words, _ in helptext.MOUNT_OPTION_HELP:
        assert f"-o {words}" in shown.stdout
    for flag in ("--foreground", "--list", "--json", "--debug-fuse", "--version"):
        assert flag in shown.stdout


def _shown_man_page(source: str, tmp_path: Path, width: int = 200) -> subprocess.CompletedProcess[str]:
    """The page as man(1) shows it `width` columns wide, with every warning groff has on stderr."""
    if shutil.which("man") is None:
        pytest.skip("man is not installed (Debian package man-db)")
    page = tmp_path / "tarfuse.1"
    page.write_text(source)
    return subprocess.run(
        ["man", "--warnings", "-l", page],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": str(width)},
    )


def test_the_man_page_has_every_section_an_admin_looks_for(tmp_path: Path) -> None:
    shown = _shown_man_page(manpage.render_man_page("/usr/share/doc/tarfuse"), tmp_path)
    assert shown.returncode == 0
    assert shown.stderr == ""
    headings = [line for line in shown.stdout.splitlines() if line[:1].isalpha() and line.isupper()]
    assert headings == [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "MOUNT OPTIONS",
        "FILES",
        "ENVIRONMENT",
        "EXIT STATUS",
        "EXAMPLES",
        "SEE ALSO",
    ]


def test_the_man_page_says_what_archive_may_be_and_what_a_mount_leaves_on_disk(tmp_path: Path) -> None:
    shown = _shown_man_page(manpage.render_man_page(), tmp_path).stdout
    text = " ".join(shown.split())  # words, whatever man's line breaks and justification
    for words in (".tar.zst", ".img.xz", "an OVA", "https:// URL", "MOUNTPOINT is a directory"):
        assert words in text
    for words in (".tarfuse-index", ".tarfuse-spill.zst", "/var/cache/tarfuse", "~/.cache/tarfuse"):
        assert words in text
    for words in ("spill_max=SIZE", "cache_max=SIZE", "tarfuse --cache --prune", "tarfuse --cache [--prune]"):
        assert words in text
    for words in ("HTTPS_PROXY", "NO_PROXY", "XDG_CACHE_HOME"):
        assert words in text
    for words in ("-o all vm.ova /mnt/ova", "_netdev", "Type=fuse.tarfuse", cli.FSTAB_EXAMPLE):
        assert " ".join(words.split()) in text
    assert "Exit status: 0 success" in text


def test_the_side_file_names_in_the_docs_are_the_ones_tarfuse_writes() -> None:
    page = manpage.render_man_page()
    for suffix in (index.SUFFIX, index.SPILL_SUFFIX):
        assert suffix.replace("-", "\\-") in page
    assert sidefiles.SYSTEM_CACHE in page


def test_the_man_page_unit_is_the_readme_unit() -> None:
    """The systemd unit of EXAMPLES and the README's say the same: every line of one is in the other."""
    unit = next(example for _, example in manpage.EXAMPLES if "[Mount]" in example)
    readme = README.read_text()
    block = readme[readme.index("# /etc/systemd/system/mnt-vm.mount") :]
    block = block[: block.index("```")]
    assert [line for line in unit.splitlines() if line] == [
        line for line in block.splitlines()[1:] if line and not line.startswith("#")
    ]


def test_help_says_archive_may_be_compressed_or_a_url() -> None:
    shown = subprocess.run([sys.executable, "-m", "tarfuse", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    for words in (
        ".tar.gz",
        ".tar.zst",
        ".tar.xz",
        ".tar.bz2",
        ".img.xz",
        "OVA",
        "http(s) URL",
        "https:// URL",
    ):
        assert words in text
    assert "tar archive holding the image" not in text


def test_installed_docs_are_the_ones_the_man_page_names(tmp_path: Path) -> None:
    """make install-docs (which make install runs) puts every document the page names where it says."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    made = subprocess.run(
        [
            "make",
            "-C",
            README.parent,
            "install-docs",
            f"PREFIX={tmp_path}",
            f"MANPAGE_PYTHON={sys.executable}",
        ],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    doc_dir = tmp_path / "share" / "doc" / "tarfuse"
    source = (tmp_path / "share" / "man" / "man1" / "tarfuse.1").read_text()
    for name in manpage.DOCS:
        assert (doc_dir / name).is_file()
        assert f"{doc_dir}/{name}".replace("-", "\\-") in source
    for width in (80, 100, 200):  # a long path on a narrow page once made groff warn "cannot adjust line"
        shown = _shown_man_page(source, tmp_path, width)
        assert shown.returncode == 0
        assert shown.stderr == ""


def test_uninstall_names_the_caches_it_leaves_and_deletes_none(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    kept = tmp_path / "vm.tar.gz.tarfuse-index"
    kept.write_bytes(b"an index")
    made = subprocess.run(
        ["make", "-C", README.parent, "uninstall", f"PREFIX={tmp_path / 'prefix'}"],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    said = " ".join(made.stdout.split())
    for words in (
        "/var/cache/tarfuse",
        "~/.cache/tarfuse",
        "$XDG_CACHE_HOME/tarfuse",
        index.SUFFIX,
        index.SPILL_SUFFIX,
    ):
        assert words in said
    assert kept.read_bytes() == b"an index"


def test_the_license_file_matches_pyproject() -> None:
    assert LICENSE.read_text().startswith("MIT License")
    assert 'license = "MIT"' in README.with_name("pyproject.toml").read_text()
