"""zstd decompression that seeks by frame starts, over any seekable file: a local file or a `PreadFile`.

A zstd frame decodes only from its start, so frame starts are the restart points: read from the seek table
when the file is in the seekable format (frames, then a skippable frame listing their sizes, at the end),
otherwise recorded (compressed offset -> decompressed offset) as the stream is decoded. A read behind the
position, or one past a known later frame start, restarts at the nearest frame start at or before it.
Compressed input is read INPUT_SIZE at a time, so a read near the start of a large remote file fetches
only what it decodes. Every frame met is checked against the starts already known (seek table, saved
index), and a frame that decodes past the next known start fails: a mismatch found raises rather than
serve misplaced bytes. Every such failure, and every error of pyzstd's, is a DecodeError.

Every frame is decoded with windowLogMax set from the decoder's share of the mount's decoder memory
(compression.decoder_share): a frame that asks for a larger window (`zstd --long`, or a patched header) is
refused with a DecoderMemoryError that names the limit and the option, before its window is allocated.
"""

import io
import itertools
import json
import struct
from bisect import bisect_left, bisect_right

import pyzstd

from tarfuse.sources.compression import (
    DEFAULT_DECODER_MEMORY,
    DecodeError,
    decoder_share,
    memory_refusal,
    zstd_window_log,
)

INPUT_SIZE = 256 << 10  # compressed bytes read at a time
OUTPUT_SIZE = 1 << 20  # decompressed bytes produced at a time, also while skipping forward
_SEEKABLE_MAGIC = 0x8F92EAB1  # Zstandard Seekable Format, last 4 bytes of the file
_SEEK_TABLE_FRAME = 0x184D2A5E  # the skippable frame that holds the seek table
_TAIL_SIZE = 64 << 10  # one read at the end holds the seek table of up to ~8000 frames


class ZstdFrames:
    """Random access to a zstd stream (any layout), restarting at frame starts; not thread-safe."""

    def __init__(self, file: io.RawIOBase, share: int = decoder_share(DEFAULT_DECODER_MEMORY)) -> None:
        """Read `file`; `share`: the memory this decoder may claim (its window, at most)."""
        self._file = file
        self._share = share
        self._options = {int(pyzstd.DParameter.windowLogMax): zstd_window_log(share)}
        self._file_size = file.seek(0, io.SEEK_END)
        self._starts_c: list[int] = []  # compressed offsets of the frames that produce output
        self._starts_d: list[int] = []  # ... and the decompressed offsets where they start
        self._end: int | None = None  # the decompressed size, once known
        self._read_seek_table()
        self._restart(0, 0)

    def _restart(self, compressed: int, decompressed: int) -> None:
        self._fed = compressed  # next compressed byte to read from the file
        self._pending = b""  # read from the file, not yet given to a decompressor
        self._position = decompressed  # decompressed offset of the next byte produced
        self._decompressor: pyzstd.ZstdDecompressor | None = None  # None: between frames
        self._frame_start = (compressed, decompressed)
        self._frame_entered = False  # whether the current frame's start was checked or recorded
        self._frame_end: int | None = None  # where the next known frame starts, if known

    def read_at(self, offset: int, size: int) -> bytes:
        """The decompressed bytes [offset, offset + size), short only at the end of the stream."""
        if size <= 0 or (self._end is not None and offset >= self._end):
            return b""
        try:
            self._seek(offset)
            parts = []
            while size > 0 and (out := self._produce(min(size, OUTPUT_SIZE))):
                parts.append(out)
                size -= len(out)
            return b"".join(parts)
        except BaseException:
            self._restart(0, 0)  # the decompressor is unusable now; the next read starts a frame afresh
            raise

    def _seek(self, offset: int) -> None:
        i = bisect_right(self._starts_d, offset) - 1
        compressed, decompressed = (self._starts_c[i], self._starts_d[i]) if i >= 0 else (0, 0)
        if offset < self._position or decompressed > self._position:
            self._restart(compressed, decompressed)
        while self._position < offset and self._produce(min(offset - self._position, OUTPUT_SIZE)):
            pass

    def _produce(self, limit: int) -> bytes:
        """The next decompressed bytes, at most `limit`; b"" at the end of the stream."""
        while True:
            decompressor = self._decompressor or self._begin_frame()
            if decompressor is None:
                return b""
            data = b""
            if decompressor.needs_input:
                data, self._pending = self._pending or self._read_input(), b""
                if not data:
                    raise DecodeError(
                        f"truncated: the frame at compressed byte {self._frame_start[0]} is cut"
                    )
            try:
                out = decompressor.decompress(data, limit)
            except pyzstd.ZstdError as exc:
                if "too much memory" in str(exc):
                    raise self._refusal(data) from exc
                raise DecodeError(f"zstd: {exc}") from exc
            if decompressor.eof:
                self._pending, self._decompressor = decompressor.unused_data, None
            if out:
                self._account(len(out))
                return out

    def _begin_frame(self) -> pyzstd.ZstdDecompressor | None:
        """Start decoding the next frame; None at the end of the stream."""
        if not self._pending:
            self._pending = self._read_input()
            if not self._pending:
                if self._end is not None and self._end != self._position:
                    raise DecodeError(f"the zstd stream ends at {self._position}, the index says {self._end}")
                self._end = self._position
                return None
        self._decompressor = pyzstd.ZstdDecompressor(option=self._options)
        self._frame_start = (self._fed - len(self._pending), self._position)
        self._frame_entered = False
        return self._decompressor

    def _refusal(self, data: bytes) -> DecodeError:
        """The frame starting this decoder's input `data` needs a window past the share: say how large."""
        at = self._frame_start[0]
        return memory_refusal(f"the zstd frame at compressed byte {at}", frame_window(data), self._share)

    def _account(self, produced: int) -> None:
        if not self._frame_entered:  # skippable and empty frames never get here: they are no restart point
            self._enter_frame(*self._frame_start)
        if self._frame_end is not None and self._position + produced > self._frame_end:
            raise DecodeError(
                f"the zstd frame at offset {self._frame_start[0]} is longer than the index says"
            )
        self._position += produced

    def _enter_frame(self, compressed: int, decompressed: int) -> None:
        """Check the frame's start against the known ones, or record it as the last one so far."""
        i = bisect_left(self._starts_c, compressed)
        if i < len(self._starts_c) and self._starts_c[i] == compressed:
            if self._starts_d[i] != decompressed:
                raise DecodeError(
                    f"the zstd frame at offset {compressed} starts at decompressed offset {decompressed}, "
                    f"the index says {self._starts_d[i]}"
                )
        elif i == len(self._starts_c) and self._end is None:
            self._starts_c.append(compressed)
            self._starts_d.append(decompressed)
        else:
            raise DecodeError(f"the zstd frame at offset {compressed} is not in the index")
        self._frame_entered = True
        self._frame_end = self._starts_d[i + 1] if i + 1 < len(self._starts_d) else self._end

    def _read_input(self) -> bytes:
        self._file.seek(self._fed)
        data = self._file.read(INPUT_SIZE) or b""
        self._fed += len(data)
        return data

    def _read_seek_table(self) -> None:
        """Take the frame starts and the size from a seek table at the end, if the file has a valid one."""
        tail_size = min(self._file_size, _TAIL_SIZE)
        self._file.seek(self._file_size - tail_size)
        tail = self._file.read(tail_size) or b""
        if len(tail) < 17 or len(tail) != tail_size:
            return
        count, descriptor, magic = struct.unpack_from("<IBI", tail, len(tail) - 9)
        if magic != _SEEKABLE_MAGIC or descriptor & 0x7C:  # bits 2-6 are reserved
            return
        entry_size = 12 if descriptor & 0x80 else 8  # bit 7: each entry carries a checksum
        table_size = 17 + count * entry_size
        if table_size > self._file_size:
            return
        if table_size > len(tail):
            self._file.seek(self._file_size - table_size)
            tail = self._file.read(table_size) or b""
        table = memoryview(tail)[len(tail) - table_size :]
        if struct.unpack_from("<II", table) != (_SEEK_TABLE_FRAME, table_size - 8):
            return
        starts_c, starts_d, compressed, decompressed = [], [], 0, 0
        for k in range(count):
            frame_c, frame_d = struct.unpack_from("<II", table, 8 + k * entry_size)
            if frame_d and not frame_c:  # output from no input: not a table of real frames
                return
            if frame_d:
                starts_c.append(compressed)
                starts_d.append(decompressed)
            compressed, decompressed = compressed + frame_c, decompressed + frame_d
        if compressed == self._file_size - table_size:  # else not a table that describes this file
            self._starts_c, self._starts_d, self._end = starts_c, starts_d, decompressed

    def compressed_position(self) -> int | None:
        return self._fed

    def complete_size(self) -> int | None:
        return self._end

    def single_stream(self) -> bool:
        """Whether no restart point but the start is known: one frame, so far."""
        return len(self._starts_c) <= 1

    def export_index(self) -> bytes | None:
        frames = [[c, d] for c, d in zip(self._starts_c, self._starts_d, strict=True)]
        return json.dumps({"zstd_frames": frames, "size": self._end}).encode()

    def import_index(self, blob: bytes) -> None:
        """Take frame starts saved by export_index; raise DecodeError if they cannot describe this file."""
        try:
            saved = json.loads(blob)
        except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError: not an index at all
            raise DecodeError(str(exc)) from exc
        frames, size = (saved.get("zstd_frames"), saved.get("size")) if isinstance(saved, dict) else (0, 0)
        if (
            not isinstance(frames, list)
            or type(size) is not int
            or not all(isinstance(f, list) and len(f) == 2 and all(type(v) is int for v in f) for f in frames)
        ):
            raise DecodeError("not a zstd frame index (an index of an older tarfuse?)")
        starts_c, starts_d = [f[0] for f in frames], [f[1] for f in frames]
        if not (_increasing([-1, *starts_c, self._file_size]) and _increasing([*starts_d, size])):
            raise DecodeError("the zstd index's frame starts are out of order or outside the file")
        if starts_d[:1] not in ([], [0]):
            raise DecodeError("the zstd index's first frame does not start at decompressed offset 0")
        self._starts_c, self._starts_d, self._end = starts_c, starts_d, size
        self._restart(0, 0)

    def close(self) -> None:
        self._file.close()


def frame_window(header: bytes) -> int | None:
    """The window size a zstd frame header declares (RFC 8878, 3.1.1.1), or None if `header` is not one.

    Frame_Header_Descriptor bit 5 (Single_Segment): the window is the content size, in the 1, 2, 4 or 8
    bytes after the optional dictionary ID; otherwise the Window_Descriptor byte: exponent (high 5 bits)
    and mantissa (low 3 bits) of a size from 1 KiB.
    """
    if len(header) < 6 or header[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = header[4]
    if not descriptor & 0x20:
        exponent, mantissa = header[5] >> 3, header[5] & 7
        base = 1 << (10 + exponent)
        return base + base // 8 * mantissa
    dictionary_bytes = (0, 1, 2, 4)[descriptor & 3]
    size_bytes = (1, 2, 4, 8)[descriptor >> 6]
    start = 5 + dictionary_bytes
    field = header[start : start + size_bytes]
    if len(field) != size_bytes:
        return None
    return int.from_bytes(field, "little") + (256 if size_bytes == 2 else 0)


def _increasing(values: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))
