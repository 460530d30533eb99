"""The spill: a seekable zstd copy of a decompressed stream that has no restart point but its start.

No library can save decoder state inside a zstd frame or an xz block, so in a stream made of one of them
every backwards read decompresses from the start. The background pass (index.py) writes what it
decompresses into a file in the Zstandard seekable format (level 1, 1 MiB frames, each with its content
checksum); once complete, the source serves from it (compressed.CompressedSource.serve_spill), every read
one 1 MiB frame away. A named spill is written under a temporary name and renamed when complete; index.py
decides where it goes and records it in the index file. With `-o noindex` it is an unnamed temporary file
(O_TMPFILE), gone when the daemon exits, however it exits.
Must not import pyfuse3 or trio.
"""

import contextlib
import os
import tempfile
from typing import BinaryIO

import pyzstd

FRAME_SIZE = 1 << 20  # compressed.CHUNK_SIZE: a chunk read decompresses exactly one frame
LEVEL = 1  # fast: the pass must not wait for the copy (level 1 compresses at several hundred MB/s)


class SpillWriter:
    """Write a stream, in order, into a seekable zstd file; `finish` says which file to serve from."""

    def __init__(self, path: str | None, temporary_dir: str) -> None:
        """Write to `path` (under a temporary name until finished), or to an unnamed file in the other."""
        self._rename = None if path is None else (f"{path}.{os.getpid()}.tmp", path)  # (from, to)
        os.makedirs(os.path.dirname(path or "") or temporary_dir, exist_ok=True)
        self.file = _open(None if self._rename is None else self._rename[0], temporary_dir)
        options: dict[int, int] = {
            pyzstd.CParameter.compressionLevel: LEVEL,
            pyzstd.CParameter.checksumFlag: 1,
        }
        self._zstd = pyzstd.SeekableZstdFile(
            self.file, "w", level_or_option=options, max_frame_content_size=FRAME_SIZE
        )

    def write(self, data: bytes | memoryview) -> None:
        self._zstd.write(data)

    def finish(self) -> tuple[str, int]:
        """Write the seek table; return the path to read the spill by, and its length in bytes.

        An unnamed spill is read through /proc/self/fd: keep `file` open while it is served.
        """
        self._zstd.close()  # writes the seek table; the file object stays open
        self.file.flush()
        length = os.fstat(self.file.fileno()).st_size
        if self._rename is None:
            return f"/proc/self/fd/{self.file.fileno()}", length
        self.file.close()
        os.replace(*self._rename)
        return self._rename[1], length

    def abandon(self) -> None:
        """Drop what was written (the stream has restart points after all, or the pass stopped)."""
        with contextlib.suppress(OSError, ValueError):  # a full disk: the seek table cannot be written either
            self._zstd.close()
        self.file.close()
        if self._rename is not None and os.path.exists(self._rename[0]):
            os.unlink(self._rename[0])


def _open(path: str | None, temporary_dir: str) -> BinaryIO:
    """The file to write: `path`, or an unnamed one in `temporary_dir`; open until finish() or abandon()."""
    if path is None:
        return tempfile.TemporaryFile(dir=temporary_dir)
    return open(path, "wb")
