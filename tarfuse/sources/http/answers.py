"""What an HTTP answer must be before its body is used, and what to do when a request fails.

A server is trusted for the bytes it sends and nothing more: the checks of a range answer's headers
(Content-Range, Content-Length), the body read to exactly the length announced, the failures worth a retry
and the wait before it, and what a failure is called in the words of someone who runs the server.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import urllib3

RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})  # RFC 9110, 15.4
_CHUNK = 256 * 1024
_MAX_BACKOFF = 5.0
# RFC 9110, 14.4: `bytes FIRST-LAST/TOTAL`, or `bytes */TOTAL` in a 416. Digits only (int() would also take
# "+5", "-5", "1_0" and spaces), and at most 19 of them: no offset of ours needs more than 63 bits.
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(?:(\d{1,19})-(\d{1,19})|\*)/(\d{1,19})\s*", re.IGNORECASE)
_CONTENT_LENGTH = re.compile(r"\s*(\d{1,19})\s*")
# An object store's error answer names what is wrong in an XML <Code> (S3, the GCS XML API, Azure); read
# from the first bytes of the body only, and only a plain word of it is shown.
_ERROR_BODY = 4096
_ERROR_CODE = re.compile(rb"<Code>\s*([A-Za-z][A-Za-z0-9.]{0,63})\s*</Code>")
_WHAT_CODES_MEAN = {
    "NoSuchKey": "no such object",
    "NoSuchBucket": "no such bucket",
    "BlobNotFound": "no such object",
    "ContainerNotFound": "no such container",
    "ExpiredToken": "the credentials have expired",
    "TokenRefreshRequired": "the credentials have expired",
    "InvalidAccessKeyId": "the access key is not known to the store",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "AccessDenied": "the credentials do not allow reading it",
    "AuthorizationFailure": "the credentials do not allow reading it",
    "AuthenticationFailed": "the store refused the credentials",
}


def content_range(value: str) -> tuple[int, int, int] | None:
    """`bytes FIRST-LAST/TOTAL` as (FIRST, LAST, TOTAL), `bytes */TOTAL` as (0, -1, TOTAL); None if it
    is neither."""
    if (match := _CONTENT_RANGE.fullmatch(value)) is None:
        return None
    if match[1] is None:
        return 0, -1, int(match[3])
    return int(match[1]), int(match[2]), int(match[3])


def content_length(value: str) -> int | None:
    """A Content-Length's number, or None if it is not one."""
    return None if (match := _CONTENT_LENGTH.fullmatch(value)) is None else int(match[1])


def error_code(response: urllib3.BaseHTTPResponse) -> str:
    """`(Code: what it means)` from an object store's error answer, or "" if the body names none."""
    try:
        start = response.read(_ERROR_BODY, decode_content=False)
    except Exception:
        return ""
    if (match := _ERROR_CODE.search(start)) is None:
        return ""
    code = match[1].decode("ascii")
    meaning = _WHAT_CODES_MEAN.get(code)
    return f" ({code}: {meaning})" if meaning else f" ({code})"


class Transient(Exception):
    """A failure worth retrying: a 5xx, 429 or 408 answer, or a response that ended early."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def body(response: urllib3.BaseHTTPResponse, length: int) -> Iterator[bytes]:
    """Yield exactly `length` body bytes, never more; on any failure, or if not read to the end, drop
    the connection."""
    done = 0
    try:
        while done < length:
            chunk = response.read(min(_CHUNK, length - done), decode_content=False)
            if not chunk:
                raise Transient(f"the response ended after {done} of {length} bytes")
            done += len(chunk)
            yield chunk
    finally:
        if done < length:
            discard(response)
        else:
            response.release_conn()


def discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close the connection: an unread body must not reach the next request on it."""
    response.close()
    response.release_conn()


def retry_after(response: urllib3.BaseHTTPResponse) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None  # an HTTP date, or nothing: use our own backoff


def backoff(failures: int, exc: Exception) -> float:
    """Seconds to wait before the next try: the server's Retry-After, or 0.1 s doubling, with jitter."""
    delay = getattr(exc, "retry_after", None) or 0.1 * 2 ** (failures - 1) * random.uniform(1, 1.5)
    return float(min(delay, _MAX_BACKOFF))


def describe(exc: Exception) -> str:
    """What went wrong, in the words of someone who runs the server, not in urllib3's class names."""
    from urllib3.exceptions import (
        ConnectTimeoutError,
        NameResolutionError,
        NewConnectionError,
        ProtocolError,
        ReadTimeoutError,
    )

    if isinstance(exc, Transient):
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
