"""What is mounted where, from /proc/self/mountinfo: the one reader of it (the daemon, tests, scripts).

os.path.ismount misses mounts on files, and stat() of a mount whose daemon hangs never returns, so mounts
are looked up by their path as mountinfo spells it: absolute, without symbolic links, with space, tab,
newline and backslash written as octal escapes (proc(5); the kernel's seq_file mangling).
"""

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of mountinfo: the parts tarfuse and its tests look at."""

    device: str  # "major:minor", the name of the mount's bdi in /sys/class/bdi
    mount_point: str
    fstype: str  # "fuse.tarfuse" for ours
    source: str  # what fsname= said
    super_options: frozenset[str]  # the file system's own options: allow_other, user_id=...


def unescape(field: bytes) -> str:
    """A mountinfo field as the path or name it stands for."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field))


def mounts() -> list[Mount]:
    """Every mount this process sees, in mountinfo's order (a later one may be on top of an earlier one)."""
    found = []
    with open(MOUNTINFO, "rb") as info:
        for line in info:
            fields, _, tail = line.partition(b" - ")
            parts, (fstype, source, options) = fields.split(), tail.split()[:3]
            found.append(
                Mount(
                    device=parts[2].decode(),
                    mount_point=unescape(parts[4]),
                    fstype=unescape(fstype),
                    source=unescape(source),
                    super_options=frozenset(unescape(options).split(",")),
                )
            )
    return found


def spelled(path: str | os.PathLike[str]) -> str:
    """`path` as mountinfo spells a mount on it, resolving only its parent: a stat of the mount point
    itself could wait for good on a hung daemon."""
    absolute = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def find(path: str | os.PathLike[str]) -> Mount | None:
    """The topmost mount on `path` (a directory or a file), or None."""
    target = spelled(path)
    on_top = None
    for mount in mounts():
        if mount.mount_point == target:
            on_top = mount
    return on_top


def under(directory: str | os.PathLike[str]) -> list[str]:
    """The mount points below `directory`, for cleaning up after a run."""
    prefix = spelled(directory).rstrip("/") + "/"
    return [m.mount_point for m in mounts() if m.mount_point.startswith(prefix)]
