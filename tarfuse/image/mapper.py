"""Turn image offsets into archive offsets: the one place where that translation happens.

The mapper never changes once built and reads only with positional reads, so any number of threads can
share it without a lock.
"""

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable

from tarfuse.errors import TruncatedArchive
from tarfuse.tar.archive import ReadAt, read_exact
from tarfuse.tar.sparse import Int64Array, SparseMap

PreadInto = Callable[[memoryview, int], int]  # (buffer, offset) -> bytes read, like os.preadv

HOLE = -1  # the "archive offset" of a piece that reads as zeros

Piece = tuple[int, int]  # (archive offset or HOLE, length)


class ImageMapper:
    """Serve reads of the expanded image from the archive; holes read as zeros without I/O."""

    def __init__(self, read_at: ReadAt, sparse_map: SparseMap, pread_into: PreadInto | None = None) -> None:
        self._read_at = read_at
        self._pread_into = pread_into or _copying(read_at)
        self.size = sparse_map.real_size
        self._logical = sparse_map.logical
        self._lengths = sparse_map.lengths
        self._physical = sparse_map.physical
        self._count = len(sparse_map.logical)
        # A plain member (one extent from 0 to the end) is one archive offset away from the image: its
        # reads skip plan() and _fill() (docs/benchmarks.md, "Figures behind the code").
        whole = self._count == 1 and self._logical[0] == 0 and self._lengths[0] == self.size
        self._base: int | None = self._physical[0] if whole else None

    def plan(self, offset: int, size: int) -> list[Piece]:
        """Split a read into "copy N bytes from archive offset X" and "N zero bytes" pieces.

        The plan stops at the end of the image, so a read past it is short. O(log n + k) for a map of n
        extents and a read that touches k of them.
        """
        logical, lengths, count = self._logical, self._lengths, self._count
        end = min(offset + size, self.size)
        pieces: list[Piece] = []
        i = bisect_right(logical, offset) - 1  # last extent starting at or before offset, or -1
        while offset < end:
            if i >= 0 and offset < (extent_end := logical[i] + lengths[i]):
                n = min(end, extent_end) - offset
                pieces.append((self._physical[i] + offset - logical[i], n))
            else:  # in the hole before extent i + 1 (or before the end of the image)
                n = min(end, logical[i + 1] if i + 1 < count else self.size) - offset
                pieces.append((HOLE, n))
            offset += n
            if i + 1 < count and logical[i + 1] <= offset:
                i += 1
        return pieces

    def extents(self) -> Int64Array:
        """The map as pyfuse3's C read path takes it (serve/direct.py): (image offset, length, archive
        offset) of each extent in order, packed into one array of 64-bit integers.

        One array filled at C speed, not a tuple per extent, which for a map of a million extents neither
        the time to mount nor the ceiling on memory has room for. The C side leaves empty extents out but
        refuses one past the size: those at or past the image's end are left out here, one across it cut.
        """
        count = bisect_left(self._logical, self.size)  # sorted: those at or past the end are the last
        packed = array("q", [0]) * (3 * count)
        for column, values in enumerate((self._logical, self._lengths, self._physical)):
            packed[column::3] = values if count == self._count else values[:count]
        if count and (past := packed[3 * count - 3] + packed[3 * count - 2] - self.size) > 0:
            packed[3 * count - 2] -= past
        return packed

    def next_data(self, offset: int) -> int | None:
        """The first byte of data at or after `offset` (lseek SEEK_DATA), or None if only a hole follows.

        Only the archive's map decides: zeros stored as data are data. O(log n), plus the empty extents a
        map may hold (GNU tar ends a map with one).
        """
        logical, lengths, count = self._logical, self._lengths, self._count
        i = max(bisect_right(logical, offset) - 1, 0)
        while i < count:
            start, end = logical[i], logical[i] + lengths[i]
            if lengths[i] and end > offset:
                return max(start, offset)
            i += 1
        return None

    def next_hole(self, offset: int) -> int:
        """The first byte of a hole at or after `offset` (lseek SEEK_HOLE); the image's end if none, which
        is where lseek(2) puts the implicit hole at the end of every file."""
        logical, lengths, count = self._logical, self._lengths, self._count
        i = bisect_right(logical, offset) - 1
        if i < 0 or logical[i] + lengths[i] <= offset:
            return offset  # in a hole already (before the first extent, or between two)
        end = logical[i] + lengths[i]
        while i + 1 < count and logical[i + 1] <= end:  # extents that touch make one run of data
            i += 1
            end = max(end, logical[i] + lengths[i])
        return min(end, self.size)

    def read(self, offset: int, size: int) -> bytes:
        """Return the image bytes at [offset, offset + size), short only at the end of the image."""
        # join() hands back a lone piece as it is, without a copy
        return b"".join(
            bytes(length) if physical == HOLE else read_exact(self._read_at, physical, length)
            for physical, length in self.plan(offset, size)
        )

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """Fill `buffer` with the image bytes at `offset`; return how many, short only at the image end.

        The daemon's hot path: reading into a buffer it reuses spares an allocation, and the page faults
        of a fresh megabyte, on every request.
        """
        base = self._base
        if base is not None and offset >= 0:  # a plain member: one positional read, unless short
            n = min(len(buffer), self.size - offset)
            if n <= 0:
                return 0
            if self._pread_into(buffer if n == len(buffer) else buffer[:n], base + offset) == n:
                return n
        done = 0
        for physical, length in self.plan(offset, len(buffer)):
            piece = buffer[done : done + length]
            if physical == HOLE:
                piece[:] = _zeros(length)
            else:
                self._fill(piece, physical)
            done += length
        return done

    def _fill(self, piece: memoryview, physical: int) -> None:
        filled = 0
        while filled < len(piece):
            n = self._pread_into(piece[filled:], physical + filled)
            if n <= 0:
                raise TruncatedArchive(
                    f"archive file ends before the {len(piece)} bytes expected here", physical
                )
            filled += n


_ZEROS = memoryview(bytes(1 << 20))


def _zeros(length: int) -> memoryview | bytes:
    return _ZEROS[:length] if length <= len(_ZEROS) else bytes(length)


def _copying(read_at: ReadAt) -> PreadInto:
    """Adapt a bytes-returning read_at (tests, in-memory archives) to the read-into interface."""

    def pread_into(buffer: memoryview, offset: int) -> int:
        data = read_at(offset, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    return pread_into
