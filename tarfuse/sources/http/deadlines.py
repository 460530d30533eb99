"""A deadline on every HTTP request, whole: connecting, the headers and the body.

Socket timeouts bound each wait for bytes, never a whole request: a server that drips a byte just before
each timeout would hold a read forever. One watchdog thread shuts down the socket of every request past its
deadline; the connection pools of pools.py hand it their socket before they read an answer.
"""

import contextlib
import math
import os
import socket
import threading
import time


class Deadline:
    """When one request must be over, and its socket, to shut down then (known once it is connected)."""

    __slots__ = ("expired", "sock", "when")

    def __init__(self, when: float) -> None:
        self.when = when
        self.sock: socket.socket | None = None
        self.expired = False


class _Watchdog:
    """One thread that shuts down the socket of every request past its deadline.

    Socket timeouts bound each wait for bytes, never a whole request. Shutting a socket down from another
    thread wakes its reader with an end of stream, as urllib3's own `HTTPResponse.shutdown()` does. The
    thread sleeps until the earliest deadline in flight; a request that ends in time just leaves the set.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._live: set[Deadline] = set()
        self._thread: threading.Thread | None = None
        self._generation = 0  # a thread runs while this is the number it started with
        self._wake_at = math.inf

    def start(self, seconds: float) -> Deadline:
        deadline = Deadline(time.monotonic() + seconds)
        with self._cond:
            self._live.add(deadline)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(self._generation,), name="tarfuse-deadlines", daemon=True
                )
                self._thread.start()
            elif deadline.when < self._wake_at:
                self._cond.notify()
        return deadline

    def attach(self, deadline: Deadline, sock: socket.socket) -> None:
        with self._cond:
            deadline.sock = sock
            if deadline.expired:
                _shutdown(sock)

    def end(self, deadline: Deadline) -> None:
        """The request is over: its socket, maybe back in the pool for the next request, is not ours."""
        with self._cond:
            self._live.discard(deadline)
            deadline.sock = None

    def stop(self) -> None:
        """Before fork(): end the thread, which the child would not have; the next request starts one."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._generation += 1
            self._cond.notify()
        if thread is not None:
            thread.join()

    def _run(self, generation: int) -> None:
        with self._cond:
            while generation == self._generation:
                now = time.monotonic()
                for deadline in [d for d in self._live if d.when <= now]:
                    self._live.discard(deadline)
                    deadline.expired = True
                    if deadline.sock is not None:
                        _shutdown(deadline.sock)
                self._wake_at = min((d.when for d in self._live), default=math.inf)
                self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)


def _shutdown(sock: socket.socket) -> None:
    """Wake the reader of `sock` with an end of stream. The plain socket's shutdown, also for TLS:
    SSLSocket.shutdown would drop its TLS state under the thread that is reading."""
    with contextlib.suppress(OSError):  # closed already
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Current(threading.local):
    deadline: Deadline | None = None  # of the request this thread is sending (archive.RemoteArchive._send)


WATCHDOG = _Watchdog()
CURRENT = _Current()
os.register_at_fork(before=WATCHDOG.stop, after_in_child=WATCHDOG._reset)


def watch(sock: socket.socket | None) -> None:
    """Called by a connection about to read a response: its request's deadline now covers `sock`."""
    if (deadline := CURRENT.deadline) is not None and sock is not None:
        WATCHDOG.attach(deadline, sock)
