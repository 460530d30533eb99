"""The spill: a seekable zstd copy of a decompressed stream that has no restart point but its start.

No library can save decoder state inside a zstd frame or an xz block, so in a stream made of one of them
every backwards read decompresses from the start. The background pass (index.py) writes what it
decompresses into a file in the Zstandard seekable format (level 1, 1 MiB frames, each with its content
checksum); once complete, the source serves from it (compressed.CompressedSource.serve_spill), every read
one 1 MiB frame away. A named spill is written mode 0600 under a fresh temporary name and renamed when
complete (sidefiles.py: the archive may be private, and the directory is checked first); index.py decides
where it goes and records it in the index file. With `-o noindex` it is an unnamed temporary file
(O_TMPFILE), gone when the daemon exits, however it exits. Either way the source reads the very file that
was written, through its descriptor, never by name.

A spill is not always smaller than what it copies: its frames are compressed one by one, so what zstd's
long matches or a large window made small (a random block repeated) comes out nearly as large as the tar.
So it has bounds (README, "Limits, said plainly"): its length (`limit`: by default SPILL_RATIO times the
compressed archive, at least SPILL_FLOOR; `-o spill_max=SIZE`), and the free space it leaves on its file
system (`reserve`). Past either, or when the file system says no (ENOSPC, EDQUOT, EFBIG), there is no
spill: the writer raises SpillStopped or the OSError, the pass abandons it, and reads decompress from the
start as they did before spills existed.
"""

import contextlib
import errno
import os
from typing import BinaryIO

import pyzstd

from tarfuse.sources import sidefiles

FRAME_SIZE = 1 << 20  # compressed.CHUNK_SIZE: a chunk read decompresses exactly one frame
LEVEL = 1  # fast: the pass must not wait for the copy (level 1 compresses at several hundred MB/s)
SPILL_RATIO = 16  # the default bound: this many times the compressed archive ...
SPILL_FLOOR = 256 << 20  # ... and never less than this
RESERVE_SHARE = 10  # the spill leaves a tenth of its file system free ...
RESERVE_MAX = 1 << 30  # ... or this much, whichever is less
# The writer looks at its length and the free space after every frame's worth of input. The compressor
# holds up to a frame not yet written, and the next frame comes before the next look: stopping this far
# short keeps the file within its bound and the file system above its reserve.
_MARGIN = 2 * FRAME_SIZE
# What the file system says when it will take no more: full, over quota, past RLIMIT_FSIZE.
_NO_ROOM = {
    errno.ENOSPC: "its file system is full",
    errno.EDQUOT: "the disk quota is reached",
    errno.EFBIG: "the file size limit is reached (ulimit -f)",
}


class SpillStopped(OSError):
    """The spill reached its bound or its file system's reserve: it is not written further."""


def default_limit(compressed_size: int) -> int:
    """The longest spill of an archive of `compressed_size` bytes, when -o spill_max does not say."""
    return max(SPILL_RATIO * compressed_size, SPILL_FLOOR)


def reserve(fs: os.statvfs_result) -> int:
    """The free space a spill leaves on the file system `fs`: a tenth of it, at most RESERVE_MAX."""
    return min(fs.f_blocks * fs.f_frsize // RESERVE_SHARE, RESERVE_MAX)


def why_no_spill(exc: OSError) -> str:
    """Why a spill could not be written or kept, in a few words, for the log."""
    if isinstance(exc, SpillStopped):
        return exc.strerror or str(exc)
    return _NO_ROOM.get(exc.errno or 0, exc.strerror or str(exc))


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


class SpillWriter:
    """Write a stream, in order, into a seekable zstd file; `finish` gives the file to serve from."""

    def __init__(self, file: BinaryIO, rename: tuple[str, str] | None, limit: int | None = None) -> None:
        """Write into `file`; `rename`: (temporary name, final name) of a named spill, None if unnamed;
        `limit`: the longest the file may grow (None: only the reserve bounds it).

        Raises:
            SpillStopped: the file system has no room above its reserve to start one.
        """
        self.file, self._rename, self._limit = file, rename, limit
        self._unchecked = 0  # bytes of input since the last look at the length and the free space
        self._check_room()
        options: dict[int, int] = {
            pyzstd.CParameter.compressionLevel: LEVEL,
            pyzstd.CParameter.checksumFlag: 1,
        }
        self._zstd = pyzstd.SeekableZstdFile(
            self.file, "w", level_or_option=options, max_frame_content_size=FRAME_SIZE
        )

    @property
    def shown(self) -> str:
        """Where it is, for tarfuse --status: the name it gets once finished, if it has one."""
        return "(an unnamed file)" if self._rename is None else self._rename[1]

    @classmethod
    def named(cls, path: str, limit: int | None = None) -> "SpillWriter":
        """A spill to keep at `path`: written under a temporary name of ours, 0600, renamed by finish()."""
        file, temporary = sidefiles.create(path)
        try:
            return cls(file, (temporary, path), limit)
        except BaseException:
            file.close()
            os.unlink(temporary)
            raise

    @classmethod
    def unnamed(cls, directory: str, limit: int | None = None) -> "SpillWriter":
        """A spill with no name (O_TMPFILE in `directory`, 0600), gone once nothing holds it open."""
        file = sidefiles.create_unnamed(directory)
        try:
            return cls(file, None, limit)
        except BaseException:
            file.close()
            raise

    def write(self, data: bytes | memoryview) -> None:
        """Add `data`; raise SpillStopped past a bound, or the OSError of a file system that said no."""
        self._zstd.write(data)
        self._unchecked += len(data)
        if self._unchecked >= FRAME_SIZE:
            self._unchecked = 0
            self._check_room()

    def _check_room(self) -> None:
        """Raise SpillStopped if another frame could take the file past its limit or its file system
        under its reserve."""
        written = self.file.tell()
        if self._limit is not None and written + _MARGIN > self._limit:
            raise SpillStopped(
                errno.EFBIG,
                f"the spill stopped at {_mib(written)}, at its bound of {_mib(self._limit)} (by default "
                f"{SPILL_RATIO} times the archive, at least {_mib(SPILL_FLOOR)}; -o spill_max=SIZE)",
            )
        fs = os.fstatvfs(self.file.fileno())
        kept = reserve(fs)
        if fs.f_bavail * fs.f_frsize < kept + _MARGIN:
            raise SpillStopped(
                errno.ENOSPC,
                f"the spill stopped at {_mib(written)}: its file system keeps {_mib(kept)} free "
                f"({_mib(fs.f_bavail * fs.f_frsize)} left)",
            )

    def finish(self) -> tuple[str, int, BinaryIO]:
        """Write the seek table and rename; return the name to show, the length, and the file to read.

        The file to read is the one written, opened again read-only through /proc/self/fd (the same
        inode, whatever happens to names): the caller owns it. An unnamed spill's name is that link.
        """
        self._zstd.close()  # writes the seek table; the file object stays open
        self.file.flush()
        length = os.fstat(self.file.fileno()).st_size
        reader = open(f"/proc/self/fd/{self.file.fileno()}", "rb")  # noqa: SIM115 (the caller's to close)
        try:
            self.file.close()
            if self._rename is None:
                return f"/proc/self/fd/{reader.fileno()}", length, reader
            sidefiles.commit(*self._rename)
        except BaseException:
            reader.close()
            raise
        path, self._rename = self._rename[1], None  # renamed: nothing for abandon() to remove
        return path, length, reader

    def abandon(self) -> None:
        """Drop what was written (the stream has restart points after all, the pass stopped, or the spill
        reached a bound). Never raises for the file system: a full one is the likeliest reason to be here.
        """
        with contextlib.suppress(OSError, ValueError):
            os.ftruncate(self.file.fileno(), 0)  # the space comes back now, and the writes below fit
        with contextlib.suppress(OSError, ValueError):  # what the compressor and the buffer still hold
            self._zstd.close()
        with contextlib.suppress(OSError):  # goes nowhere useful: flushing it may fail, closing does not
            self.file.close()
        if self._rename is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._rename[0])
            self._rename = None
