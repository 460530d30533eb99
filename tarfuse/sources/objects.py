"""Archives in object storage: s3://BUCKET/KEY, gs://BUCKET/KEY and az://CONTAINER/KEY.

An object is read as an https:// archive is (http/archive.py: ranged GETs, the object bound to its size
and ETag, bounded answers, deadlines, retries), through presigned GET URLs. The signatures come from a
helper process (signer.py) that this process starts for itself, so that obstore, which makes the
signatures from each cloud's standard credential chain, never runs in a process that forks: the daemon
forks to detach and for its workers, and obstore's runtime does not survive that. A URL is signed for
an hour and signed again before it runs out, or at once when the store answers 401 or 403 (temporary
credentials expire before the URL does); credentials that stay refused fail the read, with one line.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from tarfuse.errors import RemoteError, UsageError
from tarfuse.sources import DEFAULT_CACHE_SIZE
from tarfuse.sources.http.archive import RemoteArchive
from tarfuse.sources.http.options import NO_HTTP_OPTIONS, RemoteOptions

SCHEMES = {"s3": "S3", "gs": "Google Cloud Storage", "az": "Azure Blob Storage"}
URL_LIFETIME = 3600  # seconds a presigned URL is asked to last
_RESIGN_MARGIN = 600  # seconds before it runs out that a URL is signed again
_ANSWER_TIMEOUTS = 3  # the helper must answer within this many times timeout= (a metadata server may be slow)


@dataclass(frozen=True, slots=True)
class ObjectUrl:
    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"


def parse(archive: str) -> ObjectUrl:
    """Split `s3://BUCKET/KEY` (gs://, az://CONTAINER/KEY); UsageError if a part is missing."""
    scheme, _, rest = archive.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket or not key or key.endswith("/") or "?" in rest or "#" in rest:
        raise UsageError(f"{archive!r}: an object URL is {scheme.lower()}://BUCKET/KEY, naming one object")
    return ObjectUrl(scheme.lower(), bucket, key)


def open_object(
    archive: str, options: RemoteOptions = NO_HTTP_OPTIONS, cache_size: int = DEFAULT_CACHE_SIZE
) -> RemoteArchive:
    """The object as a RemoteArchive that reads through presigned URLs (signed again as they age)."""
    where = parse(archive)
    signed = SignedObject(Signer(where, options), where.key)
    try:
        return RemoteArchive(signed.url(), options, cache_size, name=str(where), signed=signed)
    except BaseException:
        signed.close()
        raise


@dataclass(frozen=True, slots=True)
class SignedObject:
    """One key of a bucket, as http/archive.py asks for it: a URL to read it by, signed again on demand."""

    signer: Signer
    key: str

    def url(self, fresh: bool = False) -> str:
        return self.signer.url(self.key, fresh)

    def beside(self, suffix: str) -> str:
        """A URL for the object published beside this one, `<key><suffix>` (a published index)."""
        return self.signer.url(self.key + suffix)

    def close(self) -> None:
        self.signer.close()


class Signer:
    """Presigned GET URLs for the keys of one bucket, from a helper process of this process's own.

    Thread-safe (the readers of a remote archive run in threads). After a fork, the child forgets the
    parent's helper (it closes its copies of the pipes, so that the helper ends with the parent) and starts
    its own on the first URL it needs.
    """

    def __init__(self, where: ObjectUrl, options: RemoteOptions) -> None:
        self._where, self._options = where, options
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._urls: dict[str, tuple[str, float | None]] = {}  # key -> (URL, when it runs out)
        _LIVE.add(self)

    def url(self, key: str, fresh: bool = False) -> str:
        """A URL that reads `key` for at least a few more minutes; `fresh`: signed now, whatever is kept."""
        with self._lock:
            kept = self._urls.get(key)
            if kept is not None and not fresh and (kept[1] is None or kept[1] - time.time() > _RESIGN_MARGIN):
                return kept[0]
            answer = self._ask({"key": key, "seconds": URL_LIFETIME})
            if "error" in answer:
                raise RemoteError(
                    f"{self._name(key)}: cannot sign a request: {answer['error']}{self._hint()}"
                )
            url, expires = str(answer["url"]), answer["expires"]
            self._urls[key] = (url, float(expires) if isinstance(expires, int | float) else None)
            return url

    def close(self) -> None:
        with self._lock:
            self._stop()

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's helper without stopping it (the parent still uses it)."""
        self._lock = threading.Lock()  # another thread may have held the parent's at fork()
        process, self._process = self._process, None
        if process is not None:
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()  # the child's copy only (each request is flushed: nothing is pending)

    def _ask(self, request: dict[str, object]) -> dict[str, object]:
        """Send one request to the helper (started if need be) and wait for its answer, within a deadline."""
        if self._process is None or self._process.poll() is not None:
            self._start()
        process = self._process
        assert process is not None
        assert process.stdin is not None
        assert process.stdout is not None
        limit = self._options.timeout * _ANSWER_TIMEOUTS
        ready: list[Any] = []
        try:
            process.stdin.write(json.dumps(request).encode() + b"\n")
            process.stdin.flush()
            ready, _, _ = select.select([process.stdout], [], [], limit)
            line = process.stdout.readline() if ready else b""
        except OSError:
            line = b""
        if not line:
            self._stop()
            what = f"no answer within {limit:g} s" if not ready else "it ended"
            raise RemoteError(f"{self._name(request['key'])}: the signing helper failed ({what})")
        answer: dict[str, object] = json.loads(line)
        return answer

    def _start(self) -> None:
        self._stop()
        # -I: not the current directory, nor PYTHON* variables, on the helper's import path; a mount
        # started by root in a directory that others control must not import what they put there.
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-m", "tarfuse.sources.signer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        config = {
            "scheme": self._where.scheme,
            "bucket": self._where.bucket,
            "endpoint": self._options.endpoint,
            "region": self._options.region,
            "anonymous": self._options.anonymous,
            "timeout": self._options.timeout,
        }
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(config).encode() + b"\n")
        self._process.stdin.flush()

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _name(self, key: object) -> str:
        return f"{self._where.scheme}://{self._where.bucket}/{quote(str(key), safe='/')}"

    def _hint(self) -> str:
        if self._options.anonymous:
            return ""
        cloud = SCHEMES[self._where.scheme]
        return f" (credentials for {cloud}: see docs/remote.md; -o anonymous for a public object)"


_LIVE: weakref.WeakSet[Signer] = weakref.WeakSet()


def _forget_all() -> None:
    for signer in list(_LIVE):
        signer.forget_after_fork()


os.register_at_fork(after_in_child=_forget_all)
