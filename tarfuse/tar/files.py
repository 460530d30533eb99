"""The regular files `tar -x` would leave: later members replace earlier ones, hard links resolved.

Which member's data a name ends up with decides the bytes served, so this follows extraction exactly.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from tarfuse.errors import ArchiveError
from tarfuse.tar.archive import Member, normalize_name


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file as tar -x would create it: its name, and the member whose data it gets.

    For a hard link the two differ: the link's name, the target's data.
    """

    name: str
    member: Member


MAX_MEMBERS = 250_000  # entries of one archive; each costs ~300 bytes while the archive is read (below)


class FileTable:
    """The regular files tar -x would leave so far, fed one member at a time, in archive order.

    A later member replaces an earlier one of the same name, as on extraction; a hard link points to the
    last earlier member of its target's name, and one to its own name leaves that file as it is (GNU tar
    and tarfile extract it intact; bsdtar says "Skipping hardlink pointing to itself"). A link to nothing
    removes its name, as tar -x cannot make it either.

    Every file is kept until the end (a later hard link may name it), about 300 bytes each: MAX_MEMBERS
    bounds that (~75 MiB) under the 256 MiB a mount may take, whatever the archive. A compressed archive
    of a million empty headers is a few kilobytes.
    """

    def __init__(self) -> None:
        self._files: dict[str, Candidate] = {}  # normalized name -> the file there now
        self._symlinks: dict[str, tuple[str, str]] = {}  # normalized name -> (name, target), there now
        self._members = 0

    def add(self, member: Member) -> None:
        self._members += 1
        if self._members > MAX_MEMBERS:
            raise ArchiveError(
                f"more than {MAX_MEMBERS:,} members: past tarfuse's limit (it keeps every name while it "
                "reads the archive); extract the image with tar -x",
                member.header_offset,
            )
        name = normalize_name(member.name)
        target = member if member.kind == "file" else None
        if member.kind == "hardlink":  # looked up before its own name goes: it may be the link's own
            found = self._files.get(normalize_name(member.linkname))
            target = None if found is None else found.member
        self._files.pop(name, None)  # the name moves to the end, in archive order
        self._symlinks.pop(name, None)
        if target is not None:
            self._files[name] = Candidate(member.name, target)
        elif member.kind == "symlink":
            self._symlinks[name] = (member.name, member.linkname)

    def get(self, name: str) -> Candidate | None:
        """The file at `name` (normalized) now, if any."""
        return self._files.get(name)

    def files(self) -> list[Candidate]:
        return list(self._files.values())

    def symlinks(self) -> list[tuple[str, str]]:
        """The symbolic links tar -x leaves: (name, target), in archive order."""
        return list(self._symlinks.values())


def resolve_files(members: Iterable[Member]) -> list[Candidate]:
    """List the regular files tar -x would leave, hard links resolved to their target's data (FileTable)."""
    table = FileTable()
    for member in members:
        table.add(member)
    return table.files()
