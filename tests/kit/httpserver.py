"""A range-capable HTTP/1.1 server on 127.0.0.1 for the remote-archive tests, with faults on demand.

Serves named objects (bytes, or a file read with pread, so a sparse 1 GiB file costs nothing) with ETag
and Last-Modified, answers `Range: bytes=A-B` with 206, and counts requests, body bytes sent and the most
requests handled at once. Part of an object can be held back until the test releases it (`put(...,
held_from=)` or `hold`, then `release`). Faults apply to the next N requests (or all, with -1): dropped
connections, delays, error statuses, truncated bodies, and ignoring Range. Hostile behaviours apply to
every request while set: a Content-Range that claims more than was asked, a body longer than its
Content-Range, a drip of one byte at a time (headers too, if asked), and redirects (`redirect()`), to
another port or loopback address (`serve(host=...)`) or from https to http. A request whose target is an
absolute URL is served as a proxy would.
"""

import contextlib
import email.utils
import os
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_WRITE = 64 * 1024


HOLD_TIMEOUT = 60.0  # seconds a held read waits at most, so that a test that never releases it ends


@dataclass
class Served:
    """One object: its bytes (or a file holding them) and its version, which makes the ETag.

    With `held_from`, a read that reaches that offset waits until `released` is set: a test holds part of
    an archive back (a background pass, say) while a reader gets the rest.
    """

    data: bytes | Path
    version: int
    held_from: int | None = None
    released: threading.Event = field(default_factory=threading.Event)

    @property
    def size(self) -> int:
        return len(self.data) if isinstance(self.data, bytes) else self.data.stat().st_size

    def read(self, offset: int, size: int) -> bytes:
        if self.held_from is not None and offset + size > self.held_from:
            self.released.wait(HOLD_TIMEOUT)
        if isinstance(self.data, bytes):
            return self.data[offset : offset + size]
        with self.data.open("rb") as file:
            return os.pread(file.fileno(), size, offset)


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class Faults:
    """How many of the next requests get each fault; -1 means every one from now on."""

    drop: int = 0  # close the connection without answering
    error: int = 0  # answer with `status`
    status: int = 503
    slow: int = 0  # wait `delay` seconds before answering
    delay: float = 0.0
    truncate: int = 0  # send half the body, then close the connection
    ignore_range: bool = False  # answer every GET with 200 and the whole object
    claim: int = 0  # answer `claim` bytes from the first one asked, whatever the range asked (a lying 206)
    body_extra: int = 0  # Content-Length and the body run this many bytes past the Content-Range
    drip: float = 0.0  # seconds between two bytes of the body, sent one at a time
    drip_headers: bool = False  # the status line and headers too
    pace: float = 0.0  # seconds between two 64 KiB writes of the body: slow, but steady
    content_range: str = ""  # sent instead of the true Content-Range of a 206

    def take(self, name: str) -> bool:
        left = getattr(self, name)
        if left:
            setattr(self, name, left - 1 if left > 0 else left)
        return bool(left)


@dataclass
class ServerState:
    objects: dict[str, Served] = field(default_factory=dict)
    redirects: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (status, Location)
    faults: Faults = field(default_factory=Faults)
    requests: list[Request] = field(default_factory=list)
    bytes_served: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    handled: int = 0  # requests whose handler has returned: answered, or given up when the client left
    handler_returned: threading.Condition = field(default_factory=threading.Condition)
    active: int = 0  # requests being handled now
    max_active: int = 0  # the most at once since the counters were reset
    active_changed: threading.Condition = field(default_factory=threading.Condition)


class RangeServer:
    """The running server: put objects, set faults, read the counters."""

    def __init__(self, httpd: ThreadingHTTPServer, state: ServerState, scheme: str, host: str) -> None:
        self._httpd, self.state = httpd, state
        self.base = f"{scheme}://{host}:{httpd.server_address[1]}"

    def url(self, name: str, query: str = "") -> str:
        return f"{self.base}/{name}" + (f"?{query}" if query else "")

    def put(self, name: str, data: bytes | Path, held_from: int | None = None) -> str:
        """Serve `data` at /name (again: a new version, with a new ETag and Last-Modified); return the URL.

        With `held_from`, a read that reaches that offset is answered only after `release(name)`."""
        with self.state.lock:
            old = self.state.objects.get(f"/{name}")
            self.state.objects[f"/{name}"] = Served(data, old.version + 1 if old else 1, held_from)
        return self.url(name)

    def hold(self, name: str, held_from: int) -> None:
        """From now on, answer a read of /name that reaches `held_from` only after `release(name)`: as
        `put(..., held_from=)`, but for what is served already (the same version, so the same ETag)."""
        with self.state.lock:
            served = self.state.objects[f"/{name}"]
            served.held_from = held_from
            served.released.clear()

    def release(self, name: str) -> None:
        """Let the held reads of /name go (see `put`), and every later one."""
        with self.state.lock:
            self.state.objects[f"/{name}"].released.set()

    def redirect(self, name: str, location: str, status: int = 302) -> str:
        """Answer every request for /name with `status` and `location`; return the URL of /name."""
        with self.state.lock:
            self.state.redirects[f"/{name}"] = (status, location)
        return self.url(name)

    @property
    def faults(self) -> Faults:
        return self.state.faults

    @property
    def bytes_served(self) -> int:
        return self.state.bytes_served

    @property
    def requests(self) -> list[Request]:
        with self.state.lock:
            return list(self.state.requests)

    def wait_until_every_request_handled(self, timeout: float) -> None:
        """Wait until the handler of every request received so far has returned (body sent, or the client
        hung up); then `bytes_served` counts all it will. Raise TimeoutError if one is still sending."""

        def all_handled() -> bool:
            with self.state.lock:
                return self.state.handled >= len(self.state.requests)

        with self.state.handler_returned:
            if not self.state.handler_returned.wait_for(all_handled, timeout):
                raise TimeoutError(f"a request handler still runs after {timeout} s")

    @property
    def max_active(self) -> int:
        """The most requests handled at once since the counters were reset."""
        with self.state.lock:
            return self.state.max_active

    def wait_for_active(self, count: int, timeout: float) -> bool:
        """Wait until `count` requests are handled at once (now, or since the counters were reset);
        False if that did not happen within `timeout` seconds."""
        with self.state.active_changed:
            return self.state.active_changed.wait_for(lambda: self.max_active >= count, timeout)

    def reset_counters(self) -> None:
        with self.state.lock:
            self.state.handled -= len(self.state.requests)  # what still runs of them counts back to 0
            self.state.requests.clear()
            self.state.bytes_served = 0
            self.state.max_active = self.state.active


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in separate writes: no delayed-ACK stalls
    server: "_Server"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        state = self.server.state
        self._count_active(+1)
        try:
            self._serve_request(body)
        finally:
            self._count_active(-1)
            with state.handler_returned:
                with state.lock:
                    state.handled += 1
                state.handler_returned.notify_all()

    def _count_active(self, change: int) -> None:
        state = self.server.state
        with state.active_changed:
            with state.lock:
                state.active += change
                state.max_active = max(state.max_active, state.active)
            state.active_changed.notify_all()

    def _serve_request(self, body: bool) -> None:
        state = self.server.state
        with state.lock:
            state.requests.append(Request(self.command, self.path, dict(self.headers.items())))
            obj = state.objects.get(urlsplit(self.path).path)
            redirect = state.redirects.get(urlsplit(self.path).path)
            faults = state.faults
            drop, error, slow = faults.take("drop"), faults.take("error"), faults.take("slow")
            truncate, ignore_range = faults.take("truncate"), faults.ignore_range
        if drop:
            self.close_connection = True
            return
        if slow:
            time.sleep(faults.delay)
        if error:
            self._answer(faults.status, {"Retry-After": "0"}, b"")
            return
        if redirect is not None:
            self._answer(redirect[0], {"Location": redirect[1]}, b"")
            return
        if obj is None:
            self._answer(404, {}, b"")
            return
        self._serve_object(obj, body, truncate, ignore_range)

    def _serve_object(self, obj: Served, body: bool, truncate: bool, ignore_range: bool) -> None:
        faults = self.server.state.faults
        size = obj.size
        headers = {
            "ETag": f'"v{obj.version}"',
            "Last-Modified": email.utils.formatdate(1_700_000_000 + obj.version, usegmt=True),
            "Accept-Ranges": "bytes",
        }
        match = None if ignore_range else _RANGE.fullmatch(self.headers.get("Range", ""))
        if match is None:
            first, last, status = 0, size - 1, 200
        else:
            first = int(match[1])
            last = min(int(match[2]) if match[2] else size - 1, size - 1)
            if first >= size:
                self._answer(416, {**headers, "Content-Range": f"bytes */{size}"}, b"")
                return
            status = 206
            if faults.claim:
                last = min(first + faults.claim, size) - 1
            headers["Content-Range"] = faults.content_range or f"bytes {first}-{last}/{size}"
        length = last - first + 1 + faults.body_extra
        self._start(status, {**headers, "Content-Length": str(length)})
        if body:
            self._send_body(obj, first, length // 2 if truncate else length)
        if truncate:
            self.close_connection = True

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self._start(status, {**headers, "Content-Length": str(len(body))})
        self.wfile.write(body)

    def _start(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        faults = self.server.state.faults
        if not (faults.drip and faults.drip_headers):
            self.end_headers()
            return
        self._headers_buffer.append(b"\r\n")  # what end_headers() would write, a byte at a time
        self._drip(b"".join(self._headers_buffer), faults.drip)
        self._headers_buffer = []

    def _send_body(self, obj: Served, first: int, length: int) -> None:
        state = self.server.state
        for start in range(first, first + length, _WRITE):
            chunk = obj.read(start, min(_WRITE, first + length - start))
            chunk += bytes(min(_WRITE, first + length - start) - len(chunk))  # body_extra: past the end
            with state.lock:  # counted before the client can have it: reset_counters() then sees it all
                state.bytes_served += len(chunk)
            if state.faults.drip:
                self._drip(chunk, state.faults.drip)
            else:
                time.sleep(state.faults.pace)
                self.wfile.write(chunk)

    def _drip(self, data: bytes, interval: float) -> None:
        """Send `data` one byte every `interval` seconds, until the client hangs up."""
        for index in range(len(data)):
            self.wfile.write(data[index : index + 1])
            self.wfile.flush()
            time.sleep(interval)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up mid-body (as tarfuse does on a 200) is no error here


@contextlib.contextmanager
def serve(tls: tuple[Path, Path] | None = None, host: str = "127.0.0.1") -> Iterator[RangeServer]:
    """Run a server on `host`, a loopback address (HTTPS with `tls` = (cert, key)), until the block ends."""
    httpd = _Server((host, 0), _Handler)
    httpd.state = ServerState()
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*map(str, tls))
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield RangeServer(httpd, httpd.state, "https" if tls else "http", host)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def write_ca_signed_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA's certificate, and a certificate for 127.0.0.1 that it signed, with its key: (ca, cert, key).

    For clients that, like rustls (webpki), refuse a self-signed certificate as the server's own: it is a
    CA's, not an end entity's.
    """
    ca, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    cert, key, request = directory / "leaf.pem", directory / "leaf-key.pem", directory / "leaf.csr"
    extensions = directory / "leaf.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tarfuse test CA",
         "-keyout", ca_key, "-out", ca],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", request],
        ["x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
         "-extfile", extensions, "-out", cert],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return ca, cert, key


def write_tls_files(directory: Path, openssl: str = "openssl") -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key into `directory`; return (cert, key),
    as `serve(tls=...)` takes them (the certificate is also the CA file a client trusts)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
