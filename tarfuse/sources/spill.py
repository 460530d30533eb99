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
"""

import contextlib
import os
from typing import BinaryIO

import pyzstd

from tarfuse.sources import sidefiles

FRAME_SIZE = 1 << 20  # compressed.CHUNK_SIZE: a chunk read decompresses exactly one frame
LEVEL = 1  # fast: the pass must not wait for the copy (level 1 compresses at several hundred MB/s)


class SpillWriter:
    """Write a stream, in order, into a seekable zstd file; `finish` gives the file to serve from."""

    def __init__(self, file: BinaryIO, rename: tuple[str, str] | None) -> None:
        """Write into `file`; `rename`: (temporary name, final name) of a named spill, None if unnamed."""
        self.file, self._rename = file, rename
        options: dict[int, int] = {
            pyzstd.CParameter.compressionLevel: LEVEL,
            pyzstd.CParameter.checksumFlag: 1,
        }
        self._zstd = pyzstd.SeekableZstdFile(
            self.file, "w", level_or_option=options, max_frame_content_size=FRAME_SIZE
        )

    @classmethod
    def named(cls, path: str) -> "SpillWriter":
        """A spill to keep at `path`: written under a temporary name of ours, 0600, renamed by finish()."""
        file, temporary = sidefiles.create(path)
        try:
            return cls(file, (temporary, path))
        except BaseException:
            file.close()
            os.unlink(temporary)
            raise

    @classmethod
    def unnamed(cls, directory: str) -> "SpillWriter":
        """A spill with no name (O_TMPFILE in `directory`, 0600), gone once nothing holds it open."""
        file = sidefiles.create_unnamed(directory)
        try:
            return cls(file, None)
        except BaseException:
            file.close()
            raise

    def write(self, data: bytes | memoryview) -> None:
        self._zstd.write(data)

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
        """Drop what was written (the stream has restart points after all, or the pass stopped)."""
        with contextlib.suppress(OSError, ValueError):  # a full disk: the seek table cannot be written either
            self._zstd.close()
        self.file.close()
        if self._rename is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._rename[0])
            self._rename = None
