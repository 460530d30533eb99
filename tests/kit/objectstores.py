"""Real object-store emulators (S3, GCS, Azure Blob) on 127.0.0.1, each behind a recording proxy with faults.

The servers are real processes, started once per session and killed at its end; each is ready when its own
log line says it listens (no sleeping): moto's S3 server (`moto_server`, from the test extra),
gcp-storage-emulator (the same), and Azurite's blob service, which `make test` installs with npm into
AZURITE_DIR (.venv/node: git ignores it, `make clean` removes it); without it the Azure fixture skips.

tarfuse is pointed at `ObjectStore.endpoint`, a `StoreProxy` in front of the emulator, which forwards every
request and records what reached the store (method, path, Range, status, body bytes sent), and injects
faults: an error status with an S3-style XML body, latency, a Content-Range that lies about the object's
size, a dropped connection.

What works with obstore 0.12 (checked with only `ObjectStore.env` set of the AWS_/GOOGLE_/AZURE_ variables;
`client_options={"allow_http": True}` because the endpoint is http://):

- S3: env AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION;
  `S3Store.from_url("s3://images", config={"endpoint": store.endpoint}, client_options=...)`. Bucket names
  must be valid S3 names. get, get_range, head, sign work.
- GCS: env GOOGLE_SERVICE_ACCOUNT = the path of a service-account JSON key (type, client_email, a real RSA
  private_key, private_key_id; no "disable_oauth", with which signing asks Google's IAM API over the
  network; no "gcs_base_url", the endpoint comes from the config);
  `GCSStore.from_url("gs://images", config={"base_url": store.endpoint}, client_options=...)`. Signing is
  offline. The emulator lacks what GCS's XML API (the one obstore reads with) sends: it answers GET with no
  ETag or Last-Modified (obstore refuses that: "Last-Modified Header missing") and HEAD with 501. The
  proxy makes up for it (`StoreProxy(gcs_metadata=True)`): it adds both headers to a GET of /BUCKET/KEY
  and answers HEAD, from the object's JSON metadata, which it fetches on the side (not recorded). Listing
  (GET /BUCKET?list-type=2) stays 501. obstore's put fails against the emulator (no ETag): `put` uploads
  with the JSON API.
- Azure: env AZURE_STORAGE_ACCOUNT_NAME=devstoreaccount1, AZURE_STORAGE_ACCOUNT_KEY=<Azurite's well-known
  key>; `AzureStore.from_url("az://images", config={"endpoint": store.endpoint}, client_options=...)` where
  the endpoint is path-style and names the account: http://127.0.0.1:PORT/devstoreaccount1. (use_emulator
  works only on Azurite's default port 10000.) put (multipart too), get, get_range, head, delete and sign
  (a SAS URL, offline) work. The container is created with the REST API and a SharedKey signature, which
  obstore has no call for.
"""

import base64
import contextlib
import email.utils
import hashlib
import hmac
import http.client
import io
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

# obstore, tarfuse's own dependency, is imported where it is used: the kit imports without it.
if TYPE_CHECKING:
    from obstore.store import AzureStore, ClientConfig, GCSStore, S3Store

REPO = Path(__file__).resolve().parents[2]
AZURITE_DIR = REPO / ".venv" / "node"  # where `make test` installs Azurite (npm install --prefix)
AZURITE_BLOB = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
AZURE_ACCOUNT = "devstoreaccount1"  # Azurite's well-known account and key
AZURE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
BUCKET = "images"
START_TIMEOUT = 60.0  # seconds a server may take to say it listens (node and moto start slowly under load)
PRESIGN_TTL = timedelta(hours=1)
_COPY = 64 * 1024
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


# --- the emulator processes ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (bound to port 0, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """A server started from `argv`, ready once a line of its output (stdout and stderr) matches `ready`.

    A thread reads the output to its end (a server whose pipe fills up stalls) and keeps its last lines
    for the error that says why a start failed."""

    def __init__(self, argv: list[str], ready: str, timeout: float = START_TIMEOUT) -> None:
        self.argv = argv
        self._ready_pattern = re.compile(ready)
        self._ready = threading.Event()
        self._tail: deque[str] = deque(maxlen=40)
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace",
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"{argv[0]} did not start in {timeout} s:\n" + "".join(self._tail))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._tail.append(line)
            if self._ready_pattern.search(line):
                self._ready.set()
        self._ready.set()  # the process ended: whoever waits learns it now, not at the timeout

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_moto(port: int) -> ServerProcess:
    moto = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    return ServerProcess(
        [moto, "-H", "127.0.0.1", "-p", str(port)], rf"Running on http://127\.0\.0\.1:{port}"
    )


def start_gcs_emulator(port: int) -> ServerProcess:
    emulator = shutil.which("gcp-storage-emulator") or str(
        Path(sys.executable).parent / "gcp-storage-emulator"
    )
    argv = [emulator, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    return ServerProcess(argv, r"All services started")  # logged once its HTTPServer is bound


def azurite_missing_reason() -> str | None:
    """Why Azurite cannot run here, or None."""
    if not AZURITE_BLOB.exists():
        return f"Azurite is not installed in {AZURITE_DIR} (make test installs it: make azurite)"
    if shutil.which("node") is None:
        return "node is not installed (Azurite runs on it)"
    return None


def start_azurite(port: int, tls: tuple[Path, Path] | None = None) -> ServerProcess:
    """Azurite's blob service on `port`; with `tls` (certificate, key), over https and taking bearer tokens
    (`--oauth basic`: it checks a token's issuer, audience and lifetime, not its signature, and hands out
    user delegation keys for it), which it takes over nothing else."""
    argv = [str(AZURITE_BLOB), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
            "--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry"]  # fmt: skip
    if tls is not None:
        argv += ["--cert", str(tls[0]), "--key", str(tls[1]), "--oauth", "basic"]
    scheme = "http" if tls is None else "https"
    return ServerProcess(argv, rf"successfully listens on {scheme}://127\.0\.0\.1:{port}")


# --- the proxy -----------------------------------------------------------------------------------------


@dataclass
class ProxiedRequest:
    """One request that reached the proxy: the path is percent-decoded and has no query (`query` has it:
    a presigned URL's credential and signature)."""

    method: str
    path: str
    range: str | None
    status: int = 0  # 0: dropped, or the client left before the answer
    sent: int = 0  # body bytes sent to the client
    query: str = field(default="", compare=False)  # not what a test compares: the signature changes


@dataclass
class Fault:
    """What happens to the next `times` requests (-1: every one from now on), all that is set at once:
    `drop` closes the connection unanswered; else `status` answers with an S3-style XML error whose Code
    is `code` (AccessDenied, ExpiredToken, ...); else the request is forwarded after `latency` seconds,
    and `lie_total` replaces the size an answer claims (a 206's Content-Range total, a HEAD's
    Content-Length)."""

    times: int = 1
    drop: bool = False
    status: int = 0
    code: str = "AccessDenied"
    latency: float = 0.0
    lie_total: int | None = None


_MESSAGES = {"AccessDenied": "Access Denied", "ExpiredToken": "The provided token has expired."}


def error_body(code: str) -> bytes:
    message = _MESSAGES.get(code, code)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>storeproxy</RequestId></Error>"
    ).encode()


class StoreProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 in front of `upstream` (http://host:port): see the module."""

    def __init__(
        self,
        upstream: str,
        gcs_metadata: bool = False,
        tls: tuple[Path, Path] | None = None,
        sts: bool = False,
    ) -> None:
        """`tls`: (certificate, key) to answer https with (httpserver.write_ca_signed_tls_files makes
        them). `sts`: in front of moto's STS, which tells an unsigned request's service by its Host and
        reads its parameters from a form body only; AWS's STS also takes them in the query, where
        object_store sends them: they are moved into a body."""
        self.upstream = upstream
        self.sts = sts
        self.gcs_metadata = gcs_metadata
        self._lock = threading.Lock()
        self._handled = threading.Condition(self._lock)
        self._requests: list[ProxiedRequest] = []
        self._faults: list[Fault] = []
        self._httpd = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._httpd.proxy = self
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        scheme = "http" if tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    @property
    def requests(self) -> list[ProxiedRequest]:
        """The requests whose handling has ended, in that order."""
        with self._lock:
            return list(self._requests)

    @property
    def bytes_served(self) -> int:
        with self._lock:
            return sum(request.sent for request in self._requests)

    def reset(self) -> None:
        """Forget the requests and the faults (a request still being answered is recorded when it ends)."""
        with self._lock:
            self._requests.clear()
            self._faults.clear()

    def fault(self, times: int = 1, **what: Any) -> Fault:
        """Apply a `Fault(times, **what)` to the next requests; return it (its `times` counts down)."""
        made = Fault(times, **what)
        with self._lock:
            self._faults.append(made)
        return made

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> list[ProxiedRequest]:
        """Wait until `count` requests have been handled (answered, dropped or abandoned); return them all.
        Raise TimeoutError with what came, if fewer did in `timeout` seconds."""
        with self._handled:
            if not self._handled.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(
                    f"{len(self._requests)} of {count} requests in {timeout} s: {self._requests}"
                )
            return list(self._requests)

    def _take_faults(self) -> Fault:
        """Merge the faults that apply to this request, counting each down."""
        merged = Fault(times=0)
        with self._lock:
            for fault in self._faults:
                if fault.times == 0:
                    continue
                if fault.times > 0:
                    fault.times -= 1
                merged.drop |= fault.drop
                merged.status = fault.status or merged.status
                merged.code = fault.code if fault.status else merged.code
                merged.latency += fault.latency
                merged.lie_total = fault.lie_total if fault.lie_total is not None else merged.lie_total
            self._faults = [fault for fault in self._faults if fault.times != 0]
        return merged

    def _record(self, request: ProxiedRequest) -> None:
        with self._handled:
            self._requests.append(request)
            self._handled.notify_all()


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    proxy: StoreProxy

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up mid-answer is no error here


class _BodyReader:
    """The request body, `length` bytes of the client's stream, for http.client to send on."""

    def __init__(self, stream: io.BufferedIOBase, length: int) -> None:
        self._stream, self._left = stream, length

    def read(self, size: int = _COPY) -> bytes:
        data = self._stream.read(min(size, self._left)) if self._left else b""
        self._left -= len(data)
        return data


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _ProxyServer
    _upstream: http.client.HTTPConnection | None = None  # one per client connection, kept alive

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def finish(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
        super().finish()

    def _handle(self) -> None:
        proxy = self.server.proxy
        parts = urlsplit(self.path)
        record = ProxiedRequest(
            self.command, unquote(parts.path), self.headers.get("Range"), query=parts.query
        )
        try:
            fault = proxy._take_faults()
            if fault.drop:
                self.close_connection = True
                return
            body = self._request_body()  # read before any answer: the connection stays usable
            if fault.status:
                while isinstance(body, _BodyReader) and body.read():
                    pass  # the connection stays usable for the next request
                self._answer(
                    record, fault.status, {"Content-Type": "application/xml"}, error_body(fault.code)
                )
                return
            time.sleep(fault.latency)  # the server's delay, not a test waiting
            if proxy.gcs_metadata and self.command == "HEAD" and self._is_object_path():
                self._gcs_head(record, fault)
                return
            self._forward(record, body, fault)
        finally:
            proxy._record(record)

    def _request_body(self) -> bytes | _BodyReader | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return _BodyReader(self.rfile, length) if length else None

    def _read_chunked(self) -> bytes:
        parts = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(parts)

    def _connection(self) -> http.client.HTTPConnection:
        if self._upstream is None:
            parts = urlsplit(self.server.proxy.upstream)
            self._upstream = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=120)
        return self._upstream

    def _send_upstream(self, body: bytes | _BodyReader | None) -> http.client.HTTPResponse:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        path = self.path
        if self.server.proxy.sts:
            headers = {k: v for k, v in headers.items() if k.lower() != "host"}
            headers["Host"] = "sts.amazonaws.com"
            parts = urlsplit(self.path)
            if self.command == "POST" and parts.query and body is None:
                path, body = parts.path, parts.query.encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
        if isinstance(body, bytes):
            headers["Content-Length"] = str(len(body))
        connection = self._connection()
        reused = connection.sock is not None
        try:
            connection.request(self.command, path, body=body, headers=headers)
            return connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not reused or isinstance(body, _BodyReader):  # a streamed body cannot be sent twice
                raise
            connection.close()  # the emulator closed an idle kept-alive connection: once more on a new one
            connection.request(self.command, path, body=body, headers=headers)
            return connection.getresponse()

    def _forward(self, record: ProxiedRequest, body: bytes | _BodyReader | None, fault: Fault) -> None:
        response = self._send_upstream(body)
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
        if self.server.proxy.gcs_metadata and self.command == "GET" and self._is_object_path():
            headers = self._gcs_add_validators(headers)
        if fault.lie_total is not None:
            headers = [(k, _lie(k, v, fault.lie_total, self.command)) for k, v in headers]
        length = response.getheader("Content-Length")
        chunked = length is None and self.command != "HEAD" and response.status not in (204, 304)
        record.status = response.status
        self.send_response(response.status)
        for name, value in headers:
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while self.command != "HEAD" and (chunk := response.read1(_COPY)):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            record.sent += len(chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        response.close()
        if response.will_close:
            self._upstream = None

    def _answer(self, record: ProxiedRequest, status: int, headers: dict[str, str], body: bytes) -> None:
        record.status = status
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            record.sent = len(body)

    # gcp-storage-emulator's gaps (module docstring): validators and HEAD from the JSON API's metadata

    def _is_object_path(self) -> bool:
        path = urlsplit(self.path).path
        return path.count("/") >= 2 and not path.startswith(("/storage/", "/upload/", "/download/"))

    def _gcs_metadata(self) -> dict[str, Any] | None:
        bucket, _, key = unquote(urlsplit(self.path).path).lstrip("/").partition("/")
        parts = urlsplit(self.server.proxy.upstream)
        side = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
        try:
            side.request("GET", f"/storage/v1/b/{bucket}/o/{quote(key, safe='')}")
            response = side.getresponse()
            data = response.read()
        finally:
            side.close()
        return json.loads(data) if response.status == 200 else None

    def _gcs_validators(self, metadata: dict[str, Any]) -> dict[str, str]:
        updated = datetime.fromisoformat(metadata["updated"].replace("Z", "+00:00"))
        return {
            "ETag": '"' + base64.b64decode(metadata["md5Hash"]).hex() + '"',
            "Last-Modified": email.utils.format_datetime(updated, usegmt=True),
            "x-goog-generation": str(metadata["generation"]),
        }

    def _gcs_add_validators(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if any(name.lower() == "etag" for name, _ in headers):
            return headers
        metadata = self._gcs_metadata()
        return headers if metadata is None else headers + list(self._gcs_validators(metadata).items())

    def _gcs_head(self, record: ProxiedRequest, fault: Fault) -> None:
        metadata = self._gcs_metadata()
        if metadata is None:
            self._answer(record, 404, {}, b"")
            return
        size = metadata["size"] if fault.lie_total is None else fault.lie_total
        record.status = 200
        self.send_response(200)
        headers = {**self._gcs_validators(metadata), "Content-Length": str(size), "Accept-Ranges": "bytes"}
        for name, value in {**headers, "Content-Type": metadata.get("contentType", "")}.items():
            self.send_header(name, value)
        self.end_headers()


def _lie(name: str, value: str, total: int, method: str) -> str:
    if name.lower() == "content-range" and (match := _CONTENT_RANGE.fullmatch(value)):
        return f"bytes {match[1]}-{match[2]}/{total}"
    if name.lower() == "content-length" and method == "HEAD":
        return str(total)
    return value


# --- the stores ----------------------------------------------------------------------------------------


@dataclass
class ObjectStore:
    """One emulator, its bucket (container), and the proxy in front of it: see the module."""

    kind: str  # "s3" | "gs" | "az"
    bucket: str
    upstream: str  # the emulator's own URL
    env: dict[str, str]  # the credentials obstore reads from the environment
    proxy: StoreProxy

    @property
    def endpoint(self) -> str:
        """What `-o endpoint=` takes: the proxy's URL (for Azure with the account's path)."""
        return self.proxy.url + (f"/{AZURE_ACCOUNT}" if self.kind == "az" else "")

    def url(self, key: str) -> str:
        return f"{self.kind}://{self.bucket}/{key}"

    def with_proxy(self, proxy: StoreProxy) -> "ObjectStore":
        """The same store, seen through another proxy."""
        return ObjectStore(self.kind, self.bucket, self.upstream, self.env, proxy)

    def store(self, endpoint: str | None = None) -> "S3Store | GCSStore | AzureStore":
        """An obstore store as tarfuse makes one (module docstring), at `endpoint` (the proxy's)."""
        from obstore.store import AzureStore, GCSStore, S3Store

        endpoint = endpoint or self.endpoint
        options: ClientConfig = {"allow_http": True}
        if self.kind == "s3":
            env = self.env
            return S3Store(self.bucket, endpoint=endpoint, region=env["AWS_REGION"], client_options=options,
                           access_key_id=env["AWS_ACCESS_KEY_ID"],
                           secret_access_key=env["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        if self.kind == "gs":
            key = Path(self.env["GOOGLE_SERVICE_ACCOUNT"]).read_text()
            return GCSStore(self.bucket, service_account_key=key, base_url=endpoint, client_options=options)
        return AzureStore(self.bucket, account_name=AZURE_ACCOUNT, account_key=AZURE_KEY, endpoint=endpoint,
                          client_options=options)  # fmt: skip

    def presigned(self, key: str) -> str:
        """A presigned GET URL of `key` through the proxy."""
        import obstore

        return str(obstore.sign(self.store(), "GET", key, PRESIGN_TTL))

    def put(self, key: str, data: bytes | Path) -> None:
        """Store `data` (a file is streamed) at `key`, straight to the emulator (not recorded)."""
        if self.kind == "s3":
            with _body(data) as body:
                _boto3_client(self.upstream, self.env).put_object(Bucket=self.bucket, Key=key, Body=body)
        elif self.kind == "gs":
            query = f"uploadType=media&name={quote(key, safe='')}"
            with _body(data) as body:
                _call(self.upstream, "POST", f"/upload/storage/v1/b/{self.bucket}/o?{query}", body)
        else:
            import obstore

            obstore.put(self.store(f"{self.upstream}/{AZURE_ACCOUNT}"), key, data)

    def delete(self, key: str) -> None:
        if self.kind == "s3":
            _boto3_client(self.upstream, self.env).delete_object(Bucket=self.bucket, Key=key)
        elif self.kind == "gs":
            _call(
                self.upstream,
                "DELETE",
                f"/storage/v1/b/{self.bucket}/o/{quote(key, safe='')}",
                None,
                {200, 204, 404},
            )
        else:
            import obstore

            obstore.delete(self.store(f"{self.upstream}/{AZURE_ACCOUNT}"), key)


@contextlib.contextmanager
def _body(data: bytes | Path) -> Iterator[bytes | IO[bytes]]:
    if isinstance(data, bytes):
        yield data
    else:
        with data.open("rb") as file:
            yield file


def _call(base: str, method: str, target: str, body: bytes | IO[bytes] | None,
          ok: set[int] | None = None, headers: dict[str, str] | None = None,
          tls: ssl.SSLContext | None = None) -> None:  # fmt: skip
    """One request to an emulator (over https with `tls`); raise unless its status is in `ok` (2xx by
    default)."""
    parts = urlsplit(base)
    connection = (
        http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=120)
        if tls is None
        else http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=120, context=tls)
    )
    headers = dict(headers or {})
    if body is not None and not isinstance(body, bytes):
        headers["Content-Length"] = str(os.fstat(body.fileno()).st_size)
    try:
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    if not (response.status in ok if ok else 200 <= response.status < 300):
        raise RuntimeError(f"{method} {base}{target}: {response.status} {answer[:500]!r}")


def _boto3_client(endpoint: str, env: dict[str, str]) -> Any:
    import boto3  # type: ignore[import-untyped]  # a slow import, for the S3 fixture only

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip


def create_azure_container(upstream: str, name: str, tls: ssl.SSLContext | None = None) -> None:
    """PUT the container, signed with the account key (SharedKey, path-style: the account twice)."""
    headers = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
    resource = f"/{AZURE_ACCOUNT}/{AZURE_ACCOUNT}/{name}\nrestype:container"
    to_sign = "PUT\n" + "\n" * 11 + canonical_headers + resource
    digest = hmac.new(base64.b64decode(AZURE_KEY), to_sign.encode(), hashlib.sha256).digest()
    headers["Authorization"] = f"SharedKey {AZURE_ACCOUNT}:{base64.b64encode(digest).decode()}"
    _call(upstream, "PUT", f"/{AZURE_ACCOUNT}/{name}?restype=container", b"", None, headers, tls)


def write_gcs_key(directory: Path, openssl: str = "openssl") -> Path:
    """A service-account JSON key with a fresh RSA key, which obstore signs with offline; return its path."""
    pem = subprocess.run([openssl, "genrsa", "2048"], check=True, capture_output=True, text=True).stdout
    key = {"type": "service_account", "project_id": "tarfuse-tests", "private_key_id": "tarfuse-tests",
           "private_key": pem, "client_email": "tests@tarfuse-tests.iam.gserviceaccount.com"}  # fmt: skip
    path = directory / "service-account.json"
    path.write_text(json.dumps(key))
    return path


@contextlib.contextmanager
def running_store(kind: str, directory: Path) -> Iterator[ObjectStore]:
    """Start the emulator of `kind` ("s3", "gs", "az") with an empty bucket "images", and a proxy in front
    of it; stop both when the block ends. `directory` holds GCS's key file."""
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    starts = {"s3": start_moto, "gs": start_gcs_emulator, "az": start_azurite}
    server = starts[kind](port)
    proxy: StoreProxy | None = None
    try:
        if kind == "s3":
            env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
            _boto3_client(upstream, env).create_bucket(Bucket=BUCKET)
        elif kind == "gs":
            env = {"GOOGLE_SERVICE_ACCOUNT": str(write_gcs_key(directory))}
            body = json.dumps({"name": BUCKET}).encode()
            _call(upstream, "POST", "/storage/v1/b?project=tarfuse-tests", body, None,
                  {"Content-Type": "application/json"})  # fmt: skip
        else:
            env = {"AZURE_STORAGE_ACCOUNT_NAME": AZURE_ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": AZURE_KEY}
            create_azure_container(upstream, BUCKET)
        proxy = StoreProxy(upstream, gcs_metadata=kind == "gs")
        yield ObjectStore(kind, BUCKET, upstream, env, proxy)
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()


@contextlib.contextmanager
def fresh_proxy(store: ObjectStore) -> Iterator[ObjectStore]:
    """`store` through a proxy of its own (no requests, no faults), closed when the block ends."""
    proxy = StoreProxy(store.upstream, gcs_metadata=store.kind == "gs")
    try:
        yield store.with_proxy(proxy)
    finally:
        proxy.close()
