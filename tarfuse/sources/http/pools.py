"""Connection pools for http(s) archives: urllib3 pools whose sockets the deadlines watch, proxies from the
environment, and the credentials a URL may carry, turned into a header and kept out of what is shown.
"""

from __future__ import annotations

import base64
import functools
import logging
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from tarfuse.sources.http.deadlines import watch
from tarfuse.sources.http.options import RemoteOptions

if TYPE_CHECKING:
    import urllib3
    from urllib3.connectionpool import HTTPConnectionPool

_DEFAULT_PORTS = {"http": 80, "https": 443}

# urllib3 logs each request line, query string (a presigned URL's signature) included, and failures with
# the URL in them: keep it quiet. Failures reach the log through our own messages, redacted.
logging.getLogger("urllib3").propagate = False


def origin(url: str) -> tuple[str, str, int]:
    """The URL's origin (RFC 6454, 4): scheme, host, port; ValueError for no http(s) URL or a bad port."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return scheme, parts.hostname, parts.port or _DEFAULT_PORTS[scheme]


def without_user_info(
    url: str, headers: tuple[tuple[str, str], ...]
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Turn `https://user:password@host/...` into Basic authentication, a user header like any other.

    urllib3 sends no credentials for a URL's user info, so the server answered 401 and the user was not told
    why; as a header it is also never sent to another host (archive.RemoteArchive._redirect) and never
    shown (secrets_of).
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


def secrets_of(url: str, options: RemoteOptions) -> list[str]:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    found = [parts.query, parts.fragment, userinfo, *(value for _, value in options.headers)]
    return sorted((s for s in found if len(s) >= 4), key=len, reverse=True)


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
            watch(self.sock)
            return super().getresponse()

    class WatchedHTTPSConnection(HTTPSConnection):
        def getresponse(self) -> HTTPResponse:  # type: ignore[override]  # as urllib3's own
            watch(self.sock)
            return super().getresponse()

    class WatchedHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = WatchedHTTPConnection

    class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPSConnection

    return {"http": WatchedHTTPConnectionPool, "https": WatchedHTTPSConnectionPool}


def pool_manager(url: str, options: RemoteOptions) -> urllib3.PoolManager:
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
