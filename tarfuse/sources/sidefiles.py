"""Side files (seek index, spill): which directories are safe for them, how to write them, how to read them.

tarfuse runs as root on archives in directories other users can write. A name root writes that someone else
can predict, in a directory someone else can change, can be a symbolic link to any file of root's; a file
root reads back from such a directory can be anyone's. So, as ssh's StrictModes does for ~/.ssh:

- a directory is *trusted* when it and every directory on the way to it (symbolic links followed, each
  one checked) are owned by the caller's effective uid or root and writable by nobody else. The question
  is "could anyone but me or root change this?", never access(2), which says yes to root for everything.
  A sticky directory writable by others (/tmp) may lie on the way: nobody can rename or remove an entry
  there that is not theirs (unlink(2), EPERM with the sticky bit), and every entry on the way must be
  ours or root's. It is never trusted as the place of a name: anyone can create that name there first.
- a side file is written under a fresh name (mkstemp: O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600) in a trusted
  directory, then renamed over its final name: rename(2) replaces a symbolic link, never follows it.
- a side file is read back only from a trusted directory, opened with O_NOFOLLOW, and checked on the
  descriptor that is then read: a regular file, owned by the caller or root, writable by nobody else.

Never logs: failures are `Untrusted` (an OSError) with the reason, and
index.py, the boundary, logs them.
"""

import contextlib
import errno
import os
import pwd
import re
import stat
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

from tarfuse.printable import printable

TEMPORARY_SUFFIX = ".tarfuse-tmp"
SYSTEM_CACHE = "/var/cache/tarfuse"  # root's cache when neither $XDG_CACHE_HOME nor a home is trusted
_MAX_LINKS = 40  # the kernel's limit on symbolic links in one lookup (path_resolution(7), ELOOP)
_PROC_ROOT_INO = 1  # procfs's root directory (PROC_ROOT_INO): its own symbolic links are plain text ones
_PID_MAX = 1 << 22  # the largest pid_max Linux allows (proc(5), /proc/sys/kernel/pid_max)
# Temporary files of ours: NAME.PID.XXXXXXXX.tarfuse-tmp (mkstemp's 8 characters), and the names tarfuse
# used before, NAME.tarfuse-index.PID.tmp and NAME.tarfuse-spill.zst.PID.tmp.
_TEMPORARY = re.compile(
    r".+\.(?P<pid>[0-9]+)\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX)
    + r"|.+\.tarfuse-(?:index|spill\.zst)\.(?P<old_pid>[0-9]+)\.tmp"
)  # fmt: skip


class Untrusted(PermissionError):
    """Someone other than the caller or root could change this directory or file; strerror says who."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(errno.EPERM, reason, path)


def check_directory(path: str, names: bool = True) -> str:
    """Raise Untrusted unless only the caller or root can change `path` and the directories on the way.

    `names=False`: for an unnamed file (O_TMPFILE), which nobody can create first, a sticky directory
    such as /tmp will do. Returns the path with symbolic links resolved.

    Raises:
        Untrusted: with who else could change what.
        OSError: a part of the path is missing or is not a directory.
    """
    real, info = _resolve(os.path.abspath(path))
    _check_directory_entry(real, info, sticky_will_do=not names)
    return real


def _resolve(path: str) -> tuple[str, os.stat_result]:
    """Follow `path` as the kernel would, checking every directory and symbolic link met; lstat at the end."""
    pending = path.split("/")[::-1]  # a stack: the next component is last
    current, info = "/", os.lstat("/")
    _check_directory_entry(current, info, sticky_will_do=True)
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":  # `current` has no symbolic links in it: its parent was checked on the way
            current = os.path.dirname(current)
            info = os.lstat(current)
            continue
        step = os.path.join(current, name)
        found = os.lstat(step)
        if stat.S_ISLNK(found.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            _check_owner(step, found)  # in a sticky directory, a link is its owner's to replace
            target = os.readlink(step)
            if target.startswith("/"):
                current, info = "/", os.lstat("/")
            pending.extend(target.split("/")[::-1])
            continue
        if not stat.S_ISDIR(found.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), step)
        _check_directory_entry(step, found, sticky_will_do=True)
        current, info = step, found
    return current, info


def _check_directory_entry(path: str, info: os.stat_result, sticky_will_do: bool) -> None:
    _check_owner(path, info)
    if info.st_mode & 0o022 and not (sticky_will_do and info.st_mode & stat.S_ISVTX):
        raise Untrusted(f"{path} is {_writable_by(info)}", path)


def _check_owner(path: str, info: os.stat_result) -> None:
    if info.st_uid not in (os.geteuid(), 0):
        raise Untrusted(f"{path} is owned by {_user(info.st_uid)}", path)


def _writable_by(info: os.stat_result) -> str:
    if info.st_mode & 0o002:
        sticky = " (sticky: anyone can create a name there first)" if info.st_mode & stat.S_ISVTX else ""
        return "writable by every user" + sticky
    return f"writable by group {info.st_gid}"


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


@dataclass(frozen=True, slots=True)
class Changer:
    """Someone besides the caller and root who could change what a path leads to.

    `uid` is that user; with `uid` None, `gid` is a group whose members could (a group-writable
    directory), and with both None it is every user (a directory anyone can write).
    """

    uid: int | None
    gid: int | None
    reason: str  # "PATH is owned by uid N (name)", escaped for a log line


def changers(path: str) -> list[Changer]:
    """Who besides the caller and root could change what `path` leads to, in the order the walk met them.

    The path is followed as the kernel would (symbolic links, "..", at most 40 links), each component
    lstat'ed: whoever owns a directory or link on the way, and whoever may write a directory whose
    entries they could replace (not a sticky one's: there only an entry's owner can). The owner of the
    file at the end counts only in a sticky directory, where they could put a link in its place;
    elsewhere they can change its bytes, which are theirs to read, not where the path leads. Where the
    walk cannot go on (a name missing, a loop, a file used as a directory), opening the path fails the
    same way; whoever could write the directory it stopped in could have put the name there first, so
    they count. A magic link in /proc (/proc/PID/fd/N, .../exe, .../cwd) leads to what that process
    holds, not to the text readlink shows (a memfd's "/memfd:x (deleted)" is no path): its owner, the
    process's, controls it, and the walk stops there.

    Never raises OSError: the caller opens the path and reports what open(2) says.
    """
    found: list[Changer] = []
    with contextlib.suppress(OSError):  # lstat of "/" or of a parent walked: the open says what is wrong
        _walk(os.path.abspath(path), found)
    return found


def _walk(path: str, found: list[Changer]) -> None:
    pending = path.split("/")[::-1]  # a stack: the next component is last
    current, info = "/", os.lstat("/")
    _note_owner(found, current, info)
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":  # `current` has no symbolic links in it: its parent was judged on the way
            current = os.path.dirname(current)
            info = os.lstat(current)
            continue
        step = os.path.join(current, name)
        try:
            entry = os.lstat(step)
        except OSError:
            _note_writers(found, current, info)  # anyone who can write here could make the name
            return
        if not info.st_mode & stat.S_ISVTX:
            _note_writers(found, current, info)  # they could rename another entry over this one
        if not stat.S_ISLNK(entry.st_mode) and not stat.S_ISDIR(entry.st_mode):
            if info.st_mode & stat.S_ISVTX:
                _note_owner(found, step, entry)
            return  # the file at the end
        _note_owner(found, step, entry)
        if stat.S_ISLNK(entry.st_mode):
            links += 1
            if links > _MAX_LINKS or _is_magic_link(entry, info):
                return
            target = os.readlink(step)
            if target.startswith("/"):
                current, info = "/", os.lstat("/")
            pending.extend(target.split("/")[::-1])
            continue
        current, info = step, entry


def _is_magic_link(link: os.stat_result, directory: os.stat_result) -> bool:
    """Whether a symbolic link is one of procfs's per-process links, which the kernel follows by the
    object, not by the text (proc(5)); /proc/self and /proc/mounts, in procfs's root, are plain text."""
    try:
        proc = os.lstat("/proc")
    except OSError:
        return False
    return link.st_dev == proc.st_dev and proc.st_ino == _PROC_ROOT_INO and directory.st_ino != proc.st_ino


def _note_owner(found: list[Changer], path: str, info: os.stat_result) -> None:
    if info.st_uid not in (os.geteuid(), 0):
        found.append(Changer(info.st_uid, None, f"{printable(path)} is owned by {_user(info.st_uid)}"))


def _note_writers(found: list[Changer], path: str, info: os.stat_result) -> None:
    if info.st_mode & 0o002:
        found.append(Changer(None, None, f"{printable(path)} is writable by every user"))
    elif info.st_mode & 0o020:
        found.append(Changer(None, info.st_gid, f"{printable(path)} is writable by group {info.st_gid}"))


def make_directory(path: str) -> str:
    """Create `path` (and missing parents, mode 0700) if it is not there; check it is trusted; return it real.

    The nearest existing ancestor must be trusted before anything is created in it: a name created
    in a directory someone else can write could be theirs already.
    """
    missing, probe = [], os.path.abspath(path)
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    check_directory(probe)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another mount of ours
            os.mkdir(directory, 0o700)  # the umask only takes bits away: 0700 stays 0700
    return check_directory(path)


def cache_dir() -> str:
    """The caller's cache directory for side files, created 0700 if needed: the first trusted candidate.

    $XDG_CACHE_HOME/tarfuse, $HOME/.cache/tarfuse, then the home in the password database (`sudo -E`
    keeps another user's $HOME), and for root /var/cache/tarfuse.

    Raises:
        Untrusted: no candidate is trusted; the reason names each.
    """
    reasons = []
    for candidate in _cache_candidates():
        try:
            return make_directory(candidate)
        except OSError as exc:
            reasons.append(f"{candidate}: {exc.strerror}")
    raise Untrusted("; ".join(reasons) or "no home directory")


def _cache_candidates() -> list[str]:
    candidates = []
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # XDG Base Directory Specification: a relative path is invalid, ignore it
        candidates.append(os.path.join(xdg, "tarfuse"))
    homes = (os.environ.get("HOME", ""), _passwd_home())
    candidates += [os.path.join(home, ".cache", "tarfuse") for home in homes if os.path.isabs(home)]
    if os.geteuid() == 0:
        candidates.append(SYSTEM_CACHE)
    return list(dict.fromkeys(candidates))


def _passwd_home() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_dir
    except KeyError:
        return ""


def unnamed_dir() -> str:
    """Where an unnamed side file (O_TMPFILE) may go: the cache directory, else the temporary directory.

    Raises:
        Untrusted: neither is trusted (the temporary directory may be sticky: the file has no name).
    """
    try:
        return cache_dir()
    except Untrusted as exc:
        try:
            return check_directory(tempfile.gettempdir(), names=False)
        except OSError as tmp:
            raise Untrusted(f"{exc.strerror}; {tmp.strerror}") from None


def create(path: str) -> tuple[BinaryIO, str]:
    """A new file, mode 0600, to be renamed to `path` once complete; return it and its temporary name.

    The directory is created (0700) or checked first. The temporary name is ours alone
    (O_CREAT|O_EXCL|O_NOFOLLOW) and holds our pid, so that `remove_stale` can tell when it was left behind.
    """
    directory, name = os.path.split(os.path.abspath(path))
    real = make_directory(directory)
    fd, temporary = tempfile.mkstemp(prefix=f"{name}.{os.getpid()}.", suffix=TEMPORARY_SUFFIX, dir=real)
    return os.fdopen(fd, "w+b"), temporary


def commit(temporary: str, path: str) -> None:
    """Rename a complete file from `create` to its final name, in the directory it was made in."""
    os.replace(temporary, os.path.join(os.path.dirname(temporary), os.path.basename(path)))


def create_unnamed(directory: str) -> BinaryIO:
    """A new file with no name (O_TMPFILE, mode 0600) in `directory`, gone when closed; check the place."""
    return tempfile.TemporaryFile(dir=check_directory(directory, names=False))


def write_file(path: str, data: bytes) -> None:
    """Write `path` whole, privately and atomically: a fresh temporary file, renamed over `path`."""
    file, temporary = create(path)
    try:
        with file:
            file.write(data)
        commit(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def open_trusted(path: str) -> BinaryIO:
    """Open a side file to read it back, if the caller or root made it and nobody else can have changed it.

    The checks are made on the open descriptor, the one that is then read: no check-then-open race.
    A file of the caller's that others can read (made by an older tarfuse) is made 0600.

    Raises:
        Untrusted: the file or its directory could have been changed by someone else.
        OSError: FileNotFoundError if it is not there, or what open(2) said.
    """
    directory, name = os.path.split(os.path.abspath(path))
    where = os.path.join(check_directory(directory), name)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC  # NONBLOCK: a FIFO
    try:
        fd = os.open(where, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Untrusted(f"{path} is a symbolic link", path) from None
        raise
    try:
        _check_file(path, os.fstat(fd))
        _make_private(fd)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_file(path: str, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise Untrusted(f"{path} is not a regular file", path)
    _check_owner(path, info)
    if info.st_mode & 0o022:
        raise Untrusted(f"{path} is {_writable_by(info)}", path)


def _make_private(fd: int) -> None:
    info = os.fstat(fd)
    if info.st_uid == os.geteuid() and info.st_mode & 0o077:
        os.fchmod(fd, stat.S_IMODE(info.st_mode) & 0o700)


def remove_stale(directory: str) -> list[str]:
    """Remove the temporary files of ours in `directory` whose process is gone; return their names.

    Only in a trusted directory, only regular files owned by the caller, only our own naming (a tarfuse
    killed while writing a spill leaves one as large as the archive behind). A pid that is running (or
    running again, reused) keeps its file.
    """
    real = check_directory(directory)
    removed = []
    with os.scandir(real) as entries:
        for entry in entries:
            if (match := _TEMPORARY.fullmatch(entry.name)) is None:
                continue
            info = entry.stat(follow_symlinks=False)
            pid = int(match["pid"] or match["old_pid"])
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and not _running(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed


def _running(pid: int) -> bool:
    """Whether process `pid` exists; a number that cannot be a pid counts as running (leave its file)."""
    if not 0 < pid <= _PID_MAX:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
