"""The cache directory's bound: what a mount removes from it before it adds to it.

The cache directory (sidefiles.cache_dir) keeps the seek index and spill of every archive whose own
directory cannot take them: a URL, an archive on a read-only file system or in a directory others can
change, a compressed member. index.py names them KEY.tarfuse-index and KEY.tarfuse-spill.zst, KEY a
hash of the archive's path and version, so a rewritten archive gets a new entry and the old one stays.
This module adds KEY.tarfuse-use: what the entry belongs to (a local archive's path and identity, JSON),
and a lock that every mount of the entry holds, shared, for its life (flock(2): it goes with the last
process that holds it, however that ends, and survives the daemon's fork).

At mount, when the index is kept there, the directory is swept:
- the entries of a local archive that is gone, or is another version now (device, inode, size, mtime:
  what keyed it), are removed; a URL's never are for that (nothing here says that it changed);
- then the least recently used entries (the use file's mtime is touched at every mount) until what is
  left takes at most -o cache_max (DEFAULT_CACHE_MAX in sources/__init__.py).

Never logs (index.keep_cache_bounded, the boundary, logs what `use` reports). Never removed: an entry
in use, whose lock a mount holds, or with a temporary file of a tarfuse still
running (sidefiles.remove_stale removes those of the dead). Only names of ours, only regular files owned
by the caller, only in a trusted directory; a sweeper takes the entry's lock exclusively before it
unlinks anything, so a mount that starts meanwhile waits, then finds the entry gone and rebuilds it.

`tarfuse --cache` lists the entries (`kept`) and, with --prune, removes every one no mount uses (`prune`),
by the same rules.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
from dataclasses import dataclass, field

from tarfuse.sources import sidefiles
from tarfuse.sources.file import ByteSource, Identity, IndexHome

USE_SUFFIX = ".tarfuse-use"
_INDEX = "tarfuse-index"  # index.SUFFIX and SPILL_SUFFIX without the dot (index.py imports this module)
_SPILL = "tarfuse-spill.zst"
_KEY = re.compile(r"[0-9a-f]{32}")  # index.default_path: the first 32 hex digits of a SHA-256
_RECORD_MAX = 1 << 16  # a use file holds one path and an identity
_HOLD_TRIES = 5  # a use file replaced under us (a sweeper removed it) is made again, a few times at most

_held: list[int] = []  # the use locks this process holds, for its life (and its daemon's, after fork)


@dataclass
class Entry:
    """The files of one key in the cache directory."""

    key: str
    paths: list[str] = field(default_factory=list)
    size: int = 0  # bytes on disk
    used: float = 0.0  # the latest mtime of its files
    writing: bool = False  # a temporary file of a running tarfuse is among them
    record: dict[str, object] = field(default_factory=dict)  # its use file's


def use(index_path: str, source: ByteSource, cache_max: int) -> list[str]:
    """At mount: if `index_path` is an entry of the cache directory, hold it and sweep the directory;
    return what to log (what was removed, and why; what failed).

    Failures are reported, not raised: the cache is an optimisation, the mount goes on.
    """
    directory = _cache_directory_of(index_path)
    if directory is None:
        return []
    key = os.path.basename(index_path).split(".", 1)[0]
    local = os.path.abspath(source.path) if source.index_home is IndexHome.BESIDE else None  # a local file
    said = []
    try:
        hold(directory, key, local, source.identity())
    except OSError as exc:
        said.append(f"cache {directory}: cannot mark {key} in use ({exc.strerror or exc})")
    try:
        stale = sidefiles.remove_stale(directory)
        said += [
            f"removed {os.path.join(directory, name)}, left behind by a tarfuse that did not finish"
            for name in stale
        ]
        removed = sweep(directory, cache_max)
    except OSError as exc:
        return [*said, f"cache {directory}: cannot sweep it ({exc.strerror or exc})"]
    return said + [f"cache {directory}: removed {e.key} ({_mib(e.size)}): {why}" for e, why in removed]


def _cache_directory_of(index_path: str) -> str | None:
    """The cache directory, real, if `index_path` is named as index.py names an entry there; else None."""
    key, _, rest = os.path.basename(index_path).partition(".")
    if _KEY.fullmatch(key) is None or rest != _INDEX:
        return None
    try:
        cache = sidefiles.cache_dir()
    except sidefiles.Untrusted:
        return None
    with contextlib.suppress(OSError):
        if os.path.samefile(os.path.dirname(os.path.abspath(index_path)), cache):
            return cache
    return None


def hold(directory: str, key: str, archive: str | None, identity: Identity) -> None:
    """Hold entry `key` of `directory` in use (a shared lock, kept until this process and its forks end).

    Records, in a use file made now, the local archive the entry belongs to (`archive`: its absolute
    path; None for a URL or a member), and touches the file: its mtime is the entry's last use.
    """
    path = os.path.join(directory, key + USE_SUFFIX)
    record = json.dumps({"archive": archive, "identity": identity}).encode()
    for _ in range(_HOLD_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a sweeper removes the entry
            if _still_named(fd, path):
                if os.fstat(fd).st_size == 0:
                    os.pwrite(fd, record, 0)
                os.utime(fd)
                _held.append(fd)
                return
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed while we waited: make it again
    raise OSError(errno.EAGAIN, "its use file keeps being removed", path)


def _still_named(fd: int, path: str) -> bool:
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def sweep(directory: str, cache_max: int) -> list[tuple[Entry, str]]:
    """Remove the entries of gone or changed archives, then the least recently used past `cache_max`
    bytes, never one in use; return what was removed, and why.

    Raises:
        OSError: sidefiles.Untrusted if someone else could change `directory`; what listing it said.
    """
    real = sidefiles.check_directory(directory)
    sidefiles.remove_stale(real)  # what a tarfuse killed while writing left: not in use
    entries = _entries(real)
    removed = []
    for entry in entries:
        why = _gone_or_changed(entry.record)
        if why is not None and _remove(real, entry):
            removed.append((entry, why))
    left = sorted((e for e in entries if all(e is not r for r, _ in removed)), key=lambda e: e.used)
    total = sum(e.size for e in left)
    for entry in left:
        if total <= cache_max:
            break
        if _remove(real, entry):
            total -= entry.size
            removed.append((entry, f"least recently used, past cache_max={_mib(cache_max)}"))
    return removed


def _entries(directory: str) -> list[Entry]:
    """Every entry of the cache directory: our names, regular files of the caller's, grouped by key."""
    found: dict[str, Entry] = {}
    with os.scandir(directory) as listing:
        for item in listing:
            key, kind = _entry_name(item.name)
            if key is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                info = item.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                    continue
                entry = found.setdefault(key, Entry(key))
                entry.paths.append(item.path)
                entry.size += info.st_blocks * 512
                entry.used = max(entry.used, info.st_mtime)
                entry.writing = entry.writing or kind == "temporary"
                if kind == "use":
                    entry.record = _read_record(item.path)
    return list(found.values())


def _entry_name(name: str) -> tuple[str | None, str]:
    """(key, kind) of a name of ours in the cache directory: index, spill, use or temporary; (None, "")."""
    key, _, rest = name.partition(".")
    if _KEY.fullmatch(key) is None:
        return None, ""
    if rest == USE_SUFFIX[1:]:
        return key, "use"
    if rest in (_INDEX, _SPILL):
        return key, "file"
    if rest.startswith((_INDEX + ".", _SPILL + ".")) and name.endswith(sidefiles.TEMPORARY_SUFFIX):
        return key, "temporary"  # sidefiles.create's NAME.PID.XXXXXXXX.tarfuse-tmp
    return None, ""


def _read_record(path: str) -> dict[str, object]:
    """What a use file says the entry belongs to; {} if it says nothing readable."""
    try:
        with open(path, "rb") as file:
            record = json.loads(file.read(_RECORD_MAX))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _gone_or_changed(record: dict[str, object]) -> str | None:
    """Why the local archive an entry belongs to is not the one it was made of, or None (or unknown)."""
    archive, identity = record.get("archive"), record.get("identity")
    if not (isinstance(archive, str) and os.path.isabs(archive) and isinstance(identity, list)):
        return None  # a URL's, a member's, or older than use files: only the LRU removes it
    if len(identity) < 4 or not all(type(value) is int for value in identity[:4]):
        return None
    try:
        info = os.stat(archive)
    except (FileNotFoundError, NotADirectoryError):
        return f"its archive {archive!r} is gone"
    except OSError:
        return None  # cannot tell
    if [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns] != identity[:4]:
        return f"its archive {archive!r} changed since"
    return None


def _remove(directory: str, entry: Entry) -> bool:
    """Remove the files of `entry` unless it is in use; whether it was removed."""
    if entry.writing:
        return False
    use_path = os.path.join(directory, entry.key + USE_SUFFIX)
    fd = os.open(use_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a mount holds it
        for path in {*entry.paths, use_path}:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return True
    finally:
        os.close(fd)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# --- tarfuse --cache ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kept:
    """One entry of the cache directory, as `tarfuse --cache` shows it."""

    key: str
    archive: str | None  # a local archive's path or a URL (no secrets: remote.display_name); None: not said
    member: bool  # made of a compressed member inside that archive
    kinds: tuple[str, ...]  # its side files: "index", "spill"
    size: int  # bytes on disk, its use file and temporary files included
    used: float  # its last use, as a Unix time: the latest mtime of its files
    in_use: bool  # a running mount holds it
    writing: bool  # a running tarfuse writes one of its files


@dataclass(frozen=True, slots=True)
class Pruned:
    """What `prune` did: the entries it removed, the temporary files of dead tarfuses (name, bytes) it
    removed, and the entries it kept because a mount uses them or a tarfuse writes them."""

    removed: list[Kept]
    stale: list[tuple[str, int]]
    kept: list[Kept]

    @property
    def freed(self) -> int:
        return sum(k.size for k in self.removed) + sum(size for _, size in self.stale)


def existing_cache_dir() -> tuple[str | None, str]:
    """The cache directory that a mount would use, without making it: (its real path, "") if it exists,
    else (None, why: where a mount would make it, or why no directory will do).

    The candidates are sidefiles.cache_dir's, in its order: it takes the first it can make or find trusted.
    """
    reasons = []
    for candidate in sidefiles._cache_candidates():
        try:
            if not os.path.lexists(candidate):
                sidefiles.check_directory(_nearest_existing(candidate))
                return None, f"no cache directory: {candidate} does not exist (a mount would make it)"
            return sidefiles.check_directory(candidate), ""
        except OSError as exc:
            reasons.append(f"{candidate}: {exc.strerror or exc}")
    return None, "no cache directory will do: " + ("; ".join(reasons) or "no home directory")


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def kept(directory: str) -> list[Kept]:
    """Every entry of `directory` (the cache directory), the most recently used first.

    Raises:
        OSError: sidefiles.Untrusted if someone else could change `directory`; what listing it said.
    """
    real = sidefiles.check_directory(directory)
    shown = [_kept(real, entry, _in_use(real, entry.key)) for entry in _entries(real)]
    return sorted(shown, key=lambda k: k.used, reverse=True)


def prune(directory: str) -> Pruned:
    """Remove every entry of `directory` that no running mount uses and no running tarfuse writes, and
    the temporary files that dead tarfuses left; say what went and what stayed.

    Raises:
        OSError: sidefiles.Untrusted if someone else could change `directory`; what listing it said.
    """
    real = sidefiles.check_directory(directory)
    sizes = _temporary_sizes(real)
    stale = [(name, sizes.get(name, 0)) for name in sidefiles.remove_stale(real)]
    removed, stayed = [], []
    for entry in _entries(real):
        if _remove(real, entry):
            removed.append(_kept(real, entry, in_use=False))
        else:
            stayed.append(_kept(real, entry, _in_use(real, entry.key)))
    return Pruned(removed, stale, stayed)


def _kept(directory: str, entry: Entry, in_use: bool) -> Kept:
    names = {os.path.basename(p).partition(".")[2] for p in entry.paths}
    kinds = tuple(kind for kind, name in (("index", _INDEX), ("spill", _SPILL)) if name in names)
    archive, member = _belongs_to(entry.record)
    return Kept(entry.key, archive, member, kinds, entry.size, entry.used, in_use, entry.writing)


def _belongs_to(record: dict[str, object]) -> tuple[str | None, bool]:
    """(the archive an entry was made of, whether of a member inside it), as its use file says.

    A local archive's path is the record's "archive"; a URL is the first word of the identity
    (remote.identity, without secrets); a member's identity is its archive's with the header's offset after
    it (member.identity), and a member of a local archive records no path.
    """
    archive, identity = record.get("archive"), record.get("identity")
    words = identity if isinstance(identity, list) else []
    member = len(words) == _MEMBER_WORDS
    if isinstance(archive, str):
        return archive, member
    if words and isinstance(words[0], str):
        return words[0], member
    return None, member


_MEMBER_WORDS = 5  # file.identity or remote.identity (4 words), and the member's header offset


def _in_use(directory: str, key: str) -> bool:
    """Whether a mount holds entry `key`: its use file's lock cannot be taken exclusively, now."""
    try:
        fd = os.open(os.path.join(directory, key + USE_SUFFIX), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # no use file (an entry older than use files): nothing holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the descriptor, at once
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _temporary_sizes(directory: str) -> dict[str, int]:
    """The bytes on disk of every temporary file of ours in `directory`, by name (before remove_stale)."""
    sizes = {}
    with os.scandir(directory) as listing:
        for item in listing:
            if item.name.endswith((sidefiles.TEMPORARY_SUFFIX, ".tmp")):
                with contextlib.suppress(FileNotFoundError):
                    sizes[item.name] = item.stat(follow_symlinks=False).st_blocks * 512
    return sizes
