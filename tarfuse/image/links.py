"""Which of an archive's symbolic links a mount may serve (-o all): those the kernel cannot follow out of it.

A target checked on its own, as text, proves nothing: `a/b/up -> ../..` normalises to the mount's root and
`shadow -> a/b/up/../../etc/shadow` stays inside on paper, yet the kernel resolves `up` to the root first
and the next `..` leaves the mount, to the host's /etc/shadow. So every target is followed here through the
served tree itself, component by component as the kernel walks it: the served files, the directories their
paths and the links' paths imply, and the other served links, up to MAX_HOPS links in one walk.

A link is kept only if its walk ends on a served file or directory. It is left out when the walk leaves the
mount (an absolute target, `..` above the root), when it needs more than MAX_HOPS links (a loop), and when it
leads nowhere in the mount (an empty target, a missing name, a file taken for a directory, a target too long
for FUSE to return): the kernel would refuse those with ENOENT, ENOTDIR or ELOOP anyway, and a path that
names nothing is one that tools such as `realpath -m` complete as text, out of the mount. Leaving a link
out can take with it the directories only its path made; the links that went through those are then left
out too, so that what is served is exactly what was checked.

The tree here is the one serve/fs.py builds from the same lists (files first, then links, in order; a path
that is taken, or that runs through a file or a link, gets no entry), so both must keep that shape. Cost:
each link is walked once (a link reached again is answered from its first walk), so the work is the total
length of the targets. This module imports nothing of pyfuse3 or trio.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from tarfuse.printable import printable

MAX_HOPS = 40  # Linux's MAXSYMLINKS: links one path lookup may follow, nested ones included
# FUSE's readlink reply fills at most one page less its NUL (fs/fuse/dir.c): a longer target cannot be read
MAX_TARGET = 4095
_SHOWN = 5  # left-out links named in a note; the count says how many there are
_CLIP = 120  # characters of a name or target shown in a note

OUTSIDE = "outside"  # the walk leaves the mount
NOWHERE = "nowhere"  # the walk fails inside it: no such name, a file as a directory, an empty target
LOOP = "loop"  # more than MAX_HOPS links


@dataclass(frozen=True, slots=True)
class LeftOut:
    """A symlink of the archive the mount does not serve, and why (OUTSIDE, NOWHERE or LOOP)."""

    name: str
    target: str
    reason: str


@dataclass(eq=False, slots=True)
class _Node:
    """A directory (`children`), a served file, or a symlink (`link`: its index) of the served tree."""

    parent: "_Node | None"
    children: dict[str, "_Node"] | None = None
    link: int | None = None
    entries: int = 0  # a directory's files and links, at any depth: at 0 it was made by links alone
    lasting: bool = False  # a directory with a file under it: no link left out takes it away


@dataclass(frozen=True, slots=True)
class _Resolved:
    """Where one link's walk ended (`end`, None on failure), after following `hops` links."""

    end: _Node | None
    hops: int = 0
    reason: str = ""


@dataclass(eq=False, slots=True)
class _Walk:
    """One link's walk in progress: where it is, what is left of the target (last component first)."""

    link: int
    at: _Node
    pending: list[str]
    hops: int = 1  # the link itself counts, as in the kernel
    visited: set[_Node] = field(default_factory=set)  # directories the walk stood in that may go
    followed: list[int] = field(default_factory=list)  # links it went through


def served_path(name: str) -> str:
    """A member's name as a path under the mount point: no empty, "." or ".." component (as contents.py)."""
    return "/".join(_parts(name))


def symlinks_inside(
    files: Sequence[str], links: Sequence[tuple[str, str]]
) -> tuple[list[tuple[str, str]], list[LeftOut]]:
    """Split the archive's symlinks into those to serve, as (path in the mount, target), and the others.

    Args:
        files: the served files' paths in the mount, in the order they are served.
        links: the archive's symlinks, (member name, target), in archive order.

    A link whose path is taken already, or runs through a file or a link, is in neither list: the served
    tree has no place for it (serve/fs.py drops it too).
    """
    tree = _Tree(files)
    placed = {i: node for i, (name, _) in enumerate(links) if (node := tree.place(name, i)) is not None}
    walker = _Walker([target for _, target in links], placed)
    reasons = {i: result.reason for i, result in walker.resolve_all().items() if result.end is None}
    reasons |= dict.fromkeys(walker.cascade(set(reasons)), NOWHERE)
    reasons |= {i: NOWHERE for i, (name, _) in enumerate(links) if not _parts(name)}  # "./": no path
    served = [i for i in placed if i not in reasons]
    left_out = [LeftOut(name, target, reasons[i]) for i, (name, target) in enumerate(links) if i in reasons]
    return [(served_path(links[i][0]), links[i][1]) for i in served], left_out


def notes_on(left_out: Sequence[LeftOut]) -> tuple[str, ...]:
    """One log line per kind of left-out link, naming a few, escaped (names are the archive author's)."""
    outside = [entry for entry in left_out if entry.reason == OUTSIDE]
    elsewhere = [entry for entry in left_out if entry.reason != OUTSIDE]
    notes = []
    if outside:
        notes.append(
            f"-o all: {len(outside)} symlink(s) pointing outside the mount are left out: {_named(outside)}"
        )
    if elsewhere:
        notes.append(
            f"-o all: {len(elsewhere)} symlink(s) leading nowhere in the mount (a missing name, a file taken "
            f"for a directory, a loop of more than {MAX_HOPS} links) are left out: {_named(elsewhere)}"
        )
    return tuple(notes)


def _named(entries: Sequence[LeftOut]) -> str:
    shown = ", ".join(f"{_clipped(e.name)} -> {_clipped(e.target)}" for e in entries[:_SHOWN])
    return shown + (", ..." if len(entries) > _SHOWN else "")


def _clipped(name: str) -> str:
    """`name` escaped, and cut short: a target may be a megabyte long, a log line should not."""
    shown = printable(name)
    return shown if len(shown) <= _CLIP else shown[:_CLIP] + "..."


def _parts(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".", "..")]


class _Tree:
    """The served tree, as serve/fs.py builds it: the files at their paths, then the links that fit."""

    def __init__(self, files: Sequence[str]) -> None:
        self.root = _Node(None, children={}, lasting=True)
        for path in files:
            self._add(_parts(path), _Node(None))

    def place(self, name: str, link: int) -> _Node | None:
        """Put link number `link` at its member name's path; None where the tree has no place for it."""
        return self._add(_parts(name), _Node(None, link=link))

    def _add(self, parts: list[str], leaf: _Node) -> _Node | None:
        if not parts:
            return None
        *directories, name = parts
        parent = self.root
        for directory in directories:
            assert parent.children is not None
            child = parent.children.get(directory)
            if child is None:
                child = parent.children[directory] = _Node(parent, children={})
            if child.children is None:  # a file or a link: nothing can be under it
                return None
            parent = child
        assert parent.children is not None
        if name in parent.children:
            return None
        leaf.parent = parent
        parent.children[name] = leaf
        ancestor: _Node | None = parent
        while ancestor is not None:
            ancestor.entries += 1
            ancestor.lasting |= leaf.link is None
            ancestor = ancestor.parent
        return leaf


class _Walker:
    """Walk every placed link's target as the kernel would, each link once, and remember where each ended."""

    def __init__(self, targets: Sequence[str], placed: dict[int, _Node]) -> None:
        self._targets = targets
        self._placed = placed
        self.results: dict[int, _Resolved] = {}
        # a directory that may go (no file under it) -> the links whose walk stood in it
        self._visitors: dict[_Node, list[int]] = {}
        self._followers: dict[int, list[int]] = {}  # link -> links whose walk went through it

    def resolve_all(self) -> dict[int, _Resolved]:
        for link in self._placed:
            if link not in self.results:
                self._resolve(link)
        return self.results

    def _resolve(self, first: int) -> None:
        """Resolve `first` and every link its walk needs first, with a stack of walks rather than recursion
        (a chain may be as long as the archive is wide).

        Each walk on the stack waits for the one above it, and will add that one's links to its own: the
        bottom one, below MAX_HOPS others, would follow more links than the kernel does, so it ends there
        as a loop, and the stack stays short whatever the chain.
        """
        stack = [self._start(first)]
        waiting = {first}
        while stack:
            walk = stack[-1]
            needed = self._advance(walk)
            if isinstance(needed, _Resolved):
                self._finish(walk, needed)
                waiting.discard(stack.pop().link)
                continue
            if needed in waiting:  # a walk that needs itself never ends: ELOOP, for all that wait on it
                for other in stack:
                    self.results[other.link] = _Resolved(None, reason=LOOP)
                return
            stack.append(self._start(needed))
            waiting.add(needed)
            if len(stack) > MAX_HOPS:
                bottom = stack.pop(0)
                waiting.discard(bottom.link)
                self.results[bottom.link] = _Resolved(None, reason=LOOP)

    def _start(self, link: int) -> _Walk:
        node = self._placed[link]
        assert node.parent is not None
        return _Walk(link, node.parent, list(reversed(self._targets[link].split("/"))))

    def _advance(self, walk: _Walk) -> "int | _Resolved":
        """Walk on until the end (where it ended) or a link not resolved yet (its number)."""
        target = self._targets[walk.link]
        if not target or len(target.encode("utf-8", "surrogateescape")) > MAX_TARGET:
            return _Resolved(None, reason=NOWHERE)
        if target.startswith("/"):
            return _Resolved(None, reason=OUTSIDE)
        while walk.pending:
            part = walk.pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if walk.at.parent is None:  # above the mount's root: the mount point's parent
                    return _Resolved(None, reason=OUTSIDE)
                walk.at = walk.at.parent
                continue
            assert walk.at.children is not None
            child = walk.at.children.get(part)
            if child is None:
                return _Resolved(None, reason=NOWHERE)
            if child.link is not None:
                result = self.results.get(child.link)
                if result is None:
                    walk.pending.append(part)  # come back to it once that link is resolved
                    return child.link
                if result.end is None:
                    return _Resolved(None, reason=result.reason)
                walk.hops += result.hops
                if walk.hops > MAX_HOPS:
                    return _Resolved(None, reason=LOOP)
                walk.followed.append(child.link)
                child = result.end
            if child.children is None:  # a file: it ends the walk, or it is taken for a directory
                if walk.pending:
                    return _Resolved(None, reason=NOWHERE)
                return _Resolved(child, walk.hops)
            walk.at = child
            if not child.lasting:
                walk.visited.add(child)
        return _Resolved(walk.at, walk.hops)

    def _finish(self, walk: _Walk, result: _Resolved) -> None:
        self.results[walk.link] = result
        if result.end is not None:
            for directory in walk.visited:
                self._visitors.setdefault(directory, []).append(walk.link)
            for link in walk.followed:
                self._followers.setdefault(link, []).append(walk.link)

    def cascade(self, refused: set[int]) -> list[int]:
        """The links to leave out as well, once `refused` are gone: those whose walk stood in a directory
        that only left-out links made, or went through a link left out this way."""
        gone = set(refused)
        queue = list(refused)
        more = []
        while queue:
            link = queue.pop()
            dependents = list(self._followers.get(link, ()))
            ancestor = self._placed[link].parent
            while ancestor is not None and ancestor.parent is not None:  # the root stays, whatever is left
                ancestor.entries -= 1
                if ancestor.entries == 0:  # the directory goes with the last link under it
                    dependents += self._visitors.get(ancestor, ())
                ancestor = ancestor.parent
            for dependent in dependents:
                if dependent not in gone:
                    gone.add(dependent)
                    more.append(dependent)
                    queue.append(dependent)
        return more
