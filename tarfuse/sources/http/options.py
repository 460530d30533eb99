"""The -o options that apply to remote archives, parsed once from the command line's words: http(s) URLs
and object-store URLs (s3://, gs://, az://), which are read through presigned https URLs and take three
options more (OBJECT_KEYS)."""

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tarfuse.errors import UsageError

OBJECT_KEYS = ("endpoint", "region", "anonymous")  # object-store URLs only
OPTION_KEYS = ("header", "ca_file", "timeout", "retries", "follow_redirects", "record_reads", *OBJECT_KEYS)
FLAG_KEYS = ("follow_redirects", "anonymous")  # words without a value
_RESERVED_HEADERS = frozenset({"range", "host", "accept-encoding", "content-length"})


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """The -o options that apply to http(s) archives; `given`: the words they came from, to name in an
    error if the archive is no URL."""

    headers: tuple[tuple[str, str], ...] = ()
    ca_file: str | None = None
    timeout: float = 20.0  # seconds to connect, between two reads; twice that for a whole request
    retries: int = 5  # failed tries in a row, per request, before the read fails with EIO
    follow_redirects: bool = False  # to another origin (scheme, host, port); same-origin ones always
    endpoint: str | None = None  # an S3-compatible server, or another GCS or Azure endpoint (an emulator)
    region: str | None = None
    anonymous: bool = False  # a public bucket: no credentials, no signature
    record_reads: str | None = None  # where to write the read list at unmount (readlist.py)
    given: tuple[str, ...] = ()

    @property
    def for_objects(self) -> tuple[str, ...]:
        """The words given that only an object-store URL takes."""
        return tuple(word for word in self.given if word.partition("=")[0] in OBJECT_KEYS)


NO_HTTP_OPTIONS = RemoteOptions()


def parse_options(words: Sequence[str]) -> RemoteOptions:
    """Parse `key=value` words (keys in OPTION_KEYS; `header` repeats; FLAG_KEYS alone); raise UsageError
    if one is wrong."""
    options = RemoteOptions(given=tuple(words))
    for word in words:
        key, has_value, value = word.partition("=")
        if key in FLAG_KEYS:
            if has_value:
                raise UsageError(f"option {key} takes no value")
            options = (
                replace(options, anonymous=True)
                if key == "anonymous"
                else replace(options, follow_redirects=True)
            )
        elif key == "header":
            options = replace(options, headers=(*options.headers, _parse_header(value)))
        elif key == "ca_file":
            if not os.path.isfile(value):
                raise UsageError(f"option ca_file={value!r}: no such file")
            options = replace(options, ca_file=value)
        elif key == "endpoint":
            if not value.lower().startswith(("http://", "https://")):
                raise UsageError(
                    f"option endpoint={value!r}: give a URL, e.g. endpoint=https://s3.example.net"
                )
            options = replace(options, endpoint=value)
        elif key == "region":
            if not value or not all(c.isalnum() or c in "-_" for c in value):
                raise UsageError(f"option region={value!r} is not a region name")
            options = replace(options, region=value)
        elif key == "record_reads":
            if not value:
                raise UsageError("option record_reads=PATH: where to write the list of blocks read")
            options = replace(options, record_reads=os.path.abspath(value))
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
