"""Readahead of a remote archive as several ranges in flight (blockcache.py).

Through a real mount: a sequential reader reads up to a little before a point of the object past which the
server holds its answers back (kit.httpserver, `hold`): the readahead's requests past it then wait at the
server, where they can be counted, until the test releases them. The reader reads with readahead off
(POSIX_FADV_RANDOM): one read at a time, so every other request in flight is the daemon's readahead.
In-process, a fetch that holds readahead pieces back until the test says so shows what happens to the
blocks of a piece that fails while a reader waits for them.
"""

import contextlib
import os
import random
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kit.httpserver import RangeServer
from kit.mounts import Mount, MountFactory
from kit.tarbuilder import archive, file_member

from tarfuse.errors import ArchiveError
from tarfuse.sources.blockcache import READAHEAD_PIECE, READAHEAD_STREAMS, BlockCache

pytestmark = pytest.mark.usefixtures("no_proxy_from_outside")

MiB = 1 << 20
IMAGE_SIZE = 96 * MiB
HELD_FROM = 72 * MiB  # an archive offset, block-aligned; the reader stops short of it by READ_MARGIN
READ_MARGIN = 2 * MiB
LATENCY_S = 0.01  # before every answer: a server some way off
DATA_OFFSET = 512  # of the image in the archive: one ustar header
WAIT_S = 60.0  # for what a sound daemon does at once; only a broken one makes a test wait this long

DiskOpener = Callable[..., tuple[int, Mount]]


@pytest.fixture(scope="module")
def image() -> bytes:
    return random.Random(11).randbytes(IMAGE_SIZE)


@pytest.fixture
def open_disk(server: RangeServer, image: bytes, mount: MountFactory, tmp_path: Path) -> Iterator[DiskOpener]:
    """Return `open_disk(*options) -> (fd, mount)`: the image mounted over the server (answers past
    HELD_FROM held back, LATENCY_S before each) with `-o options`, open with readahead off."""
    with contextlib.ExitStack() as stack:

        def start(*options: str) -> tuple[int, Mount]:
            url = server.put("vm.tar", archive(file_member("disk.raw", image)))
            (mnt := tmp_path / "mnt").mkdir()
            mounted = mount(url, mnt, "-o", ",".join(["cache_size=64M", *options]))
            server.hold("vm.tar", HELD_FROM)  # after the mount, which reads the headers past it
            stack.callback(server.release, "vm.tar")  # a held answer must not hold the unmount back
            server.faults.slow, server.faults.delay = -1, LATENCY_S
            fd = os.open(mnt / "disk.raw", os.O_RDONLY)
            stack.callback(os.close, fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return fd, mounted

        yield start


def read_and_compare(fd: int, image: bytes, start: int, end: int) -> None:
    """Read the image from `start` to `end` in 1 MiB reads, one after another; each must match."""
    for offset in range(start, end, MiB):
        size = min(MiB, end - offset)
        assert os.pread(fd, size, offset) == image[offset : offset + size], f"at {offset}"


def read_up_to_the_held_part(server: RangeServer, fd: int, image: bytes) -> int:
    """Read sequentially until a little before the held answers, then wait until all the readahead
    threads wait for theirs; return where the reader stopped."""
    stop = HELD_FROM - DATA_OFFSET - READ_MARGIN
    server.reset_counters()
    read_and_compare(fd, image, 0, stop)
    assert server.wait_for_active(READAHEAD_STREAMS, WAIT_S), (
        f"at most {server.max_active} requests at once while the readahead waited for held answers"
    )
    return stop


def asked_lengths(server: RangeServer) -> list[int]:
    """How many bytes each request since the counters were reset asked for."""
    ranges = (re.fullmatch(r"bytes=(\d+)-(\d+)", r.headers.get("Range", "")) for r in server.requests)
    return [int(match[2]) - int(match[1]) + 1 for match in ranges if match]


@pytest.mark.fuse
def test_sequential_read_has_several_requests_in_flight(
    server: RangeServer, open_disk: DiskOpener, image: bytes
) -> None:
    fd, _ = open_disk()
    stop = read_up_to_the_held_part(server, fd, image)  # asserts READAHEAD_STREAMS requests at once
    server.release("vm.tar")
    read_and_compare(fd, image, stop, IMAGE_SIZE)


@pytest.mark.fuse
def test_requests_in_flight_stay_within_the_bound(
    server: RangeServer, open_disk: DiskOpener, image: bytes
) -> None:
    # Claimed past the held point: more pieces than threads, so the bound is what holds the rest back.
    fd, _ = open_disk()
    stop = read_up_to_the_held_part(server, fd, image)
    server.release("vm.tar")
    read_and_compare(fd, image, stop, IMAGE_SIZE)
    assert server.max_active <= READAHEAD_STREAMS + 1  # the reader's own request, besides readahead
    assert max(asked_lengths(server)) <= READAHEAD_PIECE  # a reader's own: one read, at most 1 MiB


@pytest.mark.fuse
def test_a_failed_piece_does_not_fail_a_mounted_read(
    server: RangeServer, open_disk: DiskOpener, image: bytes
) -> None:
    # With retries=0 a 503 fails its request. The next request is a queued readahead piece's (the held
    # ones are in already, and the reader's next reads are of claimed blocks): its blocks fail, and the
    # reader, finding them missing, fetches them itself.
    fd, mounted = open_disk("retries=0")
    stop = read_up_to_the_held_part(server, fd, image)
    server.faults.error = 1
    server.release("vm.tar")
    read_and_compare(fd, image, stop, IMAGE_SIZE)
    assert server.faults.error == 0  # the 503 was answered
    assert "HTTP 503" not in mounted.stderr_text()  # and no read failed for it
    server.wait_until_every_request_handled(WAIT_S)
    object_size = len(archive(file_member("disk.raw", image)))
    assert server.bytes_served <= object_size  # nothing fetched twice


# --- in-process: a fetch whose readahead pieces wait for the test -------------------------------------

B = 4096  # the block size of these caches: small, so that a window is many blocks of little data
BLOCKS = 64
GATED_FROM = 32  # readahead requests that start at this block or later wait for `GatedSource.gate`


class GatedSource:
    """A fetch over `data` that records every request; readahead requests from block GATED_FROM on wait
    until `gate` is set, and then fail if they start at a block in `failing`. The reader's own first
    request past GATED_FROM sets `gate` (its claim of what it waits for is made by then)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.requests: list[tuple[str, int, int]] = []  # (thread name, first block, blocks)
        self.changed = threading.Condition()
        self.gate = threading.Event()
        self.failing: set[int] = set()

    def fetch(self, offset: int, size: int) -> Iterator[bytes]:
        thread = threading.current_thread().name
        with self.changed:
            self.requests.append((thread, offset // B, -(-size // B)))
            self.changed.notify_all()
        if offset >= GATED_FROM * B:
            if thread.startswith("tarfuse-readahead"):
                self.gate.wait(WAIT_S)
                if offset // B in self.failing:
                    raise ArchiveError("a piece that fails", offset)
            else:
                self.gate.set()
        yield self.data[offset : offset + size]

    def gated(self) -> list[int]:
        """The first blocks of the readahead requests waiting at the gate."""
        with self.changed:
            ahead = [first for name, first, _ in self.requests if name.startswith("tarfuse-readahead")]
        return sorted(first for first in ahead if first >= GATED_FROM)

    def coverage(self) -> Counter[int]:
        """How many requests asked for each block."""
        with self.changed:
            return Counter(
                block for _, first, count in self.requests for block in range(first, first + count)
            )


def gated_cache(source: GatedSource) -> BlockCache:
    cache = BlockCache(
        source.fetch, BLOCKS * B, cache_bytes=BLOCKS * B, readahead_bytes=16 * B, block_size=B,
        readahead_piece=4 * B, readahead_streams=4,
    )  # fmt: skip
    for block in range(GATED_FROM):  # a sequential reader, up to the gate
        assert cache.read_at(block * B, B) == source.data[block * B : (block + 1) * B]
    with source.changed:
        assert source.changed.wait_for(lambda: len(source.gated()) >= 2, WAIT_S), source.requests
    return cache


def in_thread(function: Callable[[], object]) -> object:
    """Run `function` in a thread; its result, or its exception raised here. A deadlock guard: a thread
    still waiting after WAIT_S is a test failure, not a hung test."""
    outcome: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(function())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAIT_S)
    assert not thread.is_alive(), "still waiting: a block's future was never completed"
    if errors:
        raise errors[0]
    return outcome[0]


def test_a_failed_piece_fails_only_its_blocks_and_its_reader_fetches_them_once() -> None:
    source = GatedSource(random.Random(5).randbytes(BLOCKS * B))
    cache = gated_cache(source)
    failed = source.gated()[0]
    source.failing.add(failed)
    # One read from the failing piece to the end: it waits for the gated pieces' blocks, and fetches the
    # unclaimed ones past them itself, which lets the gated pieces go.
    start = failed * B
    assert in_thread(lambda: cache.read_at(start, BLOCKS * B - start)) == source.data[start:]
    coverage = source.coverage()
    ahead = [(first, count) for name, first, count in source.requests if name != "MainThread"]
    piece = {block for first, count in ahead if first == failed for block in range(first, first + count)}
    assert {block for block, asked in coverage.items() if asked > 1} == piece  # the others: once
    assert all(coverage[block] == 2 for block in piece)  # failed once, then the reader's own request
    assert cache.fetched_bytes == BLOCKS * B  # the failed piece brought nothing


def test_quiesce_waits_for_every_readahead_piece() -> None:
    source = GatedSource(random.Random(6).randbytes(BLOCKS * B))
    cache = gated_cache(source)
    finished: list[int] = []

    def quiesce() -> None:
        cache._quiesce()
        finished.append(len(cache._pending))  # what readahead still had on its way when it returned

    waiter = threading.Thread(target=quiesce, daemon=True)
    waiter.start()
    source.gate.set()
    waiter.join(WAIT_S)
    assert finished == [0]


def test_a_cold_read_fetches_at_least_least_fetch_in_one_request_up_to_a_cached_block() -> None:
    """A compressed archive's decoder reads a chunk's span in small reads: the first one that misses
    fetches `least_fetch` bytes at once (http/archive.py sets it under a compressed stream), never a
    block that is already cached, and never past the end: near the end, the blocks before the read make
    it up (a tar's last headers are read there, and the chunk before the last one next)."""
    block = 128 * 1024
    data = random.Random(12).randbytes(40 * block + 100)
    asked: list[tuple[int, int]] = []

    def fetch(offset: int, size: int) -> Iterator[bytes]:
        asked.append((offset, size))
        yield data[offset : offset + size]

    cache = BlockCache(fetch, len(data), cache_bytes=64 * block, readahead_bytes=0, least_fetch=8 * block)
    assert cache.read_at(2 * block + 5, 100) == data[2 * block + 5 : 2 * block + 105]
    assert asked == [(2 * block, 8 * block)]  # the block read and the seven after it
    for offset in range(2 * block, 10 * block, 4096):  # the decoder's small reads: all cached now
        assert cache.read_at(offset, 4096) == data[offset : offset + 4096]
    assert len(asked) == 1
    cache.prime(16 * block, data[16 * block : 17 * block])
    asked.clear()
    assert cache.read_at(13 * block, 10) == data[13 * block : 13 * block + 10]
    assert asked == [(13 * block, 3 * block)]  # up to the cached block 16, not over it
    asked.clear()
    assert cache.read_at(38 * block, 10) == data[38 * block : 38 * block + 10]
    assert asked == [(33 * block, 7 * block + 100)]  # up to the end, and the five blocks before the read
    asked.clear()
    assert cache.read_at(31 * block, 10) == data[31 * block : 31 * block + 10]
    assert asked == [(31 * block, 2 * block)]  # up to the cached block 33
    cache.prime(24 * block, data[24 * block : 25 * block])
    asked.clear()
    assert cache.read_at(26 * block, 10) == data[26 * block : 26 * block + 10]
    assert asked == [(26 * block, 5 * block)]  # not near the end: only after it
    plain = BlockCache(fetch, len(data), cache_bytes=64 * block, readahead_bytes=0)
    asked.clear()
    assert plain.read_at(2 * block, 10) == data[2 * block : 2 * block + 10]
    assert asked == [(2 * block, block)]  # without it, only the block read
