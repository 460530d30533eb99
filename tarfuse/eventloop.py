"""What pyfuse3's request loop sees as `trio` when every handler runs to completion: trio, minus two waits.

pyfuse3 takes each request as: acquire a trio.Lock, trio.lowlevel.wait_readable(fd), read, handle, reply.
The Lock's acquire and the wait are a trip through trio's scheduler and epoll each, even when requests are
already queued: with 4 readers, most of a request's time went there. pyfuse3 looks these names up in its
module attribute `trio`, which it lets a compatibility layer replace (pyfuse3.asyncio does); `install`
puts in trio with a Lock that does not yield when free and a wait that first asks the kernel directly
(poll(2), blocking up to IDLE_WAIT_MS) before falling back to trio's wait. Measured with fio, 4 KiB
random reads, 4 readers: ~34k/s -> ~60k/s (docs/benchmarks.md).

Only for a loop whose handlers never await (a plain archive, fs.ServedFile.blocking False) and that has no
other work: while it blocks in poll, no other trio task runs. So it still yields to trio every
YIELD_EVERY requests, and waits in trio once idle for IDLE_WAIT_MS, so that signals are handled.
"""

import select
import types
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

IDLE_WAIT_MS = 5  # how long to wait for the next request outside trio (signals wait at most this)
YIELD_EVERY = 256  # requests in a row served without a trip through trio's scheduler


class _FreeLock:
    """trio.Lock, without the scheduling point on an uncontended acquire."""

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        if self._lock.locked():
            await self._lock.acquire()
        else:
            self._lock.acquire_nowait()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()


class _DirectWait:
    """wait_readable that polls the FUSE fd itself while requests keep coming."""

    def __init__(self, settled: Callable[[], bool]) -> None:
        self._poll: Any = None
        self._streak = 0
        # Until `settled`, every wait goes through trio: what ImageFs.init deferred with run_sync_soon (the
        # readahead, which INIT's reply resets) must run before requests are served outside trio; a file
        # opened before it would keep the 128 KiB default readahead (0.6 GB/s instead of 1.5).
        self._settled = settled

    async def __call__(self, fd: int) -> None:
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
        if self._settled() and self._streak < YIELD_EVERY and self._poll.poll(IDLE_WAIT_MS):  # or POLLERR
            self._streak += 1
            return
        self._streak = 0
        await trio.lowlevel.wait_readable(fd)


def install(settled: Callable[[], bool]) -> None:
    """Make pyfuse3 use the direct waits once `settled()`; call before pyfuse3.main()."""
    lowlevel = types.SimpleNamespace(**vars(trio.lowlevel))
    lowlevel.wait_readable = _DirectWait(settled)
    facade = types.SimpleNamespace(**vars(trio))
    facade.lowlevel = lowlevel
    facade.Lock = _FreeLock
    pyfuse3.trio = facade  # type: ignore[attr-defined]  # the hook pyfuse3.asyncio.enable() uses


def uninstall() -> None:
    pyfuse3.trio = trio  # type: ignore[attr-defined]
