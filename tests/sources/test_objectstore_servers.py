"""The object-store kit itself (kit.objectstores): each emulator answers a ranged GET of a presigned URL
through the proxy, obstore reads it with only the credentials of `ObjectStore.env`, and the proxy records
what reached the store and injects its faults."""

import http.client
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from kit.objectstores import ObjectStore, ProxiedRequest

obstore = pytest.importorskip("obstore", reason="obstore, a dependency of tarfuse, is not installed")
from obstore.store import AzureStore, GCSStore, S3Store  # noqa: E402

if TYPE_CHECKING:
    from obstore.store import ClientConfig  # in the type stubs only

DATA = bytes(range(256)) * 64  # 16 KiB, every offset's byte known


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET on a connection of its own: (status, headers with lower-case names, body)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        connection.request("GET", f"{parts.path}?{parts.query}", headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def object_path(store: ObjectStore, key: str) -> str:
    """The path a request for `key` has, as the proxy records it."""
    return ("/devstoreaccount1" if store.kind == "az" else "") + f"/{store.bucket}/{key}"


def test_ranged_get_of_presigned_url(object_store: ObjectStore) -> None:
    object_store.put("ranged/disk.tar", DATA)
    status, headers, body = get(object_store.presigned("ranged/disk.tar"), {"Range": "bytes=1000-1999"})
    assert (status, body) == (206, DATA[1000:2000])
    assert headers["content-range"] == f"bytes 1000-1999/{len(DATA)}"
    assert "etag" in headers or object_store.kind == "gs"  # the emulator's XML GET has none (kit docstring)
    assert object_store.proxy.wait_for_requests(1) == [
        ProxiedRequest("GET", object_path(object_store, "ranged/disk.tar"), "bytes=1000-1999", 206, 1000)
    ]
    assert object_store.proxy.bytes_served == 1000


def env_store(store: ObjectStore) -> S3Store | GCSStore | AzureStore:
    """The store tarfuse makes: from the URL, the environment and the endpoint (kit docstring)."""
    options: ClientConfig = {"allow_http": True}
    if store.kind == "s3":
        return S3Store.from_url(
            f"s3://{store.bucket}", config={"endpoint": store.endpoint}, client_options=options
        )
    if store.kind == "gs":
        return GCSStore.from_url(
            f"gs://{store.bucket}", config={"base_url": store.endpoint}, client_options=options
        )
    return AzureStore.from_url(
        f"az://{store.bucket}", config={"endpoint": store.endpoint}, client_options=options
    )


def test_obstore_reads_with_the_store_environment(
    object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in os.environ:
        if name.startswith(("AWS_", "GOOGLE_", "AZURE_")):
            monkeypatch.delenv(name)
    for name, value in object_store.env.items():
        monkeypatch.setenv(name, value)
    object_store.put("env/disk.tar", DATA)
    store = env_store(object_store)
    assert bytes(obstore.get_range(store, "env/disk.tar", start=100, end=300)) == DATA[100:300]
    head = obstore.head(store, "env/disk.tar")
    assert head["size"] == len(DATA)
    assert head["e_tag"]
    methods = [(request.method, request.status) for request in object_store.proxy.wait_for_requests(2)]
    assert methods == [("GET", 206), ("HEAD", 200)]


def test_put_of_a_file_and_delete(object_store: ObjectStore, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1 << 20) * 9)  # past obstore's and boto3's multipart thresholds
    object_store.put("file/big.tar", big)
    url = object_store.presigned("file/big.tar")
    status, _, body = get(url, {"Range": f"bytes={(9 << 20) - 10}-"})
    assert (status, body) == (206, big.read_bytes()[-10:])
    object_store.delete("file/big.tar")
    assert get(url, {"Range": "bytes=0-9"})[0] == 404


@pytest.mark.parametrize("code", ["AccessDenied", "ExpiredToken"])
def test_error_status_for_the_next_request(object_store: ObjectStore, code: str) -> None:
    object_store.put("errors/disk.tar", DATA)
    url = object_store.presigned("errors/disk.tar")
    object_store.proxy.fault(status=403, code=code)
    status, _, body = get(url, {"Range": "bytes=0-9"})
    assert status == 403
    assert f"<Error><Code>{code}</Code>" in body.decode()
    assert get(url, {"Range": "bytes=0-9"})[:3:2] == (206, DATA[:10])
    assert [request.status for request in object_store.proxy.wait_for_requests(2)] == [403, 206]


def test_lie_total_rewrites_content_range(object_store: ObjectStore) -> None:
    object_store.put("lie/disk.tar", DATA)
    object_store.proxy.fault(times=-1, lie_total=1 << 40)
    status, headers, body = get(object_store.presigned("lie/disk.tar"), {"Range": "bytes=0-9"})
    assert (status, headers["content-range"], body) == (206, f"bytes 0-9/{1 << 40}", DATA[:10])


def test_drop_closes_the_connection_unanswered(object_store: ObjectStore) -> None:
    object_store.put("drop/disk.tar", DATA)
    url = object_store.presigned("drop/disk.tar")
    object_store.proxy.fault(drop=True)
    with pytest.raises(http.client.RemoteDisconnected):
        get(url, {"Range": "bytes=0-9"})
    assert object_store.proxy.wait_for_requests(1)[0].status == 0
    assert get(url, {"Range": "bytes=0-9"})[0] == 206


def test_latency_delays_each_answer(s3_store: ObjectStore) -> None:
    s3_store.put("latency/disk.tar", DATA)
    url = s3_store.presigned("latency/disk.tar")
    fault = s3_store.proxy.fault(times=2, latency=0.02)
    for _ in range(3):
        assert get(url, {"Range": "bytes=0-9"})[0] == 206
    assert fault.times == 0  # taken by the first two requests, not the third


def test_keep_alive_and_waiting_for_requests(object_store: ObjectStore) -> None:
    object_store.put("keepalive/disk.tar", DATA)
    parts = urlsplit(object_store.presigned("keepalive/disk.tar"))
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    for first in (0, 4096, 8192):
        connection.request(
            "GET", f"{parts.path}?{parts.query}", headers={"Range": f"bytes={first}-{first + 99}"}
        )
        response = connection.getresponse()
        assert (response.status, response.read()) == (206, DATA[first : first + 100])
    connection.close()
    readers = [
        threading.Thread(
            target=get, args=(object_store.presigned("keepalive/disk.tar"), {"Range": "bytes=0-0"})
        )
        for _ in range(4)
    ]
    for reader in readers:
        reader.start()
    assert len(object_store.proxy.wait_for_requests(7)) == 7
    assert object_store.proxy.bytes_served == 304
    for reader in readers:
        reader.join()
    object_store.proxy.reset()
    assert (object_store.proxy.requests, object_store.proxy.bytes_served) == ([], 0)
