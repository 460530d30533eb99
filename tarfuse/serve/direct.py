"""Reads answered without Python: pyfuse3's C read path (scripts/pyfuse3/direct-read.patch), where it is.

A 4 KiB read through pyfuse3's coroutines and the interpreter costs about as much again as the kernel's
part of it (docs/benchmarks.md). For a file whose bytes come straight from a local descriptor (a plain or
sparse member of an uncompressed local tar, a bare local image) that needs no check after each read (the
archive under its read lease), the patched pyfuse3 answers READs itself, from a table per process of
file handle -> descriptor and extents; everything else takes the Python path, as does a read the C path
cannot answer (an error, a short read, a large or scattered one), which Python answers and logs as ever.

The table is per process: each serving process fills its own, after any fork, once its lease is held
(`register`), and the lease break's handler empties it (`leave`) before the lease is given back, so no
read after a change of the archive is answered from the old map. The patched pyfuse3 runs pending
signal handlers before it answers a read in C, so that handler runs first.

Only this module touches the patch's functions; without the patch every function here does nothing.
"""

import signal
from collections.abc import Iterable

import pyfuse3

from tarfuse.served import DirectMap

AVAILABLE = hasattr(pyfuse3, "direct_read_register")


def register(files: Iterable[tuple[int, int, DirectMap]]) -> int:
    """Answer reads of each (file handle, size, (descriptor, packed extents)) in C from now on, in this
    process, after forgetting whatever the table held (a parent's, inherited at a fork); return how many.

    `files` is walked with SIGIO held back: each says it may be served directly while the lease is held,
    and a lease break between that answer and the entry would otherwise empty the table before the entry
    is made. Held back, its handler runs once the table is filled, and empties it.
    """
    if not AVAILABLE:
        return 0
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})
    try:
        pyfuse3.direct_read_clear()  # type: ignore[attr-defined,unused-ignore]
        count = 0
        for fh, size, (fd, extents) in files:
            pyfuse3.direct_read_register(fh, fd, size, extents)  # type: ignore[attr-defined,unused-ignore]
            count += 1
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return count


def leave() -> None:
    """Answer no read in C any more: the archive may change (a signal handler calls this)."""
    if AVAILABLE:
        pyfuse3.direct_read_clear()  # type: ignore[attr-defined,unused-ignore]


def counts() -> dict[str, int] | None:
    """READs answered in C and READs of registered files handed to Python, in this process; None without
    the patch."""
    if not AVAILABLE:
        return None
    answered, handed = pyfuse3.direct_read_counts()  # type: ignore[attr-defined,unused-ignore]
    return {"answered_in_c": answered, "handed_to_python": handed}


def answered() -> int:
    """READs answered in C in this process so far (0 without the patch): the event loop counts them as
    requests served without a trip through trio, which one wait may now cover many of."""
    return pyfuse3.direct_read_counts()[0] if AVAILABLE else 0  # type: ignore[attr-defined,no-any-return,unused-ignore]


def support() -> str:
    """For --version: whether reads can be answered without Python."""
    return "reads of local files answered in C" if AVAILABLE else "every read answered in Python"
