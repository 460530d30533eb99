"""A bounded cache of fixed-size blocks over a slow positional source, shared by reader threads.

Owns which blocks are cached (LRU, bounded in bytes), which are on their way (so that two readers never
fetch the same block: the second waits for the first), coalescing the missing blocks of one read into one
fetch, and readahead for a sequential reader, fetched as several ranges at once by a few threads of its
own (`_Workers`). Knows nothing about HTTP: a `Fetch` streams one byte range.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from tarfuse.errors import ArchiveError, TruncatedArchive

if TYPE_CHECKING:
    from concurrent.futures import Future

Fetch = Callable[[int, int], Iterable[bytes]]  # (offset, size) -> chunks adding up to exactly size bytes
# (more is refused after the chunk that overshoots, so a faulty fetch cannot fill memory)

BLOCK_SIZE = 128 * 1024
MAX_FETCH = 16 * 1024 * 1024  # one request at most; a longer run of missing blocks takes several
READAHEAD_WINDOW = 32 * 1024 * 1024  # the most fetched ahead of a sequential reader, if the cache allows
READAHEAD_PIECE = 4 * 1024 * 1024  # one readahead request at most: a window is fetched as several at once
READAHEAD_STREAMS = 4  # readahead requests in flight at once, at most
_SEQUENTIAL_SLACK = 16  # blocks: concurrent readahead requests from the kernel arrive slightly out of order


class BlockCache:
    """A source's bytes, read by position, served from cached blocks; what is missing is fetched.

    Thread-safe: reads run concurrently; the lock is held only for bookkeeping, never during a fetch.

    Readahead is fetched in pieces of at most `readahead_piece` bytes (whole blocks), at most
    `readahead_streams` of them at once, each by a thread of its own: with a latency on every request,
    one request after another would wait for it once per piece. The pieces in flight add up to at most
    the readahead window, itself at most half the cache (a piece is cut smaller if the window is short),
    and the bytes a piece brings go into the cache block by block as they arrive: readahead holds no
    more than a block per piece outside the cache.
    """

    def __init__(
        self,
        fetch: Fetch,
        size: int,
        cache_bytes: int,
        readahead_bytes: int = READAHEAD_WINDOW,
        block_size: int = BLOCK_SIZE,
        readahead_piece: int = READAHEAD_PIECE,
        readahead_streams: int = READAHEAD_STREAMS,
        least_fetch: int = 0,
    ) -> None:
        """`least_fetch`: bytes a read that misses fetches at least, the blocks after it included (those
        not cached or on their way): a decompressor reads a chunk's compressed span in many small reads,
        which would each cost a request when the reader is cold."""
        self._fetch, self.size, self._block = fetch, size, block_size
        self._least_run = max(least_fetch // block_size, 1)
        self._cache_blocks = cache_bytes // block_size
        # Readahead beyond half the cache would evict itself before the reader gets there.
        self._max_window = max(min(readahead_bytes, cache_bytes // 2) // block_size, 0)
        self._max_run = max(MAX_FETCH // block_size, 1)
        self._max_piece = max(readahead_piece // block_size, 1)
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pending: dict[int, Future[bytes]] = {}
        self._readahead = _Workers(max(readahead_streams, 1), "tarfuse-readahead")
        self._last_block = -1 - _SEQUENTIAL_SLACK  # where the sequential reader got to
        self._run_start = 0  # where its run of forward reads began
        self._streak = 0
        self._frontier = -1  # last block already fetched, or on its way, ahead of the reader
        self.fetched_bytes = 0
        self.recorder: Callable[[int, int], None] | None = None  # hears every read's blocks (readlist.py)
        _LIVE.add(self)

    def prime(self, offset: int, data: bytes) -> None:
        """Cache the whole blocks in `data`, which holds the bytes at `offset` (block-aligned), fetched by
        the source itself (they count in `fetched_bytes`)."""
        with self._lock:
            self.fetched_bytes += len(data)
        for start in range(0, len(data), self._block):
            block, piece = (offset + start) // self._block, data[start : start + self._block]
            if len(piece) == self._block_length(block):
                with self._lock:
                    self._store(block, piece)

    def read_at(self, offset: int, size: int) -> bytes:
        """The `size` bytes at `offset`; short only at the end of the source."""
        buffer = bytearray(max(min(size, self.size - offset), 0))
        self.pread_into(memoryview(buffer), offset)
        return bytes(buffer)

    def pread_into(self, buffer: memoryview, offset: int) -> int:
        """Fill `buffer` from `offset`; short only at the end of the source."""
        end = min(offset + len(buffer), self.size)
        if end <= offset:
            return 0
        first, last = offset // self._block, (end - 1) // self._block
        done = 0
        for block, data in zip(range(first, last + 1), self._blocks(first, last), strict=True):
            start = max(offset - block * self._block, 0)
            piece = data[start : start + end - offset - done]
            buffer[done : done + len(piece)] = piece
            done += len(piece)
        return done

    @property
    def cache_bytes(self) -> int:
        return self._cache_blocks * self._block

    def resize(self, cache_bytes: int) -> None:
        """Keep at most `cache_bytes` of blocks, dropping the least recently used ones beyond."""
        with self._lock:
            self._cache_blocks = cache_bytes // self._block
            self._max_window = min(self._max_window, self._cache_blocks // 2)
            while len(self._cache) > max(self._cache_blocks, 0):
                self._cache.popitem(last=False)

    def close(self) -> None:
        """Drop the cache; readahead still on its way ends by itself (its threads are daemons)."""
        with self._lock:
            self._cache.clear()
        _LIVE.discard(self)

    def fetch_ahead(self, runs: Iterable[tuple[int, int]]) -> int:
        """Fetch these runs of blocks (first, count) ahead, in their order, as readahead: at most the
        readahead window in all, skipping what is cached or on its way; return the blocks fetched."""
        claimed: list[int] = []
        with self._lock:
            budget = self._max_window
            for first, count in runs:
                last = min(first + min(count, budget - len(claimed)), self._block_count()) - 1
                claimed += self._claim(range(first, last + 1))[1]
                if len(claimed) >= budget:
                    break
        if claimed:
            self._start_readahead(claimed)
        return len(claimed)

    def in_background(self, job: Callable[[], None]) -> None:
        """Run `job` on a readahead thread (waited for before a fork, as readahead is)."""
        self._readahead.submit(job)

    def _blocks(self, first: int, last: int) -> list[bytes]:
        if self.recorder is not None:
            self.recorder(first, last)
        for attempt in range(2):
            with self._lock:
                found, claimed = self._claim(range(first, last + 1))
                if claimed and self._least_run > 1:
                    wanted = self._least_run - len(claimed)  # new bytes: not those of the read cached
                    claimed += self._claim_after(last, wanted)
                    # Near the object's end, make it up before the read: a tar's last headers are there,
                    # and the chunks before its last one are what the next reads need.
                    beyond = last + wanted - (self._block_count() - 1)
                    if beyond > 0:
                        claimed = self._claim_before(first, beyond) + claimed
                ahead = self._note_read(first, last)
            if ahead:
                self._start_readahead(ahead)
            if claimed:
                self._fetch_runs(claimed)  # ours: its failure is ours to report
            try:
                return [item if isinstance(item, bytes) else item.result() for item in found]
            except Exception:  # another reader's fetch failed (readahead, mostly): fetch it ourselves once
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _claim(self, blocks: Iterable[int]) -> tuple[list[bytes | Future[bytes]], list[int]]:
        """Under the lock: each block as cached bytes or a future; claim (mark pending) the missing ones."""
        found: list[bytes | Future[bytes]] = []
        claimed = []
        for block in blocks:
            if (data := self._cache.get(block)) is not None:
                self._cache.move_to_end(block)
                found.append(data)
            elif (future := self._pending.get(block)) is not None:
                found.append(future)
            else:
                # Imported here, where an HTTP fetch follows: a mount imports concurrent.futures only then
                from concurrent.futures import Future

                self._pending[block] = future = Future()
                found.append(future)
                claimed.append(block)
        return found, claimed

    def _claim_after(self, last: int, count: int) -> list[int]:
        """Under the lock: claim up to `count` blocks after `last`, stopping at one cached or on its way."""
        claimed: list[int] = []
        for block in range(last + 1, min(last + count, self._block_count() - 1) + 1):
            if block in self._cache or block in self._pending:
                break
            claimed += self._claim((block,))[1]
        return claimed

    def _claim_before(self, first: int, count: int) -> list[int]:
        """Under the lock: claim up to `count` blocks before `first`, nearest first, stopping at one cached
        or on its way; in ascending order."""
        claimed: list[int] = []
        for block in range(first - 1, max(first - count, 0) - 1, -1):
            if block in self._cache or block in self._pending:
                break
            claimed += self._claim((block,))[1]
        return claimed[::-1]

    def _note_read(self, first: int, last: int) -> list[int]:
        """Under the lock: follow a sequential reader, and claim the blocks to fetch ahead of it.

        Two reads going forward make a sequential reader. The window is half the run read so far, up to the
        maximum: a decompressor reading a checkpoint's span or two gets little past them, a long run gets
        the full window (a window that started at 1 MiB and doubled fetched 2-3x what a .tar.gz read needed).
        Fetch when less than half a window is left. A read among the blocks already claimed ahead of the
        run stays in it: the kernel's readahead sends several reads at once, and one that arrives before
        those in front of it would otherwise start a new run, with the window back to nothing.
        """
        in_window = self._run_start <= first <= self._frontier
        if not in_window and abs(first - self._last_block) > _SEQUENTIAL_SLACK:
            self._last_block, self._run_start, self._streak, self._frontier = last, first, 0, last
            return []
        if last > self._last_block:
            self._last_block, self._streak = last, self._streak + 1
        window = min((last - self._run_start + 1) // 2, self._max_window)
        if self._streak < 2 or window <= 0 or self._frontier - last > window // 2:
            return []
        start = max(self._frontier, last) + 1
        stop = min(last + window, self._block_count() - 1)
        self._frontier = max(self._frontier, stop)
        return self._claim(range(start, stop + 1))[1]

    def _start_readahead(self, blocks: list[int]) -> None:
        """Queue the claimed blocks for the readahead threads, nearest first, in pieces."""
        with self._lock:  # pieces small enough that all the threads together fetch at most a window
            piece = max(min(self._max_piece, self._max_window // self._readahead.limit), 1)
        for run in _runs(blocks, piece):
            self._readahead.submit(functools.partial(self._read_ahead, run[0], len(run)))

    def _read_ahead(self, first: int, count: int) -> None:
        with contextlib.suppress(Exception):  # the futures carry it to any reader waiting for these blocks
            self._fetch_run(first, count)

    def _fetch_runs(self, blocks: list[int]) -> None:
        """Fetch claimed blocks, one request per run of adjacent blocks; fail the rest if one run fails."""
        runs = _runs(blocks, self._max_run)
        for index, run in enumerate(runs):
            try:
                self._fetch_run(run[0], len(run))
            except BaseException as exc:
                for later in runs[index + 1 :]:
                    self._fail(later, exc)
                raise

    def _fetch_run(self, first: int, count: int) -> None:
        offset = first * self._block
        length = min(count * self._block, self.size - offset)
        pending = bytearray()
        block, received = first, 0
        try:
            for chunk in self._fetch(offset, length):
                received += len(chunk)
                if received > length:  # what a fetch brings is held here: never more than was asked
                    raise ArchiveError(f"the source sent more than the {length} bytes asked", offset)
                pending += chunk
                while block < first + count and len(pending) >= (n := self._block_length(block)):
                    self._complete(block, bytes(pending[:n]))
                    del pending[:n]
                    block += 1
            if block < first + count:
                raise TruncatedArchive(f"the source sent {len(pending)} bytes short of block {block}")
        except BaseException as exc:
            self._fail(range(block, first + count), exc)
            raise

    def _complete(self, block: int, data: bytes) -> None:
        with self._lock:
            future = self._pending.pop(block)
            self._store(block, data)
            self.fetched_bytes += len(data)
        future.set_result(data)

    def _fail(self, blocks: Iterable[int], exc: BaseException) -> None:
        with self._lock:
            futures = [self._pending.pop(block) for block in blocks]
        for future in futures:
            future.set_exception(exc)

    def _store(self, block: int, data: bytes) -> None:
        """Under the lock: cache a block, dropping the least recently used ones beyond the budget."""
        if self._cache_blocks <= 0:
            return
        self._cache[block] = data
        self._cache.move_to_end(block)
        while len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)

    def _block_length(self, block: int) -> int:
        return min(self._block, self.size - block * self._block)

    def _block_count(self) -> int:
        return -(-self.size // self._block)

    def _quiesce(self) -> None:
        """Wait for readahead in flight: a thread that is fetching at fork() would leave its blocks
        pending forever in the child (the daemon forks after opening the archive)."""
        self._readahead.join()


def _runs(blocks: Iterable[int], longest: int) -> list[list[int]]:
    """Cut ascending block numbers into runs of adjacent ones, each at most `longest` blocks."""
    runs: list[list[int]] = []
    for block in blocks:
        if runs and block == runs[-1][-1] + 1 and len(runs[-1]) < longest:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


class _Workers:
    """Run jobs in the order queued on at most `limit` daemon threads, started when a job is queued and
    ended when none is left: no thread lingers between bursts, and `join` leaves none running."""

    def __init__(self, limit: int, name: str) -> None:
        self.limit, self._name = limit, name
        self._lock = threading.Lock()
        self._jobs: deque[Callable[[], None]] = deque()
        self._threads: set[threading.Thread] = set()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._jobs.append(job)
            if len(self._threads) >= self.limit:
                return  # a running thread takes it before it ends
            thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._threads.add(thread)
            thread.start()  # under the lock: `join` never finds a thread it cannot join yet

    def join(self) -> None:
        """Wait until no job is left, queued or running (one queued meanwhile is waited for too)."""
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return
            for thread in threads:
                thread.join()

    def _work(self) -> None:
        current = threading.current_thread()
        try:
            while (job := self._next(current)) is not None:
                job()
        finally:  # also if a job raised, which none should: `join` must not wait for a dead thread
            with self._lock:
                self._threads.discard(current)

    def _next(self, current: threading.Thread) -> Callable[[], None] | None:
        with self._lock:
            if self._jobs:
                return self._jobs.popleft()
            self._threads.discard(current)  # in the same hold: a job queued later starts a thread
            return None


_LIVE: weakref.WeakSet[BlockCache] = weakref.WeakSet()


def _quiesce_all() -> None:
    for reader in list(_LIVE):
        reader._quiesce()


os.register_at_fork(before=_quiesce_all)
