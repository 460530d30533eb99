"""Storage with bad sectors under an archive, for tests: faultyfs.py mounted, its bad ranges changeable."""

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kit.mounts import daemon_mount

FAULTYFS = Path(__file__).parent / "faultyfs.py"


@dataclass(frozen=True, slots=True)
class Storage:
    """The archive as seen through the faulty file system, and the file that lists its bad ranges."""

    archive: Path
    ranges: Path

    def fail(self, *ranges: tuple[int, int]) -> None:
        """Make reads of these (archive offset, length) ranges fail from now on; none heals them all."""
        self.ranges.write_text("".join(f"{offset} {length}\n" for offset, length in ranges))


@contextlib.contextmanager
def faulty_storage(archive: Path, directory: Path, *bad: tuple[int, int]) -> Iterator[Storage]:
    """Serve `archive` from a faultyfs mount in `directory` whose reads of the `bad` ranges fail."""
    ranges = directory / "bad-ranges"
    (mountpoint := directory / "storage").mkdir()
    storage = Storage(mountpoint / archive.name, ranges)
    storage.fail(*bad)
    command = [sys.executable, FAULTYFS, archive, mountpoint, ranges]
    with daemon_mount(command, mountpoint, directory / "faultyfs.stderr"):
        yield storage
