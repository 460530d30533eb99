"""Several processes serving one mount: worker processes forked after the FUSE INIT, and their reaping.

The kernel hands each request on /dev/fuse to exactly one reader and matches the reply by the request's
unique id, whoever writes it (libfuse's multi-threaded loop relies on this), so processes that share the
connection need nothing from each other. libfuse keeps the session's state, "INIT answered" included, in
each process: the fork comes after the INIT reply, from the process that wrote it, and never while trio
runs (each process starts its own trio; an epoll set shared across fork would wake the wrong process).

Roles. The main process (the command, or the daemon it detached) answers the INIT, forks workers 1..N
and then only watches them: it reaps them, logs one that dies, ends them at a stop signal, and unmounts
once none is left. The workers serve, each blocked in read(2) on the connection, where the kernel wakes
exactly one per request (eventloop.py, `shared`); had the main process served too, it would have had to
wait in poll for trio's sake, and poll wakes every waiter for every request. A worker serves until the
connection ends, a stop signal comes, or the main process dies (it asks the kernel for a SIGKILL then:
PR_SET_PDEATHSIG). Workers never unmount: only the main process does, so a group whose main process is
killed leaves a stale mount, as one process would.

A stop signal can be spent without effect. The worker's wait asks its flag, then libfuse's read(2) blocks;
a signal that comes in between is taken before the read starts (its handler may even run only after it),
and nothing interrupts that read until the next request. The kernel gives no read(2) that unblocks signals
atomically (as ppoll does for poll), and pyfuse3 takes EAGAIN from a non-blocking read as a fatal error.
So the main process repeats SIGTERM until the worker has ended (Group.stop): a repeat finds it blocked in
read (EINTR, then the wait sees the flag) or serving (it sees the flag at its next wait). The main
process's death is a SIGKILL, which no window can lose: a worker has nothing to clean up that the kernel
does not (the mount is stale then anyway). A stop signal sent by hand to one worker alone is not repeated:
that worker may wait for the next request before it ends.
"""

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 5.0  # how long a worker may take to finish its request after SIGTERM, before SIGKILL
RESIGNAL_S = 0.05  # how often Group.stop repeats SIGTERM to a worker that is still there
_REAP_POLL_S = 0.005


@dataclass
class Group:
    """The worker processes of one mount, numbered 1..size, seen from the main process."""

    size: int
    running: dict[int, int] = field(default_factory=dict)  # pid -> worker number
    last_died: bool = False  # the last worker to end died, with the mount still there: exit status 1

    def reap(self) -> list[tuple[int, int, int]]:
        """Collect the workers that have ended: (number, pid, wait status) each; never blocks."""
        ended = []
        for pid, number in list(self.running.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                del self.running[pid]
                ended.append((number, pid, status))
        return ended

    def stop(self) -> None:
        """End every worker: SIGTERM, repeated every RESIGNAL_S, then SIGKILL for one still there after
        STOP_GRACE_S; reap all.

        Repeated because a SIGTERM that comes between a worker's flag check and its read(2) is spent
        (module docstring); the next one finds the worker in read, or serving.
        """
        deadline = time.monotonic() + STOP_GRACE_S
        resignal_at = 0.0
        while self.running and (now := time.monotonic()) < deadline:
            if now >= resignal_at:
                for pid in self.running:
                    _signal(pid, signal.SIGTERM)
                resignal_at = now + RESIGNAL_S
            self.reap()
            time.sleep(_REAP_POLL_S)
        for pid, number in list(self.running.items()):
            log.warning(
                "worker %d (pid %d) did not stop within %.0f s: killing it", number, pid, STOP_GRACE_S
            )
            _signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.running.clear()


def how_it_ended(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def start(size: int, serve: Callable[[int], int], close_in_workers: tuple[int, ...] = ()) -> Group:
    """Fork workers 1..size; each runs `serve(number)` and exits with what it returns.

    Call with no trio running and no other thread. `close_in_workers`: descriptors only the main process
    may hold (the pipe that tells the command the mount is ready).
    """
    main = os.getpid()
    group = Group(size)
    for number in range(1, size + 1):
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            status = 1
            try:
                for fd in close_in_workers:
                    os.close(fd)
                status = serve(number) if _end_with_parent(main) else 0
            except BaseException as exc:  # a worker must reach os._exit, whatever happened
                log.error(
                    "worker %d: %s",
                    number,
                    exc or type(exc).__name__,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
            finally:
                logging.shutdown()
                os._exit(status)
        group.running[pid] = number
    return group


def stop_flag(signals: tuple[int, ...]) -> Callable[[], bool]:
    """Have `signals` set a flag instead of ending the process, let them through, and return the flag.

    A worker waits in read(2), outside trio: a signal interrupts that read (Python handlers do not
    restart system calls), its handler runs as soon as the loop is back in Python code, which is the
    wait, and the wait asks the flag (eventloop.install's `until`). One that comes after the wait asked
    and before the read blocks is spent: Group.stop repeats SIGTERM for that reason.
    """
    came: list[int] = []
    for signum in signals:
        signal.signal(signum, lambda number, _frame: came.append(number))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # the main process held them back at the fork
    return lambda: bool(came)


def set_title(role: str, command: str) -> None:
    """Show the process's role in ps and top: "tarfuse [worker 2/4] ARCHIVE MOUNTPOINT"."""
    import setproctitle  # only with several workers

    words = command.split(" ", 1)
    setproctitle.setproctitle(" ".join([words[0], f"[{role}]", *words[1:]]))


def _end_with_parent(main: int) -> bool:
    """Have the kernel SIGKILL us when the main process dies; False if it already has.

    SIGKILL, not a signal we handle: a handled one that comes just before read(2) blocks would be spent
    (module docstring), and the worker would outlive its main process until the next request.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    return os.getppid() == main


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended already: reap() collects it
        os.kill(pid, signum)
