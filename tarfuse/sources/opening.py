"""Opening a local archive: with the rights of whoever controls its path, and only if it can be served.

tarfuse runs as root from fstab and systemd units, on archives in other users' directories. Root's open(2)
follows whatever a user put at the path: a symbolic link to /dev/sda, or to a 0600 file of root's in a
0700 directory, whose bytes a mount with allow_other then shows to everyone. So where someone besides the
caller and root could change the path or a directory on the way (sidefiles.changers), the path is opened
by a helper process that has dropped to that user's uid, gid and groups: the kernel checks their rights,
and root serves only what they could read anyway. A group-writable directory of a group that is not the
user's own, a directory anyone can write, or two users on the way: the rights of `nobody`, which every
user has.

What a path leads to is looked at before it is opened for reading: an O_PATH descriptor opens nothing (a
FIFO would block, a tape would rewind, a watchdog would arm). Only a regular file, or a block device on a
path that only root and the caller control (an admin's deliberate /dev/loop0), is then opened, through
/proc/self/fd, with O_NONBLOCK|O_NOCTTY; never a FIFO, a socket, a character device or a directory.

Never logs: what the caller should say comes back through `say`.
"""

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

from tarfuse.errors import TarfuseError
from tarfuse.printable import printable
from tarfuse.sources.sidefiles import Changer, changers

OPEN_TIMEOUT = 30.0  # seconds the helper may take to open as the user (their FUSE mount may never answer)
_PR_SET_DUMPABLE = 4  # prctl(2), <linux/prctl.h>
_NOBODY = 65534  # the kernel's overflow uid and gid, when the password database has no `nobody`
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
}


class Unservable(TarfuseError):
    """The archive path leads to something tarfuse does not serve (a FIFO, a device), or not for this user."""


@dataclass(frozen=True, slots=True)
class Rights:
    """Whose rights an open runs with: a uid, its gid and supplementary groups, and how to name them."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    who: str


def open_archive(path: str, say: Callable[[str], None] = lambda line: None) -> int:
    """Open the archive at `path` for reading, with the rights of whoever controls the path; a descriptor.

    As root, the path is walked first (sidefiles.changers); if anyone besides root and the caller could
    change it, a helper process opens it with their rights and `say` hears whose. The descriptor is of a
    regular file, or of a block device reached only through what root and the caller control.

    Raises:
        Unservable: not a regular file or block device, a block device reached through another user's
            path, or the helper that opens with their rights did not answer.
        OSError: what open(2) said (for the user whose rights it ran with).
    """
    found = changers(path) if os.geteuid() == 0 else []  # a user's own open already has only their rights
    if not found:
        return open_checked(path, devices=True)
    rights = rights_of(found)
    fd = _open_as(rights, path)
    reasons = "; ".join(changer.reason for changer in found[:3])
    say(f"{printable(path)}: opened with the rights of {rights.who}, since {reasons}")
    return fd


def rights_of(found: list[Changer]) -> Rights:
    """The rights that bound what the changers of a path could read: one user's, one group's, or nobody's.

    A directory writable by the user's own primary group (user private groups, umask 002) is theirs.
    """
    users = {c.uid for c in found if c.uid is not None}
    groups = {c.gid for c in found if c.uid is None and c.gid is not None}
    everyone = any(c.uid is None and c.gid is None for c in found)
    if len(users) == 1 and not everyone:
        (uid,) = users
        with contextlib.suppress(KeyError):
            entry = pwd.getpwuid(uid)
            if groups <= {entry.pw_gid}:
                memberships = os.getgrouplist(entry.pw_name, entry.pw_gid)
                return Rights(
                    uid, entry.pw_gid, tuple(memberships), f"uid {uid} ({printable(entry.pw_name)})"
                )
    nobody, nogroup = _nobody()
    if not users and not everyone and len(groups) == 1:
        (gid,) = groups
        return Rights(nobody, gid, (gid,), f"group {gid} (as uid {nobody}, in that group only)")
    return Rights(nobody, nogroup, (), f"uid {nobody} (nobody: what every user may read)")


def _nobody() -> tuple[int, int]:
    try:
        uid = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        uid = _NOBODY
    for name in ("nogroup", "nobody"):
        with contextlib.suppress(KeyError):
            return uid, grp.getgrnam(name).gr_gid
    return uid, _NOBODY


def open_checked(path: str, devices: bool) -> int:
    """Open `path` for reading if it is a regular file, or a block device where `devices`; a descriptor.

    The kind is read from an O_PATH descriptor, which opens nothing; the file is then opened through it
    (/proc/self/fd), so the file checked is the file opened. O_NONBLOCK is cleared once it is open.
    """
    where = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        info = os.fstat(where)
        _check_kind(info, devices)
        fd = _reopen(where, path, info)
    finally:
        os.close(where)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reopen(where: int, path: str, info: os.stat_result) -> int:
    """The file of the O_PATH descriptor `where`, opened for reading; by its name if /proc is missing,
    then checked to be the same file."""
    try:
        return os.open(f"/proc/self/fd/{where}", _READ)
    except FileNotFoundError:
        pass
    fd = os.open(path, _READ)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
        os.close(fd)
        raise Unservable("it was replaced while it was opened")
    return fd


def _check_kind(info: os.stat_result, devices: bool) -> None:
    if stat.S_ISREG(info.st_mode) or (devices and stat.S_ISBLK(info.st_mode)):
        return
    if stat.S_ISBLK(info.st_mode):
        raise Unservable(
            "a block device reached through a path that another user can change: refused (only a "
            "device path that root alone controls, such as /dev/loop0, is served)"
        )
    kind = _KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
    raise Unservable(f"{kind}, not a regular file or block device")


def _open_as(rights: Rights, path: str) -> int:
    """Open `path` in a child process that runs with `rights`; its descriptor comes back over a socket."""
    import ctypes  # here, before the fork: a child takes no import lock

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        with theirs:
            pid = os.fork()
            if pid == 0:  # pragma: no cover (the child; its exit status is all the parent reads of it)
                ours.close()
                _child(rights, path, theirs, lambda: prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0))
        return _answer(ours, pid, rights, path)


def _child(rights: Rights, path: str, channel: socket.socket, not_dumpable: Callable[[], object]) -> None:
    """In the forked child: drop to `rights`, open, send the descriptor or the error, and exit.

    The child holds root's memory and descriptors: the user whose rights it takes must not ptrace it or
    read /proc/PID/fd. Changing the uid makes a process non-dumpable unless fs.suid_dumpable says
    otherwise (prctl(2), PR_SET_DUMPABLE); `not_dumpable` makes sure.
    """
    status = 1
    try:
        os.setgroups(list(rights.groups))
        os.setresgid(rights.gid, rights.gid, rights.gid)
        os.setresuid(rights.uid, rights.uid, rights.uid)
        not_dumpable()
        try:
            fd = open_checked(path, devices=False)
        except Unservable as exc:
            channel.send(b"U" + str(exc).encode("utf-8", "surrogateescape"))
        except OSError as exc:
            channel.send(b"E%d" % (exc.errno or errno.EIO))
        else:
            socket.send_fds(channel, [b"F"], [fd])
        status = 0
    finally:
        os._exit(status)


def _answer(channel: socket.socket, pid: int, rights: Rights, path: str) -> int:
    """What the child sent: a descriptor, else the error it met, raised here."""
    channel.settimeout(OPEN_TIMEOUT)
    try:
        message, fds, _flags, _address = socket.recv_fds(channel, 4096, 1, socket.MSG_CMSG_CLOEXEC)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)  # our own child: the user may have stopped it, or their FUSE hangs
        message, fds = b"T", []
    finally:
        os.waitpid(pid, 0)
    if message == b"F" and len(fds) == 1:
        return fds[0]
    for fd in fds:
        os.close(fd)
    if message.startswith(b"U"):
        raise Unservable(message[1:].decode("utf-8", "surrogateescape"))
    if message.startswith(b"E") and message[1:].isdigit():
        code = int(message[1:])
        denied = code in (errno.EACCES, errno.EPERM)  # then whose rights is the whole story
        raise OSError(code, os.strerror(code) + f" (opened with the rights of {rights.who})" * denied, path)
    if message == b"T":
        raise Unservable(f"opening it with the rights of {rights.who} did not end within {OPEN_TIMEOUT:g} s")
    raise Unservable(f"the process that opens it with the rights of {rights.who} ended without an answer")
