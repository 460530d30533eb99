"""Fixtures that tests in several folders share, loaded by tests/conftest.py (`pytest_plugins`).

The code behind them is the kit's; what is here is only what needs pytest.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kit.httpserver import RangeServer, serve, write_tls_files
from kit.needs import require_tool
from kit.objectstores import ObjectStore, azurite_missing_reason, fresh_proxy, running_store
from kit.qemu import boot


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: `serve(tls=tls_files)`, `ca_file=cert`."""
    return write_tls_files(tmp_path_factory.mktemp("tls"), require_tool("openssl"))


BOOT_TIMEOUT = 60.0
BootSerial = Callable[[Path, str], tuple[str, str]]  # the fixture boot_and_read_serial


@pytest.fixture
def boot_and_read_serial(tmp_path: Path) -> BootSerial:
    """Return `boot_and_read_serial(image, expected) -> (COM1, QEMU's output)`: boot `image` in QEMU until
    `expected` shows on COM1 (kit.qemu.boot), keeping COM1's output in com1.log of the test's tmp_path."""

    def run(image: Path, expected: str) -> tuple[str, str]:
        booted = boot(image, expected, BOOT_TIMEOUT, require_tool("qemu-system-x86_64"))
        (tmp_path / "com1.log").write_text(booted.serial)
        return booted.serial, booted.output

    return run


@pytest.fixture
def no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests talk to loopback addresses only: a proxy set on the machine must not come between."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point $XDG_CACHE_HOME, where tarfuse keeps the indexes of URLs, into the test's own directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


@pytest.fixture
def server(no_proxy_from_outside: None) -> Iterator[RangeServer]:
    """A range-capable HTTP server on 127.0.0.1 (kit.httpserver) for the length of the test."""
    with serve() as running:
        yield running


# Object stores (kit.objectstores): each emulator runs once per session, with an empty bucket "images" and
# a proxy in front of it; `s3_store`, `gcs_store`, `azure_store` share that proxy across the session, the
# function-scoped `object_store` (parametrized over the three) gives each test a proxy of its own.


def _object_store(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    with running_store(kind, tmp_path_factory.mktemp(f"store-{kind}")) as store:
        yield store


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """moto's S3 server (kit.objectstores) for the session."""
    yield from _object_store("s3", tmp_path_factory)


@pytest.fixture(scope="session")
def gcs_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """gcp-storage-emulator (kit.objectstores) for the session."""
    require_tool("openssl")  # the service account's key
    yield from _object_store("gs", tmp_path_factory)


@pytest.fixture(scope="session")
def azure_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """Azurite's blob service (kit.objectstores) for the session; skips if Azurite is not installed."""
    reason = azurite_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    yield from _object_store("az", tmp_path_factory)


_STORE_FIXTURES = {"s3": "s3_store", "gs": "gcs_store", "az": "azure_store"}


@pytest.fixture(params=list(_STORE_FIXTURES))
def object_store(request: pytest.FixtureRequest, no_proxy_from_outside: None) -> Iterator[ObjectStore]:
    """Each of the three stores (test ids s3, gs, az), through a proxy of the test's own."""
    shared: ObjectStore = request.getfixturevalue(_STORE_FIXTURES[request.param])
    with fresh_proxy(shared) as store:
        yield store
