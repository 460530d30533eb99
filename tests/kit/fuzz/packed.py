"""Compressed and remote fuzz cases: how a case's tar is compressed, and the CLI's path to its bytes.

A `Packing` says which compressor, into how many members, frames or streams (one: zstd and xz have no
restart point but the start, and the mount copies the stream into a spill), and what damage is done to the
compressed bytes, if any. `Mount` runs what `tarfuse ARCHIVE MNT` runs before and after mount(2), without
FUSE: mount.assemble (the image as soon as its headers are decompressed, the background pass, and the
served file, whose reads also check that the archive is still sound), with
`-o noindex` so that nothing is kept on disk. A local archive is a memfd, opened through /proc/self/fd as
the libraries open a path; a remote one is served over HTTP from this process (kit/httpserver.py).
"""

import atexit
import bz2
import contextlib
import itertools
import lzma
import os
import random
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pyzstd

from kit.httpserver import RangeServer, serve
from tarfuse import cli, mount

COMPRESSIONS = {"gzip": 4, "zstd": 3, "xz": 3, "bzip2": 2}  # name -> weight among compressed cases
SUFFIXES = {"gzip": ".gz", "zstd": ".zst", "xz": ".xz", "bzip2": ".bz2"}
DAMAGED = 0.1  # share of compressed cases whose compressed bytes are damaged


def _gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip member
    return compressor.compress(data) + compressor.flush()


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, preset=0)


def _bzip2(data: bytes) -> bytes:
    return bz2.compress(data, 1)


_COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": _gzip,
    "zstd": pyzstd.compress,
    "xz": _xz,
    "bzip2": _bzip2,
}


@dataclass(frozen=True, slots=True)
class Packing:
    """How a case's tar is compressed: `cuts` split it into members, frames or streams put back to back."""

    compression: str
    cuts: tuple[int, ...] = ()  # offsets in the tar where a new member, frame or stream starts
    damage: tuple[str, int, int] | None = None  # ("flip", per mille of the length, xor) or ("cut", ...)

    def pack(self, data: bytes) -> bytes:
        """The compressed archive; the same bytes for the same `data` on every run."""
        bounds = [0, *(c for c in self.cuts if 0 < c < len(data)), len(data)]
        compress = _COMPRESSORS[self.compression]
        out = bytearray(b"".join(compress(data[a:b]) for a, b in itertools.pairwise(bounds)))
        if self.damage is not None and out:
            kind, permille, xor = self.damage
            at = max(10, len(out) * permille // 1000) % len(out)  # past the magic number, mostly
            if kind == "cut":
                del out[at:]
            else:
                out[at] ^= xor
        return bytes(out)

    def describe(self) -> str:
        parts = f", {len(self.cuts) + 1} parts" if self.cuts else ""
        damage = "" if self.damage is None else f", {self.damage[0]} at {self.damage[1] / 10:.1f}%"
        return f"{self.compression}{parts}{damage}"


def choose_packing(rng: random.Random, size: int, damage: bool = True) -> Packing:
    """A compression, one part or two (cut at a random place), and now and then damage."""
    compression = rng.choices(list(COMPRESSIONS), list(COMPRESSIONS.values()))[0]
    cuts = (rng.randrange(1, max(2, size)),) if rng.random() < 0.5 else ()
    hurt = None
    if damage and rng.random() < DAMAGED:
        hurt = (rng.choice(["flip", "flip", "cut"]), rng.randrange(1000), rng.randrange(1, 256))
    return Packing(compression, cuts, hurt)


_running = contextlib.ExitStack()  # holds this process's HTTP server, once a remote case has started it
_server: list[RangeServer] = []


def _http_server() -> RangeServer:
    """The server remote cases are read from: started at the first, running until the process ends."""
    if not _server:
        _server.append(_running.enter_context(serve()))
        atexit.register(_running.close)  # while its thread runs: at finalization, shutdown() would hang
    return _server[0]


class Mount:
    """What a mount of `archive` (the bytes given to tarfuse) serves, set up by the CLI's own functions.

    `remote`: the archive is served over HTTP, and mounted by its URL.

    Raises (from the constructor):
        ArchiveError: the archive is refused, as `tarfuse ARCHIVE MNT` would refuse it.
    """

    def __init__(self, archive: bytes, remote: bool = False) -> None:
        self._fd = os.memfd_create("tarfuse-fuzz-case")
        try:
            os.write(self._fd, archive)
            options = cli.split_mount_options(["noindex"])
            where = f"/proc/self/fd/{self._fd}"
            if remote:
                where = _http_server().put("case.tar", archive)
            self._assembly = mount.assemble(where, options)
        except BaseException:
            os.close(self._fd)
            raise
        self.image, self._job, self._served = (
            self._assembly.image,
            self._assembly.background,
            self._assembly.served[0],
        )

    def run_pass(self) -> None:
        """Run the background pass (indexing, looking for other images, the spill) to its end, here."""
        if self._job is not None:
            self._job.run(threading.Event())

    def read(self, offset: int, size: int) -> bytes:
        """Read the served file as FUSE would (TarfuseError is EIO, with its message logged)."""
        return bytes(self._served.read(offset, size))

    def close(self) -> None:
        self._assembly.close()
        os.close(self._fd)

    def __enter__(self) -> "Mount":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
