"""The seek index of a compressed archive: where it is kept, its file format, and loading it.

The index file is one header line of JSON (the archive's identity, the compression, the decompressed size, the
length and SHA-256 of the library's index, the length of the spill if there is one) and the library's index
after it; in between, the tar's member list if the pass wrote one down (tar/listing.py), and a gzip
index's table of seek points and its last points' windows (gztable.py): what a host that mounts it from a
server reads first. It is used only if all of that matches the archive
as it is now (anything else is rebuilt), and only if the caller or root wrote it where nobody else could
change it (sidefiles.py): everything in the
header is something anyone who can stat the archive can compute. So the index goes beside the archive only
when nobody but the caller or root can change the archive's directory, and otherwise into the caller's
cache directory. The background pass (passes.py) decompresses the whole stream once, with its own decoder,
walking the tar headers on the way to find other image candidates. A stream with no restart point but
its start (one zstd frame, one xz block) is also copied into a spill (spill.py) beside the index file,
which the index file then names: it is trusted on the same terms, checked on the descriptor it is then
read through, and its first chunk is compared with the archive's before it is served.
"""

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from tarfuse.errors import ArchiveError, RemoteError
from tarfuse.sources import cachedir, gztable, sidefiles
from tarfuse.sources.compressed import CompressedSource
from tarfuse.sources.compression import DecodeError
from tarfuse.sources.file import Identity

log = logging.getLogger(__name__)

MAGIC = b"tarfuse-index 1\n"
SUFFIX = ".tarfuse-index"
# A published index (beside an object on a server, read by every host that mounts it) is bound to the
# object, not to where it was made: its size, its ETag if it has one, and a digest of its first and last
# SAMPLE bytes (what a local file has instead), so that one made from a local copy fits its upload.
SAMPLE = 64 * 1024
PUBLISHED_MAX = 64 * 1024 * 1024  # bytes of a published index read at most: an index of a few GiB is far less
# A host first asks for this much of a published index: its header, the table of a gzip index's seek points
# and its last points' windows (gztable.py), and the windows at the stream's start; a longer table comes in
# one more request, and an index no longer than this whole in the first.
PUBLISHED_HEAD = 256 * 1024
SPILL_SUFFIX = ".tarfuse-spill.zst"
_SECTIONS = ("members", "table", "ends")  # between the header line and the blob, in this order


def default_path(archive_path: str, ident: Identity, beside: bool = True) -> str | None:
    """Where the index of an archive goes: beside it, else the cache directory; None: nowhere safe (logged).

    Beside it only if `beside`, nobody but the caller or root can change its directory (for root,
    writable says nothing: root may write anywhere), and the caller can write there on a writable file
    system. The cache directory is sidefiles.cache_dir(), keyed by the archive's path and identity.
    """
    absolute = os.path.abspath(archive_path) if beside else archive_path
    untrusted = ""
    if beside:
        directory = os.path.dirname(absolute)
        try:
            sidefiles.check_directory(directory)
            if os.access(directory, os.W_OK) and not os.statvfs(directory).f_flag & os.ST_RDONLY:
                return absolute + SUFFIX
        except OSError as exc:
            untrusted = exc.strerror or str(exc)
    try:
        cache = sidefiles.cache_dir()
    except sidefiles.Untrusted as exc:
        log.warning(
            "keeping no index on disk: no cache directory that only you (or root) can change (%s); "
            "set XDG_CACHE_HOME to a directory of yours, mode 0700, or choose with -o index=PATH",
            exc.strerror,
        )
        return None
    key = hashlib.sha256(json.dumps([absolute, *ident]).encode()).hexdigest()[:32]
    where = os.path.join(cache, key + SUFFIX)
    if untrusted:
        _say_why_not_beside(absolute, where, untrusted)
    return where


def _say_why_not_beside(archive: str, where: str, reason: str) -> None:
    """Log that the index is kept in the cache directory because others can change the archive's directory."""
    planted = [p for p in (archive + SUFFIX, spill_path(archive + SUFFIX)) if os.path.lexists(p)]
    if planted:
        log.warning(
            "ignoring %s: %s, so someone else could have written it; the index is kept in %s",
            " and ".join(planted),
            reason,
            where,
        )
    else:
        log.info("the index is kept in %s, not beside the archive: %s", where, reason)


def spill_path(index_path: str) -> str:
    """Where the spill of the archive whose index is at `index_path` goes: beside it, named like it."""
    return index_path.removesuffix(SUFFIX) + SPILL_SUFFIX


@dataclass(frozen=True, slots=True)
class Loaded:
    size: int
    blob: bytes
    spill: int | None  # the spill's length in bytes, if the index names one
    members: bytes = b""  # the tar's member list, as the pass wrote it down (tar/listing.py), if any


@dataclass(frozen=True, slots=True)
class Published:
    """A published index that was loaded: its name, and the member list it carries (b"": none), which the
    mount parses and checks (tar/listing.py) and which saves it reading the headers."""

    name: str
    members: bytes


Fits = Callable[
    [dict[str, object], "CompressedSource"], None
]  # raises Unusable unless an index is the source's


class Unusable(Exception):
    """An index file that is there but cannot be used; the message says why."""


def load(path: str, source: CompressedSource) -> Loaded | None:
    """Read and check the index file; None if there is none; raise Unusable if it cannot be used."""
    try:
        with sidefiles.open_trusted(path) as file:
            data = file.read()
    except FileNotFoundError:
        return None
    except sidefiles.Untrusted as exc:
        raise Unusable(f"it is not trusted: {exc.strerror}") from None
    except OSError as exc:
        raise Unusable(f"cannot read it ({exc.strerror})") from None
    return _parse(data, source, _fits_local)


def _fits_local(header: dict[str, object], source: CompressedSource) -> None:
    wanted = {"identity": source.identity(), "compression": source.compression}
    if any(header.get(k) != v for k, v in wanted.items()):
        raise Unusable("it belongs to another version of the archive (stale)")


def _parse(data: bytes, source: CompressedSource, fits: Fits) -> Loaded:
    """Check an index file's framing, checksum and fields, and that it `fits` the source."""
    if not data.startswith(MAGIC):
        raise Unusable("not a tarfuse index")
    line, _, rest = data[len(MAGIC) :].partition(b"\n")
    header = _header(line, source, fits)
    blob = rest[_extra_length(header) :]
    if header["length"] != len(blob) or header["sha256"] != hashlib.sha256(blob).hexdigest():
        raise Unusable("it is damaged (checksum mismatch)")
    return Loaded(header["size"], blob, header.get("spill"), _members_in(header, rest))


def _members_in(header: dict[str, Any], extra: bytes) -> bytes:
    """The member list at the start of what follows the header line, if its checksum is the header's."""
    members = extra[: header.get("members", 0)]
    if members and header.get("members_sha256") != hashlib.sha256(members).hexdigest():
        raise Unusable("its member list is damaged (checksum mismatch)")
    return members


def _header(line: bytes, source: CompressedSource, fits: Fits) -> dict[str, Any]:
    """An index file's header line, its fields checked, and that it `fits` the source."""
    try:
        header = json.loads(line)
        if not isinstance(header, dict):
            raise Unusable("its header is damaged (not an object)")
        fits(header, source)
        size, spill, length = header["size"], header.get("spill"), header["length"]
        if type(size) is not int or size < 0 or not (spill is None or type(spill) is int):
            raise Unusable("its size field is wrong")
        if type(length) is not int or length < 0 or not isinstance(header["sha256"], str):
            raise Unusable("its length or checksum field is wrong")
        if any(type(header.get(k, 0)) is not int or header.get(k, 0) < 0 for k in _SECTIONS):
            raise Unusable("its table field is wrong (an index made by an older tarfuse)")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Unusable(f"its header is damaged ({exc.__class__.__name__})") from None
    return header


def save(
    path: str,
    source: CompressedSource,
    size: int,
    blob: bytes,
    spill: int | None = None,
    members: bytes | None = None,
) -> int:
    """Write the index atomically and privately (sidefiles.write_file); `spill`: the spill's length;
    `members`: the tar's member list (tar/listing.py), if the pass wrote one down. Return the index
    file's length.

    Raises:
        OSError: sidefiles.Untrusted if someone else could change the directory; what writing said.
    """
    header = {
        "identity": source.identity(),
        "portable": portable_binding(source),
        "compression": source.compression,
        "size": size,
        "length": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        **({} if spill is None else {"spill": spill}),
    }
    extra = members or b""  # what a host of a fleet reads first, after the header line
    if members:
        header["members"], header["members_sha256"] = len(members), hashlib.sha256(members).hexdigest()
    if source.compression == "gzip" and (table := gztable.table_of(blob)) is not None:
        ends = gztable.ends_of(table, blob)  # (_lazy_windows)
        header["table"], header["ends"], extra = len(table), len(ends), extra + table + ends
    data = MAGIC + json.dumps(header).encode() + b"\n" + extra + blob
    sidefiles.write_file(path, data)
    return len(data)


def portable_binding(source: CompressedSource) -> dict[str, object]:
    """What binds an index to the archive wherever it is kept: size, ETag, a digest of its two ends."""
    archive = source.archive
    identity = archive.identity()
    return {
        "size": archive.size,
        "etag": portable_etag(identity),
        "sample": _sample(archive.read_at, archive.size),
    }


def _sample(read_at: Callable[[int, int], bytes], size: int) -> str:
    digest = hashlib.sha256(read_at(0, min(size, SAMPLE)))
    digest.update(read_at(max(size - SAMPLE, 0), min(size, SAMPLE)))
    return digest.hexdigest()


def use_published(source: CompressedSource) -> Published | None:
    """Load the index published beside a remote archive (`<object>.tarfuse-index`), if there is one that
    fits it; return it, or None (an unfit one is ignored, with one line: the mount goes on without).

    Its first PUBLISHED_HEAD bytes come in one request; an index that is longer and has a table of seek
    points (gzip) is read a window at a time as reads need them (gztable.py), any other is read whole.
    It is someone else's input, trusted as far as the object it sits beside (whoever can write it beside
    the object can usually write the object): PUBLISHED_MAX bytes at most, its fields and bounds checked,
    its checksum (read whole) or each window's digest (read lazily), bound to this object (size, and its
    ETag, or if it was made from a copy without one, the digest of the object's two ends), refused if it
    names a spill (which is local), and given to the decoder, which refuses what it cannot parse.
    """
    name = source.archive.path + SUFFIX
    try:
        head = _published_head(source)
        if head is None:
            return None
        data, total, line_end = head
        header = _header(data[len(MAGIC) : line_end], source, _fits_published)
        if header.get("spill") is not None:
            raise Unusable("it names a spill, which only a local index can")
        table_start = line_end + 1
        blob_start = table_start + _extra_length(header)
        if header["length"] != total - blob_start:
            raise Unusable("it is damaged (its length is not the one its header says)")
        if len(data) < total and header.get("table"):
            if len(data) < blob_start:  # a long table: the rest of it, and the last windows, at once
                data += _published_part(source, len(data), blob_start - len(data))
            extra, rest = data[table_start:blob_start], data[blob_start:]
            members = _members_in(header, extra)
            windows = _lazy_windows(source, header, extra[len(members) :], rest, blob_start)
            _spot_check(source, windows.points, windows.window)
            source.load_lazy_index(windows, header["size"])
            how = "its windows fetched as reads need them"
        else:
            if len(data) < total:
                data += _published_part(source, len(data), total - len(data))
            loaded = _parse(data, source, _fits_published)
            if source.compression == "gzip" and (table := gztable.table_of(loaded.blob)) is not None:
                points = gztable.parse_table(table, len(loaded.blob))[0]
                _spot_check(source, points, lambda i: points[i].window_in(loaded.blob))
            source.load_index(loaded.blob, loaded.size)
            members, how = loaded.members, "whole"
    except (Unusable, DecodeError, ArchiveError) as exc:
        log.warning("ignoring the published index %s: %s", name, exc)
        return None
    log.info(
        "loaded the published index %s (%s)%s: decompressed size %d, no indexing pass needed",
        name,
        how,
        " with the tar's member list" if members else "",
        header["size"],
    )
    return Published(name, members)


def _published_head(source: CompressedSource) -> tuple[bytes, int, int] | None:
    """The first part of a published index, with at least its header line: (bytes, the index's length,
    where its header line ends); None if there is none."""
    found = source.archive.beside_part(SUFFIX, 0, PUBLISHED_HEAD)
    if found is None:
        return None
    data, total = found
    if total > PUBLISHED_MAX:
        raise Unusable(f"it is {total} bytes, more than {PUBLISHED_MAX}")
    if not data.startswith(MAGIC):
        raise Unusable("not a tarfuse index")
    line_end = data.find(b"\n", len(MAGIC))
    if line_end < 0:
        damaged = "it is damaged (it ends in its header)" if len(data) >= total else ""
        raise Unusable(damaged or f"its header is longer than {PUBLISHED_HEAD} bytes")
    return data, total, line_end


def _published_part(source: CompressedSource, offset: int, size: int) -> bytes:
    found = source.archive.beside_part(SUFFIX, offset, size)
    if found is None or len(found[0]) != size:
        raise Unusable("it changed or went away while it was read")
    return found[0]


def _lazy_windows(
    source: CompressedSource, header: dict[str, object], extra: bytes, head: bytes, blob_start: int
) -> gztable.LazyWindows:
    """The windows of a gzip index, fetched from the published index as the chunks that need them are
    read (gztable.py). `extra`: the table of seek points and the last points' windows, which follow the
    header line; `head`: the start of the blob, which came with them (its windows are taken at once)."""
    table_length = int(str(header["table"]))
    points, tail = gztable.parse_table(extra[:table_length], int(str(header["length"])))

    def fetch(position: int, size: int) -> bytes:  # from a read: its failure is the read's (EIO)
        found = source.archive.beside_part(SUFFIX, blob_start + position, size)
        if found is None or len(found[0]) != size:
            raise RemoteError(f"{source.archive.path}{SUFFIX}: it went away or changed while mounted", None)
        return found[0]

    return gztable.LazyWindows(points, tail, fetch, head, extra[table_length:])


def _spot_check(
    source: CompressedSource, points: list[gztable.Point], window_of: Callable[[int], bytes]
) -> None:
    """Raise Unusable unless a published gzip index's first seek point decompresses, with its window
    (`window_of(i)`: point i's), to the archive's bytes (gztable.decompresses_right): the rest cannot be
    checked without the pass."""
    if (checked := gztable.point_to_check(points)) is None:
        return
    point = points[checked]
    span = source.archive.read_at(0, point.into + gztable.CHECK_INPUT)  # one read: the first fetch's span
    if not gztable.decompresses_right(span, point, window_of(checked)):
        raise Unusable(f"its seek point at {point.out} does not decompress to the archive's bytes")


def _extra_length(header: dict[str, Any]) -> int:
    """The bytes between an index's header line and its blob, whose lengths the header gives: the tar's
    member list if the pass wrote one down, then a gzip index's table of seek points and its last
    points' windows (gztable.ends_of)."""
    return sum(int(header.get(k, 0)) for k in _SECTIONS)


def _fits_published(header: dict[str, object], source: CompressedSource) -> None:
    """Raise Unusable unless the published index's binding is this object's."""
    bound = header.get("portable")
    if not isinstance(bound, dict) or header.get("compression") != source.compression:
        raise Unusable("it is not an index of this kind of archive")
    archive = source.archive
    if bound.get("size") != archive.size:
        raise Unusable(f"it is the index of another object ({bound.get('size')!r} bytes, not {archive.size})")
    mine = portable_etag(archive.identity())
    if isinstance(bound.get("etag"), str) and mine is not None:
        if bound["etag"] != mine:
            raise Unusable("it is the index of another version of the object (another ETag)")
        return
    if bound.get("sample") != _sample(archive.read_at, archive.size):
        raise Unusable("it is the index of another object (its first and last bytes differ)")


def portable_etag(identity: Identity) -> str | None:
    return identity[2] if len(identity) > 2 and isinstance(identity[2], str) else None


def use_saved_index(path: str, source: CompressedSource) -> bool:
    """Load the index at `path` into `source` if it is valid; log why if it is there but unusable.

    First remove what a killed tarfuse left in that directory (sidefiles.remove_stale).
    """
    remove_stale(os.path.dirname(os.path.abspath(path)))
    try:
        loaded = load(path, source)
        if loaded is None:
            return False
        _use(path, loaded, source)
    except Unusable as exc:
        log.warning("index %s is unusable: %s; rebuilding it", path, exc)
        return False
    log.info("loaded index %s: decompressed size %d, no indexing pass needed", path, loaded.size)
    return True


def _use(path: str, loaded: Loaded, source: CompressedSource) -> None:
    """Give `source` the loaded index, or serve it from the spill the index names; raise Unusable if not."""
    if loaded.spill is None:
        try:
            source.load_index(loaded.blob, loaded.size)
        except DecodeError as exc:
            raise Unusable(f"the decompressor refused it ({exc})") from None
        return
    where = spill_path(path)
    try:
        file = sidefiles.open_trusted(where)
    except sidefiles.Untrusted as exc:
        raise Unusable(f"its spill {where} is not trusted: {exc.strerror}") from None
    except OSError as exc:
        raise Unusable(f"its spill {where} cannot be read ({exc.strerror})") from None
    try:
        _serve_spill_file(where, file, loaded, source)
    except BaseException:
        file.close()
        raise
    log.info("reads are served from the spill %s", where)


def _serve_spill_file(where: str, file: BinaryIO, loaded: Loaded, source: CompressedSource) -> None:
    """Serve from the spill `file` if it is the one the index names; raise Unusable if not."""
    try:
        if os.fstat(file.fileno()).st_size != loaded.spill:
            raise Unusable(f"its spill {where} is not the one it names (another length)")
        source.serve_spill(where, loaded.size, file, check_start=True)
    except OSError as exc:
        raise Unusable(f"its spill {where} cannot be read ({exc.strerror})") from None
    except DecodeError as exc:
        raise Unusable(f"its spill {where} is damaged ({exc})") from None


def keep_cache_bounded(path: str, source: CompressedSource, cache_max: int) -> None:
    """If the index at `path` is an entry of the cache directory, hold it and keep the directory within
    `cache_max` (cachedir.py: entries of gone or changed archives, then the least recently used); log."""
    for line in cachedir.use(path, source, cache_max):
        log.info("%s", line)


def remove_stale(directory: str) -> None:
    """Remove the temporary files a killed tarfuse of ours left in `directory`; log each."""
    try:
        removed = sidefiles.remove_stale(directory)
    except OSError:
        return  # missing, or others can change it: we write nothing there, so nothing of ours is there
    for name in removed:
        log.info("removed %s, left behind by a tarfuse that did not finish", os.path.join(directory, name))
