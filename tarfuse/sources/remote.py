"""Archives on a web server: positional reads as HTTP range requests, through a block cache.

Owns the HTTP side: which part of a URL may be shown (never user info, the query string or header values),
the ranged GET and its checks (206, a Content-Range and Content-Length that match the range asked, the
ETag/Last-Modified recorded at open), redirects (never https to http, another host only when asked, and then
without the user's headers), a deadline on every request, retries with backoff, proxies and TLS options,
and `open_source`, which picks the local or the remote source.
Caching, coalescing and readahead are blockcache.py's. urllib3 and
urllib.request are imported when a URL is opened: a local mount does not pay the ~25 ms they take to import.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import math
import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlsplit

from tarfuse.errors import ArchiveChanged, RemoteError, UsageError
from tarfuse.sources import DEFAULT_CACHE_SIZE
from tarfuse.sources.blockcache import BLOCK_SIZE, BlockCache
from tarfuse.sources.file import ArchiveFile, Identity

if TYPE_CHECKING:
    import urllib3
    from urllib3.connectionpool import HTTPConnectionPool

OPTION_KEYS = ("header", "ca_file", "timeout", "retries", "follow_redirects")
FLAG_KEYS = ("follow_redirects",)  # words without a value
_RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})  # RFC 9110, 15.4
_MAX_REDIRECTS = 5
_DEFAULT_PORTS = {"http": 80, "https": 443}
_DEADLINE_TIMEOUTS = 2  # a whole request (connect, headers, body) gets this many times `timeout`
_PROGRESS = BLOCK_SIZE  # a failed request that brought at least this much does not count as a failure
_CHUNK = 256 * 1024
_MAX_BACKOFF = 5.0
_RESERVED_HEADERS = frozenset({"range", "host", "accept-encoding", "content-length"})
# RFC 9110, 14.4: `bytes FIRST-LAST/TOTAL`, or `bytes */TOTAL` in a 416. Digits only (int() would also take
# "+5", "-5", "1_0" and spaces), and at most 19 of them: no offset of ours needs more than 63 bits.
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(?:(\d{1,19})-(\d{1,19})|\*)/(\d{1,19})\s*", re.IGNORECASE)
_CONTENT_LENGTH = re.compile(r"\s*(\d{1,19})\s*")

# urllib3 logs each request line, query string (a presigned URL's signature) included, and failures with
# the URL in them: keep it quiet. Failures reach the log through our own messages, redacted.
logging.getLogger("urllib3").propagate = False


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """The -o options that apply to http(s) archives."""

    headers: tuple[tuple[str, str], ...] = ()
    ca_file: str | None = None
    timeout: float = 20.0  # seconds to connect, between two reads; twice that for a whole request
    retries: int = 5  # failed tries in a row, per request, before the read fails with EIO
    follow_redirects: bool = False  # to another origin (scheme, host, port); same-origin ones always


def is_url(archive: str) -> bool:
    return archive.lower().startswith(("http://", "https://"))


def display_name(archive: str) -> str:
    """What logs, `mount` and xattrs may show: a path made absolute, or a URL without its secrets."""
    if not is_url(archive):
        return os.path.abspath(archive)
    parts = urlsplit(archive)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def parse_options(words: Sequence[str]) -> RemoteOptions:
    """Parse `key=value` words (keys in OPTION_KEYS; `header` repeats; FLAG_KEYS alone); raise UsageError
    if one is wrong."""
    options = RemoteOptions()
    for word in words:
        key, has_value, value = word.partition("=")
        if key in FLAG_KEYS:
            if has_value:
                raise UsageError(f"option {key} takes no value")
            options = replace(options, follow_redirects=True)
        elif key == "header":
            options = replace(options, headers=(*options.headers, _parse_header(value)))
        elif key == "ca_file":
            if not os.path.isfile(value):
                raise UsageError(f"option ca_file={value!r}: no such file")
            options = replace(options, ca_file=value)
        elif key == "timeout":
            options = replace(options, timeout=_parse_number(key, value, float))
        elif key == "retries":
            options = replace(options, retries=int(_parse_number(key, value, int)))
        else:
            raise UsageError(f"unknown remote option {key!r}")
    return options


def _parse_header(value: str) -> tuple[str, str]:
    name, colon, text = value.partition(":")
    name = name.strip()
    if not colon or not name or not all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in name):
        raise UsageError("option header= takes NAME:VALUE, e.g. header=Authorization:Bearer TOKEN")
    if name.lower() in _RESERVED_HEADERS:
        raise UsageError(f"option header=: tarfuse sets {name} itself")
    return name, text.strip()


def _parse_number(key: str, value: str, kind: type[int] | type[float]) -> int | float:
    try:
        number = kind(value)
    except ValueError:
        raise UsageError(f"option {key}={value!r} is not a number") from None
    if number < 0 or (key == "timeout" and number == 0):
        raise UsageError(f"option {key}={value!r} is out of range")
    return number


def open_source(
    archive: str, words: Sequence[str] = (), cache_size: int = DEFAULT_CACHE_SIZE
) -> ArchiveFile | RemoteArchive:
    """Open ARCHIVE: a URL as a RemoteArchive, anything else as a local file; `words`: -o remote options."""
    if is_url(archive):
        return RemoteArchive(archive, parse_options(words), cache_size)
    if words:
        key = words[0].partition("=")[0]
        raise UsageError(
            f"option {key}{'' if key in FLAG_KEYS else '='} applies only to http:// and https:// archives"
        )
    return ArchiveFile(archive)


class RemoteArchive:
    """An archive read with HTTP range requests; same interface as source.ArchiveFile.

    A server is trusted for the bytes it sends and nothing more: every response must be a 206 for the range
    asked, no longer than asked (Content-Range and Content-Length), from the object that was there at open
    (same size, ETag and Last-Modified), and no body is read past the range asked for. Anything else fails
    the read, and a changed object fails every later `check_unchanged`, so a mount never serves bytes mixed
    from two versions.
    """

    blocking = True  # reads wait on the network: the daemon serves them from threads (fs.ServedFile)
    readers = 8  # requests in flight at once; more gained nothing against a local server
    size_known = True  # from the first answer's Content-Range

    def __init__(
        self, url: str, options: RemoteOptions = RemoteOptions(), cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        self.path = display_name(url)  # never the URL itself: it may carry a token in its query string
        try:
            self._origin = _origin(url)
        except ValueError:
            raise UsageError(f"{self.path}: not a usable http(s) URL") from None
        self._options = options
        self._url, user_headers = _without_user_info(url, options.headers)
        self._headers = {"Accept-Encoding": "identity", **dict(user_headers)}
        self._user_headers = frozenset(name for name, _ in user_headers)
        self._secrets = _secrets_of(url, options)
        self._pool = _pool_manager(url, options)
        import urllib3

        self._timeout = urllib3.Timeout(connect=options.timeout, read=options.timeout)
        self._deadline = options.timeout * _DEADLINE_TIMEOUTS
        self._validators: dict[str, str] = {}
        self.changed: str | None = None
        self.size = -1
        first = self._probe()
        self._blocks = BlockCache(self.fetch, self.size, cache_size)
        self._blocks.prime(0, first)

    @property
    def cache_capacity(self) -> int:
        """Bytes of blocks the cache keeps at most."""
        return self._blocks.cache_bytes

    def resize_cache(self, cache_size: int) -> None:
        """Keep at most `cache_size` bytes of blocks from now on (mount.py: a compressed archive's share)."""
        self._blocks.resize(cache_size)

    @property
    def fetched_bytes(self) -> int:
        return self._blocks.fetched_bytes

    def read_at(self, offset: int, size: int) -> bytes:
        return self._blocks.read_at(offset, size)

    def pread_into(self, buffer: memoryview, offset: int) -> int:
        return self._blocks.pread_into(buffer, offset)

    def check_unchanged(self) -> None:
        """Raise ArchiveChanged if any response since open came from another version of the object."""
        if self.changed is not None:
            raise ArchiveChanged(self.changed)

    def identity(self) -> Identity:
        """The URL without its secrets, the size and the validators: one version of the object."""
        return [self.path, self.size, self._validators.get("ETag"), self._validators.get("Last-Modified")]

    def close(self) -> None:
        self._blocks.close()
        self._pool.clear()

    def __enter__(self) -> RemoteArchive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _probe(self) -> bytes:
        """GET the first block: its Content-Range gives the size, its headers the validators.

        A ranged GET rather than HEAD: presigned object-store URLs are signed for GET only, and the tar
        header that is read next comes with the same round trip. At most BLOCK_SIZE bytes: a Content-Range
        that claims more is refused before its body is read.
        """
        return b"".join(self.fetch(0, BLOCK_SIZE, probe=True))

    def fetch(self, offset: int, size: int, probe: bool = False) -> Iterator[bytes]:
        """Yield the object's bytes at [offset, offset + size) in chunks, resuming after a failure.

        Every request has a deadline, `timeout` twice over for connecting, the headers and the whole body:
        a socket timeout bounds each wait for bytes, and a server that drips a byte just before each one
        would hold the read forever. A request cut off by its deadline fails the read at once if it brought
        less than a block, and is resumed if it brought more. Other failures are retried with exponential
        backoff, `retries` times in a row at most; only a request that brought a block or more forgives the
        failures before it (not any byte, which a drip would send), so no server, however slow or flaky,
        keeps a read waiting without end: at most `retries` + 1 requests of at most twice `timeout` for each
        block brought. Raises RemoteError (with the offset of the first byte missing), or ArchiveChanged if
        the object changed.
        """
        from urllib3.exceptions import HTTPError

        done, failures = 0, 0
        while done < size:
            brought = 0
            deadline = _WATCHDOG.start(self._deadline)
            try:
                response, length = self._get(offset + done, size - done, probe, deadline)
                if probe:  # the first answer sets the size; a resumed probe is an ordinary request
                    size, probe = length, False
                for chunk in _body(response, length):
                    done, brought = done + len(chunk), brought + len(chunk)
                    yield chunk
            except (HTTPError, OSError, _Transient) as exc:
                _WATCHDOG.end(deadline)
                failures = self._after_failure(exc, deadline, brought, failures, offset + done)
            finally:
                _WATCHDOG.end(deadline)

    def _after_failure(
        self, exc: Exception, deadline: _Deadline, brought: int, failures: int, at: int
    ) -> int:
        """Raise RemoteError for the byte at `at`, or wait out the backoff; return the failures in a row."""
        if brought >= _PROGRESS:
            failures = 0  # it moved: the failures before it are forgiven
        if deadline.expired:
            if brought < _PROGRESS:
                what = f"no complete answer within {self._deadline:g} s (twice timeout=)"
                raise self._error(what, at) from None
            return failures  # cut off while moving: resume at once
        failures += 1
        if failures > self._options.retries:
            raise self._error(_describe(exc), at) from None
        time.sleep(_backoff(failures, exc))
        return failures

    def _get(
        self, offset: int, size: int, probe: bool, deadline: _Deadline
    ) -> tuple[urllib3.BaseHTTPResponse, int]:
        """Send one range request, following redirects; return the response, checked, and how many body
        bytes to read from it."""
        url, headers = self._url, {**self._headers, "Range": f"bytes={offset}-{offset + size - 1}"}
        for _ in range(_MAX_REDIRECTS + 1):
            response = self._send(url, headers, offset, deadline)
            if deadline.expired:  # http.client takes an end of stream for the end of the headers
                _discard(response)
                raise _Transient("cut off by its deadline")
            if response.status not in _REDIRECT_STATUSES:
                try:
                    return response, self._check(response, offset, size, probe)
                except BaseException:
                    _discard(response)
                    raise
            location = response.headers.get("Location", "")
            _discard(response)  # unread: urllib3 would drain a redirect's body, however long or slow
            url, headers = self._redirect(url, location, headers, offset)
        raise self._error(f"more than {_MAX_REDIRECTS} redirects", offset)

    def _send(
        self, url: str, headers: dict[str, str], offset: int, deadline: _Deadline
    ) -> urllib3.BaseHTTPResponse:
        """One GET, redirects not followed; its connection hands its socket to `deadline` (_pool_classes)."""
        import urllib3
        from urllib3.exceptions import MaxRetryError, SSLError

        _CURRENT.deadline = deadline
        try:
            return self._pool.request(
                "GET", url, headers=headers, preload_content=False, decode_content=False, redirect=False,
                retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=False),
                timeout=self._timeout,
            )  # fmt: skip
        except MaxRetryError as exc:  # urllib3 wraps the first failure
            reason = exc.reason or _Transient("the request failed")
            if isinstance(reason, SSLError) and not deadline.expired:  # a certificate problem stays one
                raise self._error(f"TLS: {reason}", offset) from None
            raise reason from reason.__cause__  # the socket's error, which _describe names
        finally:
            _CURRENT.deadline = None

    def _redirect(
        self, current: str, location: str, headers: dict[str, str], offset: int
    ) -> tuple[str, dict[str, str]]:
        """Where a 3xx answer leads, and the headers to send there; refuse what must not be followed.

        Never from https to http: the bytes, and any header, would travel in clear. To another origin
        (RFC 6454: scheme, host and port) only with -o follow_redirects, and then without any -o header=
        value for the rest of the chain: they were given for the URL's own server (urllib3 would strip only
        Authorization, Cookie and Proxy-Authorization, and send X-Api-Key along).
        """
        if not location:
            raise self._error("a redirect without a Location", offset)
        target = urljoin(current, location.strip())  # RFC 9110, 10.2.2: a Location may be relative
        shown = display_name(target)
        try:
            origin = _origin(target)
        except ValueError:
            raise self._error(f"redirected to {shown}, which is no http(s) URL", offset) from None
        if origin[0] == "http" and urlsplit(current).scheme.lower() == "https":
            raise self._error(f"redirected from https to plain http ({shown}): refused", offset)
        if origin != self._origin:
            if not self._options.follow_redirects:
                raise self._error(
                    f"redirected to another host, {shown}; mount with -o follow_redirects to follow "
                    "(-o header= values are not sent there)",
                    offset,
                )
            headers = {name: value for name, value in headers.items() if name not in self._user_headers}
        return target, headers

    def _check(self, response: urllib3.BaseHTTPResponse, offset: int, size: int, probe: bool) -> int:
        """Check an answer to `Range: bytes=offset-(offset+size-1)`; return how many body bytes to read."""
        status = response.status
        if status in _RETRIED_STATUSES:
            raise _Transient(f"HTTP {status} {response.reason}", _retry_after(response))
        if status == 200:
            raise self._error(
                "the server ignored the Range header and answered with the whole object; tarfuse reads "
                "archives in place and needs HTTP range requests (download it and mount the local copy "
                "instead)",
                offset,
            )
        if status == 416:
            return self._check_unsatisfiable(response, offset, probe)
        if status != 206:
            raise self._error(f"HTTP {status} {response.reason}", offset)
        if response.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise self._error("the server encoded a range (Content-Encoding), which is unusable", offset)
        first, last, total = self._content_range(response, offset)
        if probe:
            self._record(total, response)
        else:
            self._check_version(total, response)
        if first != offset or last < first or last >= min(offset + size, total):
            raise self._error(
                f"asked for bytes {offset}-{offset + size - 1}, the server answered with "
                f"{first}-{last}/{total} (Content-Range)",
                offset,
            )
        length = last - first + 1
        declared = response.headers.get("Content-Length")
        if declared is not None and (
            (match := _CONTENT_LENGTH.fullmatch(declared)) is None or int(match[1]) != length
        ):
            raise self._error(
                f"the server announced a {declared[:40]!r}-byte body for {length} bytes (Content-Length)",
                offset,
            )
        return length

    def _check_unsatisfiable(self, response: urllib3.BaseHTTPResponse, offset: int, probe: bool) -> int:
        """A 416: an empty object at open (`bytes */0`), a shrunk one later."""
        if not probe:
            raise self._change("the object is shorter now (HTTP 416)")
        first, last, total = self._content_range(response, offset)
        if (first, last, total) != (0, -1, 0):
            raise self._error(f"HTTP 416 for the first bytes of a {total}-byte object", offset)
        self._record(0, response)
        return 0

    def _content_range(self, response: urllib3.BaseHTTPResponse, offset: int) -> tuple[int, int, int]:
        """Parse `bytes FIRST-LAST/TOTAL` into (FIRST, LAST, TOTAL), `bytes */TOTAL` into (0, -1, TOTAL)."""
        value = response.headers.get("Content-Range", "")
        if (match := _CONTENT_RANGE.fullmatch(value)) is None:
            raise self._error(f"no usable Content-Range in the answer: {value[:80]!r}", offset)
        if match[1] is None:
            return 0, -1, int(match[3])
        return int(match[1]), int(match[2]), int(match[3])

    def _record(self, total: int, response: urllib3.BaseHTTPResponse) -> None:
        """At open: the object's size and validators, which every later answer must repeat."""
        self.size = total
        self._validators = {k: v for k in ("ETag", "Last-Modified") if (v := response.headers.get(k))}

    def _check_version(self, total: int, response: urllib3.BaseHTTPResponse) -> None:
        if total != self.size:
            raise self._change(f"its size went from {self.size} to {total} bytes")
        for key, value in self._validators.items():
            if response.headers.get(key) != value:
                raise self._change(f"its {key} went from {value} to {response.headers.get(key)}")

    def _change(self, what: str) -> ArchiveChanged:
        self.changed = f"{self.path} changed on the server while mounted ({what}); unmount and mount it again"
        return ArchiveChanged(self.changed)

    def _error(self, what: str, offset: int) -> RemoteError:
        """A failed read of the object at `offset`, with the URL's display name and no secret in it."""
        return RemoteError(self._redact(f"GET {self.path}: {what}"), offset or None)  # 0: the URL says it

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _without_user_info(
    url: str, headers: tuple[tuple[str, str], ...]
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Turn `https://user:password@host/...` into Basic authentication, a user header like any other.

    urllib3 sends no credentials for a URL's user info, so the server answered 401 and the user was not told
    why; as a header it is also never sent to another host (see _redirect) and never shown (_secrets_of).
    """
    parts = urlsplit(url)
    if parts.username is None:
        return url, headers
    secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    basic = ("Authorization", "Basic " + base64.b64encode(secret).decode("ascii"))
    given = any(name.lower() == "authorization" for name, _ in headers)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl(), headers if given else (
        *headers,
        basic,
    )


class _Transient(Exception):
    """A failure worth retrying: a 5xx, 429 or 408 answer, or a response that ended early."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _body(response: urllib3.BaseHTTPResponse, length: int) -> Iterator[bytes]:
    """Yield exactly `length` body bytes, never more; on any failure, or if not read to the end, drop
    the connection."""
    done = 0
    try:
        while done < length:
            chunk = response.read(min(_CHUNK, length - done), decode_content=False)
            if not chunk:
                raise _Transient(f"the response ended after {done} of {length} bytes")
            done += len(chunk)
            yield chunk
    finally:
        if done < length:
            _discard(response)
        else:
            response.release_conn()


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close the connection: an unread body must not reach the next request on it."""
    response.close()
    response.release_conn()


def _origin(url: str) -> tuple[str, str, int]:
    """The URL's origin (RFC 6454, 4): scheme, host, port; ValueError for no http(s) URL or a bad port."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return scheme, parts.hostname, parts.port or _DEFAULT_PORTS[scheme]


class _Deadline:
    """When one request must be over, and its socket, to shut down then (known once it is connected)."""

    __slots__ = ("expired", "sock", "when")

    def __init__(self, when: float) -> None:
        self.when = when
        self.sock: socket.socket | None = None
        self.expired = False


class _Watchdog:
    """One thread that shuts down the socket of every request past its deadline.

    Socket timeouts bound each wait for bytes, never a whole request. Shutting a socket down from another
    thread wakes its reader with an end of stream, as urllib3's own `HTTPResponse.shutdown()` does. The
    thread sleeps until the earliest deadline in flight; a request that ends in time just leaves the set.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._live: set[_Deadline] = set()
        self._thread: threading.Thread | None = None
        self._generation = 0  # a thread runs while this is the number it started with
        self._wake_at = math.inf

    def start(self, seconds: float) -> _Deadline:
        deadline = _Deadline(time.monotonic() + seconds)
        with self._cond:
            self._live.add(deadline)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(self._generation,), name="tarfuse-deadlines", daemon=True
                )
                self._thread.start()
            elif deadline.when < self._wake_at:
                self._cond.notify()
        return deadline

    def attach(self, deadline: _Deadline, sock: socket.socket) -> None:
        with self._cond:
            deadline.sock = sock
            if deadline.expired:
                _shutdown(sock)

    def end(self, deadline: _Deadline) -> None:
        """The request is over: its socket, maybe back in the pool for the next request, is not ours."""
        with self._cond:
            self._live.discard(deadline)
            deadline.sock = None

    def stop(self) -> None:
        """Before fork(): end the thread, which the child would not have; the next request starts one."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._generation += 1
            self._cond.notify()
        if thread is not None:
            thread.join()

    def _run(self, generation: int) -> None:
        with self._cond:
            while generation == self._generation:
                now = time.monotonic()
                for deadline in [d for d in self._live if d.when <= now]:
                    self._live.discard(deadline)
                    deadline.expired = True
                    if deadline.sock is not None:
                        _shutdown(deadline.sock)
                self._wake_at = min((d.when for d in self._live), default=math.inf)
                self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)


def _shutdown(sock: socket.socket) -> None:
    """Wake the reader of `sock` with an end of stream. The plain socket's shutdown, also for TLS:
    SSLSocket.shutdown would drop its TLS state under the thread that is reading."""
    with contextlib.suppress(OSError):  # closed already
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Current(threading.local):
    deadline: _Deadline | None = None  # of the request this thread is sending (RemoteArchive._send)


_WATCHDOG = _Watchdog()
_CURRENT = _Current()
os.register_at_fork(before=_WATCHDOG.stop, after_in_child=_WATCHDOG._reset)


def _watch(sock: socket.socket | None) -> None:
    """Called by a connection about to read a response: its request's deadline now covers `sock`."""
    if (deadline := _CURRENT.deadline) is not None and sock is not None:
        _WATCHDOG.attach(deadline, sock)


@functools.cache
def _pool_classes() -> dict[str, type[HTTPConnectionPool]]:
    """urllib3 pools whose connections give their socket to the request's deadline before reading.

    The hook is `getresponse`: the connection is up by then (connecting and the TLS handshake have their
    own timeouts), and the status line, the headers and the body are all read after it.
    """
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.response import HTTPResponse

    class WatchedHTTPConnection(HTTPConnection):
        def getresponse(self) -> HTTPResponse:  # type: ignore[override]  # as urllib3's own
            _watch(self.sock)
            return super().getresponse()

    class WatchedHTTPSConnection(HTTPSConnection):
        def getresponse(self) -> HTTPResponse:  # type: ignore[override]  # as urllib3's own
            _watch(self.sock)
            return super().getresponse()

    class WatchedHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = WatchedHTTPConnection

    class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPSConnection

    return {"http": WatchedHTTPConnectionPool, "https": WatchedHTTPSConnectionPool}


def _retry_after(response: urllib3.BaseHTTPResponse) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None  # an HTTP date, or nothing: use our own backoff


def _backoff(failures: int, exc: Exception) -> float:
    """Seconds to wait before the next try: the server's Retry-After, or 0.1 s doubling, with jitter."""
    delay = getattr(exc, "retry_after", None) or 0.1 * 2 ** (failures - 1) * random.uniform(1, 1.5)
    return float(min(delay, _MAX_BACKOFF))


def _describe(exc: Exception) -> str:
    """What went wrong, in the words of someone who runs the server, not in urllib3's class names."""
    from urllib3.exceptions import (
        ConnectTimeoutError,
        NameResolutionError,
        NewConnectionError,
        ProtocolError,
        ReadTimeoutError,
    )

    if isinstance(exc, _Transient):
        return str(exc)
    conn = getattr(exc, "conn", None)
    host = "the server" if conn is None else f"[{conn.host}]" if ":" in conn.host else conn.host
    where = host if conn is None else f"{host}:{conn.port}"
    cause = exc.__cause__
    why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause or exc)
    if isinstance(exc, NameResolutionError):
        return f"cannot resolve {host}: {why}"
    if isinstance(exc, NewConnectionError):
        return f"cannot connect to {where}: {why[:1].lower()}{why[1:]}"
    if isinstance(exc, ConnectTimeoutError):
        return f"cannot connect to {where}: timed out"
    if isinstance(exc, ReadTimeoutError):
        return "the server stopped answering (timed out)"
    if isinstance(exc, ProtocolError):
        return f"the connection broke: {exc.args[-1] if exc.args else exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _secrets_of(url: str, options: RemoteOptions) -> list[str]:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    found = [parts.query, parts.fragment, userinfo, *(value for _, value in options.headers)]
    return sorted((s for s in found if len(s) >= 4), key=len, reverse=True)


def _pool_manager(url: str, options: RemoteOptions) -> urllib3.PoolManager:
    """A thread-safe connection pool; through HTTPS_PROXY/HTTP_PROXY unless NO_PROXY names the host."""
    import urllib3

    pool_options = {"num_pools": 4, "maxsize": 16, "block": False, "ca_certs": options.ca_file}
    proxy = _proxy_for(url)
    manager: urllib3.PoolManager
    if proxy is None:
        manager = urllib3.PoolManager(**pool_options)  # type: ignore[arg-type]
    else:
        parts = urlsplit(proxy)
        userinfo, _, host = parts.netloc.rpartition("@")
        headers = urllib3.make_headers(proxy_basic_auth=unquote(userinfo)) if userinfo else None
        manager = urllib3.ProxyManager(f"{parts.scheme}://{host}", proxy_headers=headers, **pool_options)  # type: ignore[arg-type]
    manager.pool_classes_by_scheme = _pool_classes()
    return manager


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for this URL's scheme (as curl and pip read it), or None."""
    import urllib.request

    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme.lower()) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc.rpartition("@")[2]):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"
