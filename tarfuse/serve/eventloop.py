"""What pyfuse3's request loop sees as `trio`: trio, with a wait for the next request that we control.

pyfuse3 takes each request as: acquire a trio.Lock, trio.lowlevel.wait_readable(fd), read, handle, reply.
It looks these names up in its module attribute `trio`, which it lets a compatibility layer replace
(pyfuse3.asyncio does). `install` puts in trio with our wait, for two reasons:

- A hook that must run after the FUSE INIT reply and before any other request (fs.ImageFs.
  after_init_replied: the readahead) runs at the start of each wait: the reply is written by then.
- `direct`: the Lock's acquire and the wait are a trip through trio's scheduler and epoll each, even when
  requests are already queued. For a loop whose handlers never await (a plain archive) and that has no
  other work, the Lock does not yield when free and the wait first asks the kernel directly (poll(2),
  spinning up to SPIN_NS, then blocking up to IDLE_WAIT_MS). While it blocks in poll no other trio task
  runs, so it still yields to trio every YIELD_EVERY requests, and waits in trio once idle, so that
  signals are handled. Random and sequential reads both gained by about 2x (docs/benchmarks.md,
  "Levers, measured").
- `shared`: one of several processes reading the same connection (workers.py). poll wakes every process
  that waits in it for each request, and all but one then find nothing to read; a read(2) that blocks is
  an exclusive wait in the kernel, which wakes one reader per request. So the wait returns at once and
  libfuse's read blocks: no poll, no spin, no trip through trio. Signals interrupt that read (EINTR), and
  `until` is how they end the loop (workers.stop_flag).
"""

import select
import time
import types
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from tarfuse.serve import direct

IDLE_WAIT_MS = 5  # how long to wait for the next request outside trio (signals wait at most this)
YIELD_EVERY = 256  # requests in a row served without a trip through trio's scheduler
# How long the direct wait asks the kernel again and again (poll with no timeout) before it sleeps. A
# reader on another CPU sends its next request soon after our reply; sleeping in between costs a wake-up
# across CPUs each time, and spinning a little longer than that gap more than doubled random reads across
# CPUs. The price is at most this much CPU per request, none when idle: after it the wait sleeps in poll,
# then in trio. Figures: docs/benchmarks.md, "Figures behind the code".
SPIN_NS = 30_000


class _FreeLock:
    """trio.Lock, without the scheduling point on an uncontended acquire, and without its bookkeeping.

    The direct loop runs one task, so the lock is always free: trio.Lock's acquire_nowait and release
    (current_task, the parking lot) were a measurable part of a request (docs/benchmarks.md, "Figures
    behind the code"). A flag does it; a task that finds the lock held parks until it is released, as
    with trio.Lock.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiting = 0
        self._waiters = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            self._waiting += 1
            try:
                await self._waiters.park()
            finally:
                self._waiting -= 1
        self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        self._held = False
        if self._waiting:
            self._waiters.unpark()


class _Wait:
    """trio.lowlevel.wait_readable for the FUSE fd, after `before`; with `direct`, polling it ourselves."""

    def __init__(
        self,
        before: Callable[[], None],
        direct: bool,
        until: Callable[[], bool] | None,
        shared: bool = False,
    ) -> None:
        self._before = before
        self._direct = direct
        self._shared = shared
        self._until = until
        self._poll: Any = None  # made on the first call, when the fd is known
        self._streak = 0
        self._answered = 0  # direct.answered() at the last wait

    async def __call__(self, fd: int) -> None:
        self._before()
        if self._until is not None and self._until():
            raise trio.ClosedResourceError("done")  # pyfuse3's loop takes this as "stop", and returns
        if self._shared:
            return  # libfuse's read(2) waits, with the kernel's exclusive wake-up
        if self._direct:
            if self._poll is None:
                self._poll = select.poll()
                self._poll.register(fd, select.POLLIN)
            # pyfuse3's C read path answers the requests already queued after one it answered, between
            # two waits: those count too, or trio would run once in YIELD_EVERY batches
            answered = direct.answered()
            served, self._answered = max(answered - self._answered, 1), answered
            if self._streak < YIELD_EVERY and self._readable():  # also on POLLERR: unmounted
                self._streak += served
                return
        self._streak = 0
        await trio.lowlevel.wait_readable(fd)

    def _readable(self) -> bool:
        """Whether a request came: at once, within SPIN_NS of asking again, or within IDLE_WAIT_MS."""
        poll = self._poll.poll
        if poll(0):
            return True
        clock = time.perf_counter_ns
        deadline = clock() + SPIN_NS
        while clock() < deadline:
            if poll(0):
                return True
        return bool(poll(IDLE_WAIT_MS))


def install(
    before_wait: Callable[[], None],
    direct: bool,
    until: Callable[[], bool] | None = None,
    shared: bool = False,
) -> None:
    """Make pyfuse3 wait for requests through _Wait; call before pyfuse3.main().

    With `until`, pyfuse3.main() returns at the first wait at which it is true, leaving the session as it
    is (not exited): the daemon serves the FUSE INIT alone this way, then forks its workers, which wait
    `shared` (and `direct`: their handlers never await either).
    """
    lowlevel = types.SimpleNamespace(**vars(trio.lowlevel))
    lowlevel.wait_readable = _Wait(before_wait, direct, until, shared)
    facade = types.SimpleNamespace(**vars(trio))
    facade.lowlevel = lowlevel
    if direct:
        facade.Lock = _FreeLock
    pyfuse3.trio = facade  # type: ignore[attr-defined]  # the hook pyfuse3.asyncio.enable() uses


def uninstall() -> None:
    pyfuse3.trio = trio  # type: ignore[attr-defined]
