"""An archive on a web server: positional reads as HTTP range requests, through a block cache.

The ranged GET and its checks (206, a Content-Range and Content-Length that match the range asked, the
ETag/Last-Modified recorded at open), redirects (never https to http, another host only when asked, and
then without the user's headers), a deadline on every request, retries with backoff. Caching, coalescing
and readahead are blockcache.py's; which part of a URL may be shown is locations.py's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urljoin, urlsplit

from tarfuse.errors import ArchiveChanged, ArchiveError, RemoteError, UsageError
from tarfuse.sources import DEFAULT_CACHE_SIZE
from tarfuse.sources.blockcache import BLOCK_SIZE, BlockCache
from tarfuse.sources.compression import sniff
from tarfuse.sources.file import Identity, SourceDefaults
from tarfuse.sources.http import answers, readlist
from tarfuse.sources.http.answers import REDIRECT_STATUSES, RETRIED_STATUSES, Transient, body, discard
from tarfuse.sources.http.deadlines import CURRENT, WATCHDOG, Deadline
from tarfuse.sources.http.options import NO_HTTP_OPTIONS, RemoteOptions
from tarfuse.sources.http.pools import origin, pool_manager, secrets_of, without_user_info
from tarfuse.sources.locations import display_name

if TYPE_CHECKING:
    import urllib3

_MAX_REDIRECTS = 5
_DEADLINE_TIMEOUTS = 2  # a whole request (connect, headers, body) gets this many times `timeout`
# The first request's length: the tar header and a gzip stream's ratio probe (decoders.opener) in one trip.
PROBE = 2 * BLOCK_SIZE
_PROGRESS = BLOCK_SIZE  # a failed request that brought at least this much does not count as a failure
# A compressed archive's share of the cache budget for its compressed blocks: the rest goes to the
# decompressed chunks above them (compressed.CompressedSource). A plain one keeps the whole budget.
COMPRESSED_BLOCKS_SHARE = 4
# What a cold read of a compressed archive fetches at least: the compressed span of one decompressed chunk
# (decoders.GZIP_REMOTE_CHUNK_SIZE) of data that does not compress, with room for the blocks around it,
# which the decoder then reads in small pieces.
COMPRESSED_LEAST_FETCH = 1536 * 1024
_REFUSED = (401, 403)  # what a store answers to a signature made with expired credentials


class Signed(Protocol):
    """A URL that authorizes itself (presigned), and can be signed again when the old one is refused."""

    def url(self, fresh: bool = False) -> str: ...

    def beside(self, suffix: str) -> str: ...  # the URL of `<object><suffix>`, signed too

    def close(self) -> None: ...


class RemoteArchive(SourceDefaults):
    """An archive read with HTTP range requests; same interface as file.ArchiveFile.

    A server is trusted for the bytes it sends and nothing more: every response must be a 206 for the range
    asked, no longer than asked (Content-Range and Content-Length), from the object that was there at open
    (same size, ETag and Last-Modified), and no body is read past the range asked for. Anything else fails
    the read, and a changed object fails every later `check_unchanged`, so a mount never serves bytes mixed
    from two versions.
    """

    blocking = True  # reads wait on the network: the daemon serves them from threads (ServedFile.blocking)
    readers = 8  # requests in flight at once; more gained nothing against a local server
    size_known = True  # from the first answer's Content-Range

    def __init__(
        self,
        url: str,
        options: RemoteOptions = NO_HTTP_OPTIONS,
        cache_size: int = DEFAULT_CACHE_SIZE,
        *,
        name: str | None = None,
        signed: Signed | None = None,
    ) -> None:
        # What is shown: never the URL itself, which may carry a token in its query string.
        self.path = name or display_name(url)
        self._signed = signed  # an object's presigned URL, signed again as it ages (objects.py)
        try:
            self._origin = origin(url)
        except ValueError:
            raise UsageError(f"{self.path}: not a usable http(s) URL") from None
        self._options = options
        self._url, user_headers = without_user_info(url, options.headers)
        self._headers = {"Accept-Encoding": "identity", **dict(user_headers)}
        self._user_headers = frozenset(name for name, _ in user_headers)
        self._secrets = secrets_of(url, options)
        self._pool = pool_manager(url, options)
        import urllib3

        self._timeout = urllib3.Timeout(connect=options.timeout, read=options.timeout)
        self._deadline = options.timeout * _DEADLINE_TIMEOUTS
        self._validators: dict[str, str] = {}
        self.changed: str | None = None
        self.size = -1
        first = self._probe()
        compressed = sniff(first) is not None
        if compressed:  # the decompressed chunks above take the rest of the budget
            cache_size //= COMPRESSED_BLOCKS_SHARE
        least = COMPRESSED_LEAST_FETCH if compressed else 0
        self._blocks = BlockCache(self.fetch, self.size, cache_size, least_fetch=least)
        self._blocks.prime(0, first)
        self.cache_capacity = self._blocks.cache_bytes  # the budget, or its share under a compressed stream
        self._recorder = readlist.Recorder() if options.record_reads else None
        if self._recorder is not None:
            self._recorder.saw(0, 0)  # the first request's, which every mount makes
            self._blocks.recorder = self._recorder.saw
        self._read_list = "not looked for yet" if signed is not None else None  # for --status

    @property
    def fetched_bytes(self) -> int:
        return self._blocks.fetched_bytes

    def fetched(self) -> int | None:
        return self._blocks.fetched_bytes

    def read_at(self, offset: int, size: int) -> bytes:
        return self._blocks.read_at(offset, size)

    def watch_for_writers(self) -> str | None:
        """In the process that serves, once it serves (after any fork, which would wait for what the
        readahead threads do): fetch ahead the read list published beside an object, if it has one."""
        if self._read_list == "not looked for yet":  # an object, which a fleet boots from (readlist.py)
            self._read_list = "looking for it"
            self._blocks.in_background(self._fetch_listed)
        return None

    def read_list(self) -> str | None:
        return self._read_list

    def recorded_reads(self) -> bytes | None:
        """The read list recorded in this process, if -o record_reads asked for one."""
        if self._recorder is None:
            return None
        return self._recorder.encode(self.size, self._validators.get("ETag"), BLOCK_SIZE)

    def _fetch_listed(self) -> None:
        """Fetch ahead the blocks of the read list published beside the object, if it has one that fits.

        Off the path to the first read (a readahead thread); a list that is missing, unfit, or cannot be
        read is not used, and costs nothing else: the mount reads as it would without one.
        """
        name = self.path + readlist.SUFFIX
        try:
            data = self.beside(readlist.SUFFIX, readlist.LIST_MAX)
            if data is None:
                self._read_list = f"none published ({name})"
                return
            runs = readlist.parse(data, self.size, self._validators.get("ETag"), BLOCK_SIZE)
            fetched = self._blocks.fetch_ahead(runs)
            self._read_list = f"{name}: {fetched} blocks of {len(runs)} runs fetched ahead"
        except (ArchiveError, readlist.Unfit) as exc:
            self._read_list = f"{name} not used: {exc}"

    def pread_into(self, buffer: memoryview, offset: int) -> int:
        return self._blocks.pread_into(buffer, offset)

    def beside(self, suffix: str, limit: int) -> bytes | None:
        """The object published beside this one (beside_part), read whole; None if there is none. Raises
        RemoteError if it is longer than `limit` bytes (said before its body is read)."""
        found = self.beside_part(suffix, 0, limit + 1)
        if found is None:
            return None
        data, total = found
        if total > limit:
            raise RemoteError(f"{self.path + suffix} is {total} bytes, more than {limit}", None)
        return data

    def beside_part(self, suffix: str, offset: int, size: int) -> tuple[bytes, int] | None:
        """Bytes [offset, offset + size) of the object published beside this one, at this URL with
        `suffix` appended (for an object URL, its key with `suffix`, signed alike), and its whole length;
        None if there is none.

        None too for a URL with a query string: a presigned URL signs one object. One request, never
        retried (the mount goes on without it, or a read fails); raises RemoteError if it fails, or if
        the answer is not the range asked (at most `size` bytes are read).
        """
        from urllib3.exceptions import HTTPError

        if self._signed is not None:
            url = self._signed.beside(suffix)
        elif urlsplit(self._url).query or urlsplit(self._url).fragment:
            return None
        else:
            url = self._url + suffix
        shown = self.path + suffix
        deadline = WATCHDOG.start(self._deadline)
        try:
            response = self._send(
                url, {**self._headers, "Range": f"bytes={offset}-{offset + size - 1}"}, 0, deadline
            )
            try:
                if response.status in (403, 404) or (response.status == 416 and offset == 0):
                    return None  # a store says 403 for a missing key it may not list; 416: empty
                if response.status != 206:
                    raise RemoteError(f"GET {shown}: HTTP {response.status} {response.reason}", None)
                found = answers.content_range(response.headers.get("Content-Range", ""))
                declared = answers.content_length(response.headers.get("Content-Length", ""))
                if found is None or found[0] != offset or found[1] >= offset + size or found[1] < offset:
                    raise RemoteError(f"GET {shown}: an answer for another range than asked", None)
                length = found[1] - offset + 1
                if declared is not None and declared != length:
                    raise RemoteError(f"GET {shown}: a Content-Length that is not its Content-Range's", None)
                return b"".join(body(response, length)), found[2]
            finally:
                discard(response)
        except (HTTPError, OSError, Transient) as exc:
            raise RemoteError(self._redact(f"GET {shown}: {answers.describe(exc)}"), None) from None
        finally:
            WATCHDOG.end(deadline)

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
        if self._signed is not None:
            self._signed.close()

    def __enter__(self) -> RemoteArchive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _probe(self) -> bytes:
        """GET the first blocks: its Content-Range gives the size, its headers the validators.

        A ranged GET rather than HEAD: presigned object-store URLs are signed for GET only, and the tar
        header that is read next comes with the same round trip. At most PROBE bytes: a Content-Range
        that claims more is refused before its body is read.
        """
        return b"".join(self.fetch(0, PROBE, probe=True))

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
            deadline = WATCHDOG.start(self._deadline)
            try:
                response, length = self._get(offset + done, size - done, probe, deadline)
                if probe:  # the first answer sets the size; a resumed probe is an ordinary request
                    size, probe = length, False
                for chunk in body(response, length):
                    done, brought = done + len(chunk), brought + len(chunk)
                    yield chunk
            except (HTTPError, OSError, Transient) as exc:
                WATCHDOG.end(deadline)
                failures = self._after_failure(exc, deadline, brought, failures, offset + done)
            finally:
                WATCHDOG.end(deadline)

    def _after_failure(self, exc: Exception, deadline: Deadline, brought: int, failures: int, at: int) -> int:
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
            raise self._error(answers.describe(exc), at) from None
        time.sleep(answers.backoff(failures, exc))
        return failures

    def _get(
        self, offset: int, size: int, probe: bool, deadline: Deadline
    ) -> tuple[urllib3.BaseHTTPResponse, int]:
        """Send one range request, following redirects; return the response, checked, and how many body
        bytes to read from it."""
        url, headers = self._url_now(), {**self._headers, "Range": f"bytes={offset}-{offset + size - 1}"}
        resigned = False
        for _ in range(_MAX_REDIRECTS + 2):  # one more for a signature made again
            response = self._send(url, headers, offset, deadline)
            if deadline.expired:  # http.client takes an end of stream for the end of the headers
                discard(response)
                raise Transient("cut off by its deadline")
            if response.status in _REFUSED and self._signed is not None and not resigned:
                discard(response)  # the credentials may have expired since the URL was signed: once more
                url, resigned = self._url_now(fresh=True), True
                continue
            if response.status not in REDIRECT_STATUSES:
                try:
                    return response, self._check(response, offset, size, probe)
                except BaseException:
                    discard(response)
                    raise
            location = response.headers.get("Location", "")
            discard(response)  # unread: urllib3 would drain a redirect's body, however long or slow
            url, headers = self._redirect(url, location, headers, offset)
        raise self._error(f"more than {_MAX_REDIRECTS} redirects", offset)

    def _send(
        self, url: str, headers: dict[str, str], offset: int, deadline: Deadline
    ) -> urllib3.BaseHTTPResponse:
        """One GET, redirects not followed; its connection hands its socket to `deadline` (_pool_classes)."""
        import urllib3
        from urllib3.exceptions import MaxRetryError, SSLError

        CURRENT.deadline = deadline
        try:
            return self._pool.request(
                "GET", url, headers=headers, preload_content=False, decode_content=False, redirect=False,
                retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=False),
                timeout=self._timeout,
            )  # fmt: skip
        except MaxRetryError as exc:  # urllib3 wraps the first failure
            reason = exc.reason or Transient("the request failed")
            if isinstance(reason, SSLError) and not deadline.expired:  # a certificate problem stays one
                raise self._error(f"TLS: {reason}", offset) from None
            raise reason from reason.__cause__  # the socket's error, which answers.describe names
        finally:
            CURRENT.deadline = None

    def _url_now(self, fresh: bool = False) -> str:
        """The URL to send a request to: a presigned one is signed again as it ages; its query is secret."""
        if self._signed is None:
            return self._url
        url = self._signed.url(fresh)  # RemoteError if it cannot be signed
        query = urlsplit(url).query
        if query and query not in self._secrets:
            self._secrets = [query, *self._secrets[:3]]  # the last few signatures, kept out of messages
        return url

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
            there = origin(target)
        except ValueError:
            raise self._error(f"redirected to {shown}, which is no http(s) URL", offset) from None
        if there[0] == "http" and urlsplit(current).scheme.lower() == "https":
            raise self._error(f"redirected from https to plain http ({shown}): refused", offset)
        if there != self._origin:
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
        if status in RETRIED_STATUSES:
            raise Transient(f"HTTP {status} {response.reason}", answers.retry_after(response))
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
            code = answers.error_code(response) if 400 <= status < 500 else ""
            raise self._error(f"HTTP {status} {response.reason}{code}", offset)
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
        if declared is not None and answers.content_length(declared) != length:
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
        if (found := answers.content_range(value)) is None:
            raise self._error(f"no usable Content-Range in the answer: {value[:80]!r}", offset)
        return found

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
