"""A read list: the blocks of a remote archive that a mount's readers asked for, in the order first asked.

A mount records one with -o record_reads=PATH (written at unmount), typically while a guest boots; the
admin publishes it beside the object as `<object>.tarfuse-reads`. A later cold mount of an object URL
(s3://, gs://, az://: a fleet's; an http(s) server is not asked, which would cost every mount a request)
that finds it there fetches those blocks ahead, on blockcache's readahead threads, off the path to the first
read, several requests at once: a boot then waits for a few round trips rather than one per read.

The file is JSON: the object's size and ETag (a list for another object or version is not used), the
block size, and runs of blocks [first, count] in the order they were first read. Read from a server, it is
someone else's input: at most LIST_MAX bytes and MAX_RUNS runs, every run inside the object, and what is
fetched ahead is bounded by the block cache's readahead window (half the cache), so a list can cost
requests but never memory or wrong bytes: prefetched blocks go through the same checks as any other.
"""

from __future__ import annotations

import json
import threading

SUFFIX = ".tarfuse-reads"
LIST_MAX = 1024 * 1024  # bytes of a published list read at most
MAX_RUNS = 16384  # runs kept when recording, and accepted when reading
# Blocks kept when recording (8 GiB of 128 KiB blocks), then it stops: a mount fetches ahead at most its
# readahead window of a list, and the set of blocks seen, a few dozen bytes each, must stay bounded
# whatever is read while recording.
MAX_BLOCKS = 65536
_MAGIC = "tarfuse-reads 1"


class Recorder:
    """The blocks read so far, first use first, as runs; at most MAX_RUNS runs and MAX_BLOCKS blocks
    (then it stops)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[int] = set()
        self._runs: list[list[int]] = []  # [first, count]

    def saw(self, first: int, last: int) -> None:
        with self._lock:
            for block in range(first, last + 1):
                if block in self._seen:
                    continue
                if len(self._seen) >= MAX_BLOCKS or len(self._runs) >= MAX_RUNS:
                    return  # full: what a mount could fetch ahead of it is recorded
                self._seen.add(block)
                if self._runs and self._runs[-1][0] + self._runs[-1][1] == block:
                    self._runs[-1][1] += 1
                else:
                    self._runs.append([block, 1])

    def encode(self, size: int, etag: str | None, block_size: int) -> bytes:
        with self._lock:
            runs = [list(run) for run in self._runs]
        return json.dumps(
            {"format": _MAGIC, "size": size, "etag": etag, "block": block_size, "runs": runs}
        ).encode()


class Unfit(Exception):
    """A published list that is not this object's, or not a list at all; the message says why."""


def parse(data: bytes, size: int, etag: str | None, block_size: int) -> list[tuple[int, int]]:
    """The runs (first block, count) of a list read from a server; raise Unfit if it cannot be used."""
    try:
        found = json.loads(data)
    except ValueError:
        raise Unfit("not JSON") from None
    if not isinstance(found, dict) or found.get("format") != _MAGIC:
        raise Unfit("not a tarfuse read list")
    if found.get("size") != size or (etag is not None and found.get("etag") != etag):
        raise Unfit("it is the list of another object, or another version of it")
    if found.get("block") != block_size:
        raise Unfit("it counts in blocks of another size")
    runs = found.get("runs")
    if not isinstance(runs, list) or len(runs) > MAX_RUNS:
        raise Unfit(f"its runs are not a list of at most {MAX_RUNS}")
    blocks = -(-size // block_size)
    checked = []
    for run in runs:
        if (
            not isinstance(run, list)
            or len(run) != 2
            or not all(type(n) is int for n in run)
            or run[0] < 0
            or run[1] < 1
            or run[0] + run[1] > blocks
        ):
            raise Unfit("a run is not inside the object")
        checked.append((run[0], run[1]))
    return checked
