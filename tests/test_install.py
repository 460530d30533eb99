"""`make install`: a tarfuse of its own that mount.fuse3's fixed PATH finds and that outlives the checkout.

The install is a venv under PREFIX/lib/tarfuse holding a copy of tarfuse (`pip install .`), so this also shows
that `pip install .` into a fresh environment gives a working `tarfuse`.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from kit.mounts import daemon_mount, is_mounted
from kit.sample import SampleImage

import tarfuse

pytestmark = pytest.mark.fuse

CHECKOUT = Path(tarfuse.__file__).resolve().parents[1]
MOUNT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # plus PREFIX/bin: the shape of mount(8)'s fixed PATH


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.getuid() != 0:
        pytest.skip("make install may need apt-get for the build dependencies: run as root")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    prefix = tmp_path_factory.mktemp("prefix")
    result = make("install", f"PREFIX={prefix}")
    assert result.returncode == 0, result.stdout + result.stderr
    return prefix


def installed(prefix: Path, *args: str | Path, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    """Run the installed tarfuse as mount.fuse3 would: a bare environment and a fixed PATH, from /."""
    return subprocess.run(
        ["env", "-i", f"PATH={prefix}/bin:{MOUNT_PATH}", "tarfuse", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_the_installed_tarfuse_runs_its_own_copy_not_the_checkout(prefix: Path) -> None:
    version = installed(prefix, "--version").stdout
    assert version.startswith(f"tarfuse {tarfuse.__version__} (pyfuse3 ")
    assert "reads of local files answered in C" in version  # make install builds the patched pyfuse3
    python = prefix / "lib" / "tarfuse" / "bin" / "python"
    where = subprocess.run(
        [python, "-c", "import tarfuse; print(tarfuse.__file__)"], capture_output=True, text=True, cwd="/"
    )
    assert where.stdout.startswith(str(prefix / "lib" / "tarfuse")), where
    assert not where.stdout.startswith(str(CHECKOUT / "tarfuse"))


def test_the_installed_tarfuse_mounts_and_serves_the_image(
    prefix: Path, sample_archive: Path, sample_image: SampleImage, tmp_path: Path
) -> None:
    (mountpoint := tmp_path / "mnt").mkdir()
    command = ["env", "-i", f"PATH={prefix}/bin:{MOUNT_PATH}", "tarfuse", "-f", sample_archive, mountpoint]
    with daemon_mount(command, mountpoint, cwd="/") as served:
        assert (mountpoint / "disk.raw").read_bytes() == sample_image.data
    assert served.process.returncode == 0, served.stderr_text()
    assert not is_mounted(mountpoint)


def test_the_man_page_is_installed_and_renders(prefix: Path) -> None:
    page = prefix / "share" / "man" / "man1" / "tarfuse.1"
    shown = subprocess.run(
        ["man", "--warnings", "-l", page],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "100"},
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr == ""
    assert "-o member=PATH" in shown.stdout


def test_uninstall_removes_everything_install_made(prefix: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    result = make("install", f"PREFIX={other}")
    assert result.returncode == 0, result.stderr
    result = make("uninstall", f"PREFIX={other}")
    assert result.returncode == 0, result.stderr
    left = [p for p in other.rglob("*") if not p.is_dir()]
    assert left == []


def test_pip_install_into_a_fresh_venv_works_with_pyfuse3_from_the_index(
    sample_archive: Path, sample_image: SampleImage, tmp_path: Path
) -> None:
    """`pip install .` as a user would run it: pyfuse3 from the package index, without the lseek patch.
    tarfuse says so, serves the same bytes, and holes read as data, as they do without the patch."""
    if shutil.which("python3") is None:
        pytest.skip("no python3 to make a venv with")
    venv = tmp_path / "venv"
    made = subprocess.run(["python3", "-m", "venv", venv], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"python3 cannot make a venv here: {made.stderr.strip()[-200:]}")
    pip = subprocess.run(
        [venv / "bin" / "pip", "install", "-q", CHECKOUT], capture_output=True, text=True, timeout=600
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    version = subprocess.run([venv / "bin" / "tarfuse", "--version"], capture_output=True, text=True)
    assert "no lseek handler" in version.stdout, version.stdout + version.stderr
    assert "every read answered in Python" in version.stdout
    (mountpoint := tmp_path / "mnt").mkdir()
    with daemon_mount([venv / "bin" / "tarfuse", "-f", sample_archive, mountpoint], mountpoint, cwd="/"):
        image = mountpoint / "disk.raw"
        assert image.read_bytes() == sample_image.data
        fd = os.open(image, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_HOLE) == len(sample_image.data)  # all data, as before
        finally:
            os.close(fd)
    assert not is_mounted(mountpoint)
