"""serve/eventloop.py: the request wait and the lock it gives pyfuse3, and that pyfuse3 still takes them.

eventloop replaces pyfuse3's module attribute `trio`, an internal hook (pyfuse3.asyncio uses it); if a pyfuse3
release stopped reading it, tarfuse would silently lose its readahead hook and its fast loop. The last test
runs a real mount and fails loudly then.
"""

import os
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tarfuse.serve import eventloop


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    os.close(read_fd)
    os.close(write_fd)


async def test_a_free_lock_is_taken_without_a_checkpoint() -> None:
    lock = eventloop._FreeLock()
    with trio.CancelScope() as scope:
        scope.cancel()  # any checkpoint inside would raise Cancelled now
        async with lock:
            taken = True
    assert taken
    assert not scope.cancelled_caught


async def test_a_held_lock_makes_the_next_taker_wait() -> None:
    lock = eventloop._FreeLock()
    order = []

    async def second() -> None:
        async with lock:
            order.append("second")

    async with trio.open_nursery() as nursery, lock:
        nursery.start_soon(second)
        await trio.sleep(0.01)
        order.append("first")
    assert order == ["first", "second"]


async def test_the_direct_wait_returns_at_once_while_requests_are_queued(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    calls = []
    wait = eventloop._Wait(lambda: calls.append(1), direct=True, until=None)
    os.write(write_fd, b"x")
    with trio.CancelScope() as scope:
        scope.cancel()  # the direct path must not go through trio while the fd is readable
        for _ in range(10):
            await wait(read_fd)
    assert not scope.cancelled_caught
    assert len(calls) == 10  # the hook runs before every wait


async def test_the_direct_wait_yields_to_trio_every_so_many_requests(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    wait = eventloop._Wait(lambda: None, direct=True, until=None)
    os.write(write_fd, b"x")
    for _ in range(eventloop.YIELD_EVERY):
        await wait(read_fd)
    with trio.CancelScope() as scope:
        scope.cancel()
        await wait(read_fd)  # the streak is full: this one is a trip through trio (a checkpoint)
    assert scope.cancelled_caught


async def test_reads_answered_in_c_between_two_waits_count_toward_the_yield(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyfuse3's C read path answers the queued requests after one it answered without a wait between:
    a wait that follows 64 of them counts 64, so trio still runs every YIELD_EVERY requests."""
    read_fd, write_fd = pipe
    answered = iter(range(0, 1 << 30, 64))
    monkeypatch.setattr(eventloop.direct, "answered", lambda: next(answered))
    wait = eventloop._Wait(lambda: None, direct=True, until=None)
    os.write(write_fd, b"x")
    for _ in range(eventloop.YIELD_EVERY // 64 + 1):
        await wait(read_fd)
    with trio.CancelScope() as scope:
        scope.cancel()
        await wait(read_fd)
    assert scope.cancelled_caught


async def test_a_shared_wait_leaves_the_waiting_to_the_read_and_stops_when_told(
    pipe: tuple[int, int],
) -> None:
    """A worker of a group: nothing to read, and still no poll and no trip through trio (read(2) will
    block, with the kernel's exclusive wake-up); `until` (its stop flag) ends the loop."""
    read_fd, _ = pipe
    stop = False
    wait = eventloop._Wait(lambda: None, direct=True, until=lambda: stop, shared=True)
    with trio.CancelScope() as scope:
        scope.cancel()
        for _ in range(eventloop.YIELD_EVERY + 10):
            await wait(read_fd)
    assert not scope.cancelled_caught
    stop = True
    with pytest.raises(trio.ClosedResourceError):
        await wait(read_fd)


async def test_an_idle_direct_wait_waits_in_trio_so_other_tasks_run(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    wait = eventloop._Wait(lambda: None, direct=True, until=None)

    async def request_later() -> None:
        await trio.sleep(0.05)  # runs only if the wait below lets trio schedule it
        os.write(write_fd, b"x")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request_later)
        with trio.fail_after(5):
            await wait(read_fd)


_PROBE = textwrap.dedent(
    """
    import os, sys, threading
    import pyfuse3, trio
    from tarfuse.serve import eventloop

    waits = []

    async def run(mountpoint):
        eventloop.install(lambda: waits.append(1), direct=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            await trio.to_thread.run_sync(os.path.exists, mountpoint)  # any answer will do
            pyfuse3.terminate()
        eventloop.uninstall()

    pyfuse3.init(pyfuse3.Operations(), sys.argv[1], {"fsname=eventloop-probe"})
    try:
        trio.run(run, sys.argv[1])
    finally:
        pyfuse3.close(unmount=True)
    print(len(waits))
    """
)


@pytest.mark.fuse
def test_pyfuse3_still_waits_for_requests_through_the_installed_facade(tmp_path: Path) -> None:
    (mountpoint := tmp_path / "mnt").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(mountpoint)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0, (
        "pyfuse3 no longer reads its module attribute `trio`: tarfuse.serve.eventloop has no effect "
        "(no readahead hook, no direct loop); see the pin in pyproject.toml"
    )


async def test_the_direct_wait_spins_briefly_then_sleeps_while_idle(pipe: tuple[int, int]) -> None:
    read_fd, _ = pipe
    wait = eventloop._Wait(lambda: None, direct=True, until=None)
    wait._poll = select.poll()
    wait._poll.register(read_fd, select.POLLIN)
    started_cpu, started = time.process_time(), time.monotonic()
    assert not wait._readable()  # nothing comes: the spin, then IDLE_WAIT_MS asleep
    elapsed_cpu, elapsed = time.process_time() - started_cpu, time.monotonic() - started
    assert elapsed >= eventloop.IDLE_WAIT_MS / 1000
    assert elapsed_cpu < elapsed / 2  # most of the wait slept: the spin is bounded
