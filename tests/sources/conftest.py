"""Fixtures of the sources' tests: a read-only place for archives, the cache directory of the test, and
another user with a directory they can reach (root opening what a user controls)."""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.mounts import read_only_bind
from kit.needs import require_root
from kit.users import User, temporary_user


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    """A throwaway unprivileged account (kit.users), one per test module; the tests need root."""
    require_root()
    with temporary_user() as made:
        yield made


@pytest.fixture
def top() -> Iterator[Path]:
    """A root-owned 0755 directory outside pytest's 0700 tmp_path, so that the user can reach into it."""
    path = Path(tempfile.mkdtemp(prefix="tarfuse-user-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(rw, ro): a directory and a read-only bind mount of it (root only); an archive in ro keeps its index
    and spill in the cache directory. Unmounted after the test's tarfuse mounts."""
    require_root()
    (rw := tmp_path / "rw").mkdir()
    (ro := tmp_path / "ro").mkdir()
    with read_only_bind(rw, ro):
        yield rw, ro


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache directory of this test's processes ($XDG_CACHE_HOME/tarfuse)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "tarfuse"
