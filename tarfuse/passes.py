"""The background passes over a mounted stream: the indexing pass, which decompresses a compressed archive
whole once (its seek index, its size, the tar members on the way, a spill where the stream has no restart
point), and the dictzip check against the stream's CRC32.

They sit above sources/ because they read what they decompress as a tar (tar/) and judge its members as
images (image.detect): the index file itself (where it goes, its format, loading it) is sources/index.py's.
"""

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tarfuse.errors import ArchiveError, CorruptCompressed, RemoteError
from tarfuse.image.detect import has_image_suffix
from tarfuse.sources import sidefiles
from tarfuse.sources.compressed import UNKNOWN_SIZE, CompressedSource
from tarfuse.sources.compression import DecodeError
from tarfuse.sources.decoders import GZIP_CHUNK_SIZE, Decoder
from tarfuse.sources.index import save, spill_path
from tarfuse.sources.spill import SpillWriter, default_limit, why_no_spill
from tarfuse.tar.archive import normalize_name, scan_members
from tarfuse.tar.files import Candidate, FileTable
from tarfuse.tar.listing import Recorder

if TYPE_CHECKING:
    from tarfuse.sources.dictzip import DictzipSource

log = logging.getLogger(__name__)

_STEP = 4 << 20  # the background pass reads this much at a time, then looks at its stop flag
# A pass that a mount waits for (a stream that says its size only at its end) stops past max_ratio times
# the compressed size, but never before this much: a small archive that decompresses to a few hundred MiB
# costs a second, whatever its ratio.
RATIO_FLOOR = 256 << 20
_SPILL_ERRORS = (OSError, DecodeError)  # writing it, or reading it back


class Stopped(Exception):
    """The background pass was asked to stop (unmount)."""


class _PastBound(Exception):
    """The stream decompressed to more than the pass's bound (IndexingPass, max_ratio)."""


@dataclass
class Progress:
    """How far the background pass is, for the progress line."""

    started: float
    decompressed: int = 0
    compressed: int | None = None
    compressed_total: int = 0
    decompressed_total: int | None = None  # known at the start for xz and seekable zstd
    done: bool = False


class _ForwardReader:
    """read_at for scan_members over the pass's own decoder: only forward, in steps, watching `stop`.

    Every decompressed byte goes once, in order, to `sink` (the spill).
    """

    def __init__(
        self,
        decoder: Decoder,
        stop: threading.Event,
        progress: Progress,
        sink: Callable[[memoryview], None],
        limit: int | None = None,
    ) -> None:
        """`limit`: raise _PastBound once more than this many bytes are decompressed."""
        self._decoder, self._stop, self._progress, self._sink = decoder, stop, progress, sink
        self._limit = limit
        self.position = 0
        self.at_end = False

    def advance(self, target: int) -> None:
        while self.position < target and not self.at_end:
            self.read_at(self.position, min(_STEP, target - self.position))

    def read_at(self, offset: int, size: int) -> bytes:
        if offset > self.position:
            self.advance(offset)
        if self._stop.is_set():
            raise Stopped
        try:
            data = self._decoder.read_at(offset, size)
        except DecodeError as exc:
            raise CorruptCompressed(f"the compressed stream cannot be decompressed: {exc}", offset) from None
        if offset + len(data) > self.position:
            self._sink(memoryview(data)[self.position - offset :])
        self.position = max(self.position, offset + len(data))
        self.at_end = self.at_end or len(data) < size
        self._progress.decompressed = self.position
        self._progress.compressed = self._decoder.compressed_position()
        if self._limit is not None and self.position > self._limit:
            raise _PastBound
        return data


class VerifyPass:
    """A dictzip mount's background job: its chunks need no index, but carry no checksum either, so the
    stream is read whole once against the CRC32 of its trailer, as gzip's is by the indexing pass."""

    def __init__(self, source: "DictzipSource") -> None:
        self._source = source
        self.progress = Progress(time.monotonic(), compressed_total=source.archive.size)
        self.state = "running"

    def run(self, stop: threading.Event) -> None:
        try:
            checked = self._source.verify(stop.is_set)
        except CorruptCompressed as exc:
            self._source.mark_broken(exc)
            self.state = f"failed: {exc}"
            log.error("%s: %s; reads fail from now on", self._source.path, exc)
        except ArchiveError as exc:  # the archive could not be read (a web server): nothing is known
            self.state = f"failed: {exc}"
            log.error("%s: could not check the dictzip stream: %s", self._source.path, exc)
        else:
            self.state = "done" if checked else "stopped"
            if checked:
                log.info(
                    "dictzip stream checked against its CRC32 in %.1f s",
                    time.monotonic() - self.progress.started,
                )
        self.progress.done = True

    def status(self) -> str:
        return f"checking the dictzip stream ({_mib(self.progress.compressed_total)})"

    def report(self) -> dict[str, object]:
        """For tarfuse --status: what the job is and how far (the check reads the whole file once)."""
        return {
            "job": "dictzip check",
            "state": self.state,
            "source": self._source.path,
            "progress": self.status(),
        }


class IndexingPass:
    """Decompress the whole stream once in the background: complete the index, save it, hand it over."""

    def __init__(
        self,
        source: CompressedSource,
        served: str,
        index_path: str | None,
        scan: bool = True,
        served_header: int | None = None,
        max_ratio: int = 0,
        replace: Callable[[Candidate], bool] | None = None,
        spill_max: int | None = None,
    ) -> None:
        """`scan`: read every header of a tar, to keep them with the index (tar/listing.py), look for
        image candidates besides `served` (the name served; "" for none), and check that the member
        served is the one tar -x extracts under its name: its header at `served_header`.
        `replace(candidate)`: serve a later member of that name instead, if the mount can still do so
        unseen (True); without it, or if it cannot, reads fail from then on. `max_ratio` (0: none): stop,
        and fail reads, once the stream has decompressed to more than that many times its compressed
        size (and RATIO_FLOOR): a pass that a mount waits for must end. `spill_max`: -o spill_max, the
        longest spill (None: the default, spill.default_limit of the archive's size)."""
        self._spill_limit = spill_max if spill_max is not None else default_limit(source.archive.size)
        self._source, self._served, self._index_path, self._scan = source, served, index_path, scan
        self._served_header = served_header
        self._replace = replace
        self._max_ratio = max_ratio
        self.progress = Progress(time.monotonic(), compressed_total=source.archive.size)
        if source.size_known:
            self.progress.decompressed_total = source.size
        self.others: list[str] = []
        self.quiet = False  # a caller that waits for the pass reports a corrupt stream itself
        self.state = "running"  # then "done", "stopped", or "failed: why" (tarfuse --status)
        self.index_saved: int | None = None  # the index file's length, once written
        self._spill: SpillWriter | None = None
        self._members: Recorder | None = None  # what the walk found, kept with the index (tar/listing.py)

    def run(self, stop: threading.Event) -> None:
        """Run to the end of the stream (or until `stop`); log the outcome. Called in a worker thread."""
        self._index_path = self._safe_place(self._index_path)
        decoder = self._source.new_decoder()
        self._spill = self._open_spill() if decoder.single_stream() else None
        try:
            self._walk(decoder, stop)
        except Stopped:
            self.state = "stopped"
            log.debug("indexing pass stopped at decompressed offset %d", self.progress.decompressed)
        except _PastBound:
            self.state = "failed: past -o max_ratio"
            self._refuse_past_bound()
        except CorruptCompressed as exc:
            self.state = f"failed: {exc}"
            self._source.mark_broken(exc)
            if not self.quiet:
                log.error("%s: %s; reads fail from now on", self._source.path, exc)
        except RemoteError as exc:  # the web server failed: nothing is known of the archive, or wrong
            self.state = f"failed: {exc}"
            log.error("%s: indexing pass: %s", self._source.path, exc)
        except OSError as exc:  # the storage failed (EIO): as for a web server, not a bug of ours
            self.state = f"failed: cannot read the archive ({exc.strerror or exc})"
            log.error(
                "%s: indexing pass: cannot read the archive (%s)", self._source.path, exc.strerror or exc
            )
        except ArchiveError as exc:
            self.state = f"failed: {exc}"
            if self._served_header is not None:  # served early: the damage may hide a later copy of it
                exc = ArchiveError(
                    f"the archive is damaged after the member this mount serves ({exc}); tar -x would stop "
                    "or skip there, and a later member of its name may be beyond; reads fail from now on",
                    None,
                )
                self._source.mark_broken(exc)
            log.error("%s: indexing pass: %s", self._source.path, exc)
        except Exception as exc:  # a bug of ours: the daemon goes on, but what the pass checks is unknown
            log.debug("indexing pass failed", exc_info=True)
            error = ArchiveError(f"the indexing pass failed ({exc!r}), a bug in tarfuse; please report it")
            self._source.mark_broken(error)
            self.state = f"failed: {error}"
            log.error("%s: %s; reads fail from now on", self._source.path, error)
        else:
            self.progress.done = True
            self.state = "done"
            return self._finish(decoder)
        finally:
            self._drop_spill()  # unless _finish took it
        decoder.close()

    def _output_limit(self) -> int | None:
        """Decompressed bytes past which the pass stops (max_ratio), or None: no bound."""
        if not self._max_ratio:
            return None
        return max(RATIO_FLOOR, self._max_ratio * self.progress.compressed_total)

    def _refuse_past_bound(self) -> None:
        """Fail reads, and say why, for a stream that decompressed past the bound (a decompression bomb)."""
        p = self.progress
        error = ArchiveError(
            f"the {self._source.compression} stream decompresses to more than {self._max_ratio:,} times its "
            f"compressed size ({_mib(p.decompressed)} from {p.compressed_total:,} bytes) before its end: "
            "refused, as a decompression bomb would be; -o max_ratio=N raises the bound (0: none)",
            None,
        )
        self._source.mark_broken(error)
        if not self.quiet:
            log.error("%s: %s", self._source.path, error)

    def _walk(self, decoder: Decoder, stop: threading.Event) -> None:
        reader = _ForwardReader(
            decoder,
            stop,
            self.progress,
            lambda data: self._spill_more(decoder, data),
            self._output_limit(),
        )
        if self._scan:
            table = FileTable()  # the files as tar -x leaves them
            self._members = members = Recorder()
            try:
                for member in scan_members(reader.read_at, UNKNOWN_SIZE):
                    table.add(member)
                    members.add(member)
            except ArchiveError:  # damage further on: tar -x has extracted what came before it, as here
                self._check_served(table.files())
                raise
            self._check_served(table.files())
            self._warn_of_others(table.files())
        reader.advance(UNKNOWN_SIZE)

    def _check_served(self, files: list[Candidate]) -> None:
        """Serve, or fail reads, if a later member replaces the one served (tar -x keeps the last of a name).

        The image was served as soon as its header was decompressed, before the rest of the archive was
        read: serving early and serving what tar -x extracts meet here. Bytes are never switched under a
        reader: if nothing of the first copy was answered yet, the mount serves the last one from now on
        (`replace`); otherwise it fails every read from now on, and says to mount again, which serves the
        right member from the saved index at once.
        """
        if self._served_header is None:
            return
        name = normalize_name(self._served)
        final = next((c for c in files if normalize_name(c.name) == name), None)
        if final is not None and final.member.header_offset == self._served_header:
            return
        if final is not None and self._replace is not None and self._replace(final):
            log.info(
                "a later member named %r replaces the first, as tar -x would: nothing of the first was "
                "read yet, so this mount serves the later one (its header at decompressed offset %d)",
                self._served,
                final.member.header_offset,
            )
            self._served_header = final.member.header_offset
            return
        later = "is not a regular file there" if final is None else "holds other data"
        where = None if final is None else final.member.header_offset
        remedy = (
            "unmount and mount again: the saved index serves the last copy at once"
            if self._index_path is not None
            else "this mount keeps no index (-o noindex, or no safe place for one), so a new mount would "
            "serve the first copy again: mount it with an index kept"
        )
        error = ArchiveError(
            f"a later member named {self._served!r} replaces the one this mount served, as tar -x would "
            f"(it {later}); reads fail from now on; {remedy}",
            where,
        )
        self._source.mark_broken(error)
        log.error("%s: %s", self._source.path, error)

    def _warn_of_others(self, files: list[Candidate]) -> None:
        if not self._served:  # --index-only: nothing is served
            return
        served = normalize_name(self._served)
        for candidate in files:
            if has_image_suffix(candidate.name) and normalize_name(candidate.name) != served:
                self.others.append(candidate.name)
                log.warning(
                    "the archive also holds %r, which looks like a disk image too; this mount serves %r "
                    "(choose with -o member=PATH; with the index kept, the next mount on a directory "
                    "serves every disk)",
                    candidate.name,
                    self._served,
                )

    def _finish(self, decoder: Decoder) -> None:
        size = decoder.complete_size() or self.progress.decompressed
        try:
            blob = decoder.export_index()
        except DecodeError as exc:  # the stream is served all the same; only the next mount indexes again
            log.warning("%s: no index to keep: %s", self._source.path, exc)
            blob = None
        spilled = self._serve_spill(decoder, size)
        if spilled is None:
            self._source.adopt(decoder, size)
        else:
            decoder.close()
        elapsed = time.monotonic() - self.progress.started
        log.info("index complete: %d bytes decompressed in %.1f s", size, elapsed)
        if self._index_path is not None and (blob is not None or spilled is not None):
            try:
                members = None if self._members is None else self._members.encode()
                self.index_saved = save(self._index_path, self._source, size, blob or b"", spilled, members)
                log.info("index saved to %s (%d bytes)", self._index_path, self.index_saved)
            except OSError as exc:
                log.warning("could not save the index to %s: %s", self._index_path, exc.strerror)

    @staticmethod
    def _safe_place(where: str | None) -> str | None:
        """`where` if its directory is (made) one that only the caller or root can change, else None."""
        if where is None:
            return None
        try:
            sidefiles.make_directory(os.path.dirname(os.path.abspath(where)))
        except OSError as exc:
            log.warning("not keeping the index at %s: %s", where, exc.strerror)
            return None
        return where

    def _open_spill(self) -> SpillWriter | None:
        try:
            if self._index_path is None:
                return SpillWriter.unnamed(sidefiles.unnamed_dir(), self._spill_limit)
            return SpillWriter.named(spill_path(self._index_path), self._spill_limit)
        except OSError as exc:
            reason = why_no_spill(exc)
            log.warning("cannot write a spill (%s): backwards reads will decompress from the start", reason)
            return None

    def _spill_more(self, decoder: Decoder, data: memoryview) -> None:
        if self._spill is None:
            return
        if not decoder.single_stream():  # a second frame or block: restart points after all, no spill
            self._drop_spill()
            return
        try:
            self._spill.write(data)
        except OSError as exc:  # a bound, or a file system that will take no more: no spill, not a bug
            reason = why_no_spill(exc)
            log.warning("no spill: %s; backwards reads will decompress from the start", reason)
            self._drop_spill()

    def _serve_spill(self, decoder: Decoder, size: int) -> int | None:
        """Complete the spill and serve from it; return its length, or None if there is none."""
        spill, self._spill = self._spill, None
        if spill is None or not decoder.single_stream():
            if spill is not None:
                spill.abandon()
            return None
        file = None
        try:
            path, length, file = spill.finish()
            self._source.serve_spill(path, size, file)
        except _SPILL_ERRORS as exc:
            reason = why_no_spill(exc) if isinstance(exc, OSError) else exc
            log.warning("cannot complete the spill (%s): backwards reads decompress from the start", reason)
            spill.abandon()
            if file is not None:
                file.close()
            return None
        log.info("spill complete: %s (%d bytes); reads are served from it", path, length)
        return length

    def _drop_spill(self) -> None:
        if self._spill is not None:
            self._spill.abandon()
            self._spill = None

    def status(self) -> str:
        """One line: bytes done, percent, rate and time left: in compressed bytes when the library says
        how far it has read, else in decompressed bytes when the stream's size is known (xz)."""
        done, total, unit = self._how_far()
        rate = done / max(time.monotonic() - self.progress.started, 1e-3)
        if total is None:
            return f"indexing: {_mib(done)} decompressed, {rate / 2**20:.0f} MiB/s"
        extra = f", {_mib(self.progress.decompressed)} out" if unit == "compressed" else ""
        left = (total - done) / rate if rate else 0.0
        return (
            f"indexing: {_mib(done)} of {_mib(total)} {unit} ({100 * done / max(total, 1):.0f}%){extra}, "
            f"{rate / 2**20:.0f} MiB/s, ETA {left:.0f} s"
        )

    def _how_far(self) -> tuple[int, int | None, str]:
        """(bytes done, of how many if known, and which bytes: "compressed" or "decompressed")."""
        p = self.progress
        if p.compressed is not None and p.compressed_total:
            return p.compressed, p.compressed_total, "compressed"
        return p.decompressed, p.decompressed_total, "decompressed"

    def report(self) -> dict[str, object]:
        """For tarfuse --status: how far the pass is, and where its index and spill are, with their sizes."""
        done, total, unit = self._how_far()
        rate = None if self.progress.done else done / max(time.monotonic() - self.progress.started, 1e-3)
        report: dict[str, object] = {
            "job": "indexing",
            "state": self.state,
            "source": self._source.path,
            "unit": unit,
            "done_bytes": done,
            "total_bytes": total,
            "percent": round(100 * done / total, 1) if total else None,
            "rate_bytes_per_s": None if rate is None else round(rate),
            "eta_s": round((total - done) / rate) if rate and total else None,
            "progress": self.status(),  # the line the terminal and the log show, for --status to print
            "index": self._index_path,
            "index_size": self.index_saved,
            "spill": None,
            "spill_size": None,
        }
        if (writing := self._spill) is not None:
            report["spill"], report["spill_size"] = writing.shown, _file_size(writing.file.fileno())
        elif (served := self._source.spill) is not None:
            report["spill"], report["spill_size"] = served, self._source.spill_size()
        return report

    def announce(self) -> None:
        """Say once, at mount, which side files the pass will write and how large they may grow."""
        source, where = self._source, self._index_path
        if where is None:
            log.info("%s: no seek index will be kept (-o noindex, or no safe place)", source.path)
        else:
            log.info("%s: the seek index will be kept in %s (%s)", source.path, where, self._index_bound())
        if not source.needs_spill():
            return
        length = (
            f"the {_mib(source.size)} it decompresses to" if source.size_known else "what it decompresses to"
        )
        bound = self._spill_limit
        limit = "no bound" if bound is None else f"at most {_mib(bound)} on disk: -o spill_max"
        place = f"in {spill_path(where)}" if where is not None else "to an unnamed file (no index file)"
        log.info(
            "%s: the stream can only be read forward: a spill of %s, zstd-compressed (%s), will be "
            "written %s, for reads backwards",
            source.path,
            length,
            limit,
            place,
        )

    def _index_bound(self) -> str:
        """How large the index file may grow: gzip's checkpoints keep a 32 KiB window each."""
        if self._source.compression == "gzip":
            most = self._source.archive.size // GZIP_CHUNK_SIZE * (32 << 10) + (64 << 10)
            return f"at most about {_mib(most)}"
        return "a few KiB"


def _file_size(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_size
    except OSError:
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
