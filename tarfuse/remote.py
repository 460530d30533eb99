"""Archives on a web server: positional reads as HTTP range requests, through a block cache.

Owns the HTTP side: which part of a URL may be shown (never user info, the query string or header values),
the ranged GET and its checks (206, Content-Range, the ETag/Last-Modified recorded at open), retries with
backoff, proxies and TLS options, and `open_source`, which picks the local or the remote source.
Caching, coalescing and readahead are blockcache.py's. Must not import pyfuse3 or trio. urllib3 and
urllib.request are imported when a URL is opened: a local mount does not pay the ~25 ms they take to import.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from tarfuse.blockcache import BLOCK_SIZE, BlockReader
from tarfuse.errors import ArchiveChanged, RemoteError, UsageError
from tarfuse.source import ArchiveFile, Identity

if TYPE_CHECKING:
    import urllib3

OPTION_KEYS = ("header", "ca_file", "timeout", "cache_size", "retries")
_RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK = 256 * 1024
_MAX_BACKOFF = 5.0
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE = re.compile(r"(\d+)\s*([kmgKMG]?)(?:i?[bB])?")
_RESERVED_HEADERS = frozenset({"range", "host", "accept-encoding", "content-length"})

# urllib3 logs each request line, query string (a presigned URL's signature) included, and failures with
# the URL in them: keep it quiet. Failures reach the log through our own messages, redacted.
logging.getLogger("urllib3").propagate = False


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """The -o options that apply to http(s) archives."""

    headers: tuple[tuple[str, str], ...] = ()
    ca_file: str | None = None
    timeout: float = 20.0  # seconds to connect, and between two reads of a response
    cache_size: int = 64 << 20
    retries: int = 5  # failed tries in a row, per request, before the read fails with EIO


def is_url(archive: str) -> bool:
    return archive.lower().startswith(("http://", "https://"))


def display_name(archive: str) -> str:
    """What logs, `mount` and xattrs may show: a path made absolute, or a URL without its secrets."""
    if not is_url(archive):
        return os.path.abspath(archive)
    parts = urlsplit(archive)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def parse_options(words: Sequence[str]) -> RemoteOptions:
    """Parse `key=value` words (keys in OPTION_KEYS; `header` repeats); raise UsageError if one is wrong."""
    options = RemoteOptions()
    for word in words:
        key, _, value = word.partition("=")
        if key == "header":
            options = replace(options, headers=(*options.headers, _parse_header(value)))
        elif key == "ca_file":
            if not os.path.isfile(value):
                raise UsageError(f"option ca_file={value!r}: no such file")
            options = replace(options, ca_file=value)
        elif key == "timeout":
            options = replace(options, timeout=_parse_number(key, value, float))
        elif key == "retries":
            options = replace(options, retries=int(_parse_number(key, value, int)))
        elif key == "cache_size":
            options = replace(options, cache_size=_parse_size(key, value))
        else:
            raise UsageError(f"unknown remote option {key!r}")
    return options


def _parse_size(key: str, value: str) -> int:
    """Bytes, or a number with a K, M or G suffix (binary: 64M is 64 MiB)."""
    if (match := _SIZE.fullmatch(value.strip())) is None:
        raise UsageError(f"option {key}={value!r}: use bytes or a K, M or G suffix (e.g. {key}=64M)")
    return int(match[1]) * _UNITS[match[2].upper()]


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


def open_source(archive: str, words: Sequence[str] = ()) -> ArchiveFile | RemoteArchive:
    """Open ARCHIVE: a URL as a RemoteArchive, anything else as a local file; `words`: -o remote options."""
    if is_url(archive):
        return RemoteArchive(archive, parse_options(words))
    if remote_only := [w for w in words if not w.startswith("cache_size=")]:  # cache_size: compressed too
        raise UsageError(
            f"option {remote_only[0].partition('=')[0]}= applies only to http:// and https:// archives"
        )
    return ArchiveFile(archive)


class RemoteArchive:
    """An archive read with HTTP range requests; same interface as source.ArchiveFile.

    Every response must be a 206 for the range asked, from the object that was there at open (same size,
    ETag and Last-Modified); anything else fails the read, and a changed object fails every later
    `check_unchanged`, so a mount never serves bytes mixed from two versions.
    """

    blocking = True  # reads wait on the network: the daemon serves them from threads (fs.ServedFile)

    def __init__(self, url: str, options: RemoteOptions = RemoteOptions()) -> None:
        self.path = display_name(url)  # never the URL itself: it may carry a token in its query string
        self._url = url
        self._options = options
        self._headers = {"Accept-Encoding": "identity", **dict(options.headers)}
        self._secrets = _secrets_of(url, options)
        self._pool = _pool_manager(url, options)
        import urllib3

        self._timeout = urllib3.Timeout(connect=options.timeout, read=options.timeout)
        self._validators: dict[str, str] = {}
        self.changed: str | None = None
        self.size = -1
        first = self._probe()
        self._blocks = BlockReader(self.fetch, self.size, options.cache_size)
        self._blocks.prime(0, first)

    @property
    def fetched_bytes(self) -> int:
        return self._blocks.fetched_bytes

    def pread(self, size: int, offset: int) -> bytes:
        return self._blocks.pread(size, offset)

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
        header that is read next comes with the same round trip.
        """
        return b"".join(self.fetch(0, BLOCK_SIZE, probe=True))

    def fetch(self, offset: int, size: int, probe: bool = False) -> Iterator[bytes]:
        """Yield the object's bytes at [offset, offset + size) in chunks, resuming after a failure.

        Failures in a row are retried with exponential backoff, at most `retries` times; any byte that
        arrives resets the count. Raises RemoteError once they run out, ArchiveChanged if the object changed.
        """
        from urllib3.exceptions import HTTPError

        done, failures = 0, 0
        while done < size:
            try:
                response, length = self._get(offset + done, size - done, probe)
                if probe:  # the first answer sets the size; a resumed probe is an ordinary request
                    size, probe = length, False
                for chunk in _body(response, length):
                    done, failures = done + len(chunk), 0
                    yield chunk
            except (HTTPError, _Transient) as exc:
                failures += 1
                if failures > self._options.retries:
                    raise RemoteError(self._redact(f"GET {self.path}: {_describe(exc)}")) from None
                time.sleep(_backoff(failures, exc))

    def _get(self, offset: int, size: int, probe: bool) -> tuple[urllib3.BaseHTTPResponse, int]:
        """Send one range request; return the response, checked, and how many body bytes it brings."""
        import urllib3
        from urllib3.exceptions import MaxRetryError, SSLError

        headers = {**self._headers, "Range": f"bytes={offset}-{offset + size - 1}"}
        try:
            response = self._pool.request(
                "GET", self._url, headers=headers, preload_content=False, decode_content=False,
                retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5),
                timeout=self._timeout,
            )  # fmt: skip
        except MaxRetryError as exc:  # urllib3 wraps the first failure; redirect loops too
            reason = exc.reason or _Transient("too many redirects")
            if isinstance(reason, SSLError):  # a certificate problem stays one: don't retry it
                raise RemoteError(self._redact(f"GET {self.path}: TLS: {reason}")) from None
            raise reason from None
        try:
            return response, self._check(response, offset, size, probe)
        except BaseException:
            _discard(response)
            raise

    def _check(self, response: urllib3.BaseHTTPResponse, offset: int, size: int, probe: bool) -> int:
        status = response.status
        if status in _RETRIED_STATUSES:
            raise _Transient(f"HTTP {status} {response.reason}", _retry_after(response))
        if status == 200:
            raise RemoteError(
                f"{self.path}: the server ignored the Range header and answered with the whole object; "
                "tarfuse reads archives in place and needs HTTP range requests (download it and mount "
                "the local copy instead)"
            )
        if status == 416 and not probe:
            raise self._change("the object is shorter now (HTTP 416)")
        if status not in (206, 416):
            raise RemoteError(f"GET {self.path}: HTTP {status} {response.reason}")
        if response.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise RemoteError(
                f"{self.path}: the server encoded a range (Content-Encoding), which is unusable"
            )
        first, last, total = _content_range(response.headers.get("Content-Range", ""))
        if probe:
            if first != 0 and total:
                raise RemoteError(f"GET {self.path}: asked for the first bytes, got {first}-{last}")
            self.size = total
            self._validators = {k: v for k in ("ETag", "Last-Modified") if (v := response.headers.get(k))}
            return last - first + 1 if total else 0
        if total != self.size:
            raise self._change(f"its size went from {self.size} to {total} bytes")
        for key, value in self._validators.items():
            if response.headers.get(key) != value:
                raise self._change(f"its {key} went from {value} to {response.headers.get(key)}")
        if first != offset or last >= offset + size or last < first:
            raise RemoteError(f"GET {self.path}: asked for bytes {offset}+{size}, got {first}-{last}")
        return last - first + 1

    def _change(self, what: str) -> ArchiveChanged:
        self.changed = f"{self.path} changed on the server while mounted ({what}); unmount and mount it again"
        return ArchiveChanged(self.changed)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _Transient(Exception):
    """A failure worth retrying: a 5xx, 429 or 408 answer, or a response that ended early."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _body(response: urllib3.BaseHTTPResponse, length: int) -> Iterator[bytes]:
    """Yield exactly `length` body bytes; on any failure, or if not read to the end, drop the connection."""
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


def _content_range(value: str) -> tuple[int, int, int]:
    """Parse `bytes FIRST-LAST/TOTAL`, or `bytes */TOTAL` (of a 416), into (FIRST, LAST, TOTAL)."""
    unit, _, rest = value.strip().partition(" ")
    span, _, total = rest.partition("/")
    try:
        if unit.lower() == "bytes" and span == "*":
            return 0, -1, int(total)
        first, _, last = span.partition("-")
        if unit.lower() == "bytes":
            return int(first), int(last), int(total)
    except ValueError:
        pass
    raise RemoteError(f"the server sent no usable Content-Range with its partial answer: {value!r}")


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
    if isinstance(exc, _Transient):
        return str(exc)
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
    if proxy is None:
        return urllib3.PoolManager(**pool_options)  # type: ignore[arg-type]
    parts = urlsplit(proxy)
    userinfo, _, host = parts.netloc.rpartition("@")
    headers = urllib3.make_headers(proxy_basic_auth=unquote(userinfo)) if userinfo else None
    return urllib3.ProxyManager(f"{parts.scheme}://{host}", proxy_headers=headers, **pool_options)  # type: ignore[arg-type]


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for this URL's scheme (as curl and pip read it), or None."""
    import urllib.request

    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme.lower()) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc.rpartition("@")[2]):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"
