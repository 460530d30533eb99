"""Where an archive is, and how it is named: the one place where a location becomes a source.

A path is opened as a local file (with the rights of whoever controls it: opening.py), an http(s) URL as
a RemoteArchive, an object-store URL (s3://, gs://, az://) as a RemoteArchive of presigned URLs
(objects.py). What may be shown of a location, in logs, `mount`, xattrs and --list, is decided here
too: a path made absolute, a URL without its user info, query string or fragment (where tokens travel).
A new kind of location is a module of its own and a line in `open_location`.
"""

import os
from collections.abc import Callable
from urllib.parse import urlsplit

from tarfuse.errors import UsageError
from tarfuse.sources import DEFAULT_CACHE_SIZE
from tarfuse.sources.file import ArchiveFile, ByteSource
from tarfuse.sources.http.options import FLAG_KEYS, NO_HTTP_OPTIONS, RemoteOptions

OBJECT_SCHEMES = ("s3://", "gs://", "az://")


def is_url(archive: str) -> bool:
    return archive.lower().startswith(("http://", "https://", *OBJECT_SCHEMES))


def display_name(archive: str) -> str:
    """What logs, `mount` and xattrs may show: a path made absolute, or a URL without its secrets."""
    if not is_url(archive):
        return os.path.abspath(archive)
    if archive.lower().startswith(OBJECT_SCHEMES):
        return archive.partition("?")[0].partition("#")[0]  # credentials never travel in these URLs
    parts = urlsplit(archive)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def open_location(
    archive: str,
    http: RemoteOptions = NO_HTTP_OPTIONS,
    cache_size: int = DEFAULT_CACHE_SIZE,
    say: Callable[[str], None] = lambda line: None,
) -> ByteSource:
    """Open ARCHIVE as it is stored: a URL as a RemoteArchive, anything else as a local file.

    `http`: the -o options for http(s) archives (an error if given for a path); `cache_size`: the mount's
    cache budget, of which a URL's blocks take their share; `say` hears whose rights opened a local file,
    if not the caller's.
    """
    if archive.lower().startswith(OBJECT_SCHEMES):
        from tarfuse.sources.objects import open_object  # urllib3 and a helper: only for such a URL

        return open_object(archive, http, cache_size)
    if is_url(archive):
        from tarfuse.sources.http.archive import RemoteArchive  # urllib3: only when a URL is opened

        if http.for_objects:
            key = http.for_objects[0].partition("=")[0]
            raise UsageError(f"option {key} applies only to s3://, gs:// and az:// archives")
        return RemoteArchive(archive, http, cache_size)
    if http.given:
        key = http.given[0].partition("=")[0]
        raise UsageError(
            f"option {key}{'' if key in FLAG_KEYS else '='} applies only to remote archives (http://, "
            "https://, s3://, gs://, az://)"
        )
    return ArchiveFile(archive, say)
