"""What the assembly (mount.py) hands the FUSE side (serve/): the files to serve and the background job.

A module of its own, without pyfuse3 or trio, so that the assembly builds them without importing the
event loop, and the FUSE side serves them without knowing tar, images or sources.
"""

import threading
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

ReadFn = Callable[[int, int], bytes | memoryview]  # (offset, size) -> image bytes
ReadIntoFn = Callable[[memoryview, int], int]  # (buffer, offset) -> bytes filled, short only at the end


class Contents(Protocol):
    """A served file's bytes, as one object: a mount may serve 250,000 files, and a callable stored per
    file per operation (a bound method or a closure) costs 64 bytes or more each."""

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """Fill `buffer` (lent by ImageFs, see _Buffers) from `offset`; short only at the end."""
        ...

    def next_data(self, offset: int) -> int | None:
        """lseek SEEK_DATA: the next data byte at or after `offset`; None: a hole to the end."""
        ...

    def next_hole(self, offset: int) -> int:
        """lseek SEEK_HOLE: the next hole at or after `offset` (the size if none before the end)."""
        ...

    def direct(self, leave: Callable[[], None]) -> "DirectMap | None":
        """Where reads may be answered without Python (serve/direct.py): a descriptor and the extents of
        the file in it, if its bytes come straight from a local file that needs no check after each read;
        `leave` is called when that ends (before the file can change)."""
        ...


# (descriptor, (image offset, length, offset in the descriptor's file) of each extent, packed into 64-bit
# integers): bytes outside the extents are zeros
DirectMap = tuple[int, "array[int]"]


BLOCKING_READERS = 8  # threads serving blocking reads at once; also how many FUSE workers then run


@dataclass(frozen=True, slots=True)
class ServedFile:
    """What the file system shows: a name, a size, owner and mode, and how to read it."""

    name: str
    size: int
    mtime_ns: int
    stored_bytes: int  # real data behind the file, for st_blocks (so `du` shows sparseness)
    read: ReadFn  # for callers outside the daemon; ImageFs reads `contents` where there is one
    xattrs: Mapping[str, bytes]
    uid: int
    gid: int
    umask: int = 0o222
    # Reads may wait on a decompressor or the network: run them in worker threads so that the trio loop,
    # and with it every other request, never waits. Plain files are read inline (measured faster).
    blocking: bool = False
    # For a blocking source: whether a read would not wait (its bytes are cached); those run inline.
    ready: Callable[[int, int], bool] | None = None
    # For a blocking source: how many reads may run in threads at once.
    readers: int = BLOCKING_READERS
    # lseek SEEK_DATA / SEEK_HOLE from the map: the next data byte (None: a hole to the end), the next hole.
    next_data: Callable[[int], int | None] = lambda offset: offset
    next_hole: Callable[[int], int] | None = None  # None: no hole but the implicit one at the end
    # In place of `read`, `next_data` and `next_hole` for ImageFs: reads fill a buffer it lends.
    contents: Contents | None = None


@dataclass(frozen=True, slots=True)
class BackgroundJob:
    """Work that runs in a thread while the mount serves (a compressed archive's indexing pass).

    `run(stop)` must return soon after `stop` is set; `status()` is the progress line to show.
    """

    run: Callable[[threading.Event], None]
    status: Callable[[], str]
    done: Callable[[], bool]
    report: Callable[[], list[dict[str, object]]] = list  # for tarfuse --status: a dict per pass
