"""Reads answered by pyfuse3's C read path (serve/direct.py, scripts/pyfuse3/direct-read.patch), through
real mounts: the bytes tar -x writes for every sparse dialect the real tools write, at every extent edge;
the archive-changed rule under a lease break in the middle of reads; workers; and the Python path for what
the C path hands back. Skipped where pyfuse3 has no C read path (`pip install .` with pyfuse3 from the
index: tests/test_install.py serves through the Python path there)."""

import errno
import json
import os
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from kit import sparsegen
from kit.mounts import Mount, MountFactory

from tarfuse.serve import direct
from tarfuse.serve.fs import STATUS_XATTR

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not direct.AVAILABLE, reason="this pyfuse3 has no C read path (make dev builds it)"),
]

KiB, MiB = 1 << 10, 1 << 20
# Data runs and holes at block-aligned places (as the tools store them) and one that is not, so that a
# read crosses each kind of edge; the last run is short, as a file's end is.
LAYOUT = sparsegen.layout_from_runs(
    [(0, 8 * KiB), (64 * KiB, 4 * KiB), (512, 100 * KiB), (300 * KiB, 1536 * KiB), (2 * MiB, 4 * KiB + 17)],
    tail=3 * MiB + 5,
)
# name -> the command before "-cf ARCHIVE -C DIR disk.img": each dialect of sparse map the tools write
WRITERS = {
    "oldgnu": ["tar", "--format=oldgnu", "-S"],
    "pax0.0": ["tar", "--format=posix", "-S", "--sparse-version=0.0"],
    "pax0.1": ["tar", "--format=posix", "-S", "--sparse-version=0.1"],
    "pax1.0": ["tar", "--format=posix", "-S", "--sparse-version=1.0"],
    "bsdtar-pax": ["bsdtar", "--format=pax"],
    "plain": ["tar", "--format=gnu"],  # holes stored as zeros: one extent
}


def status(mountpoint: Path) -> dict[str, object]:
    return json.loads(os.getxattr(mountpoint, STATUS_XATTR))  # type: ignore[no-any-return]


def answered_in_c(served: Mount) -> int:
    counts = status(served.mountpoint)["direct_reads"]
    assert isinstance(counts, dict)
    return int(counts["answered_in_c"])


def edge_reads(layout: sparsegen.Layout) -> list[tuple[int, int]]:
    """Reads at every edge of the map (each extent's start and end, one byte either side, a block
    across), of a whole extent, across several, and at and past the end of the image."""
    reads = []
    for start, length in layout.extents:
        for edge in (start, start + length):
            reads += [(edge - 1, 2), (edge, 1), (max(edge - 4 * KiB, 0), 8 * KiB), (edge, 4 * KiB)]
        reads.append((start, length))
    size = layout.size
    return [*reads, (0, MiB), (100 * KiB, MiB), (size - 100, 200), (size, 4 * KiB), (size + 10, 1)]


def read_direct(path: Path, reads: list[tuple[int, int]]) -> list[bytes]:
    """Each read with O_DIRECT (aligned to 4 KiB, as O_DIRECT needs, then cut to what was asked), so that
    every one reaches the daemon rather than the page cache."""
    found = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = memoryview(bytearray(3 * MiB + 8 * KiB))
        for offset, size in reads:
            if offset < 0:
                continue
            start = offset // (4 * KiB) * 4 * KiB
            length = -(-(offset + size - start) // (4 * KiB)) * 4 * KiB
            aligned = _aligned(buffer, length)
            got = os.preadv(fd, [aligned], start)
            found.append(bytes(aligned[offset - start : min(got, offset + size - start)]))
    finally:
        os.close(fd)
    return found


def _aligned(buffer: memoryview, length: int) -> memoryview:
    """A `length`-byte slice of `buffer` that starts at a 4 KiB-aligned address (O_DIRECT needs one)."""
    import ctypes

    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    skip = -address % (4 * KiB)
    return buffer[skip : skip + length]


@pytest.fixture(scope="module")
def sparse_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    top = tmp_path_factory.mktemp("direct")
    image = sparsegen.write_sparse_file(top / "disk.img", LAYOUT, seed=3)
    return top, image


@pytest.mark.parametrize("writer", WRITERS)
def test_every_dialect_is_served_in_c_as_tar_x_writes_it(
    writer: str, sparse_tree: tuple[Path, bytes], mount: MountFactory, tmp_path: Path
) -> None:
    top, image = sparse_tree
    command = WRITERS[writer]
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed (make deps installs it)")
    archive = tmp_path / f"{writer}.tar"
    subprocess.run([*command, "-cf", archive, "-C", top, "disk.img"], check=True, capture_output=True)
    extracted = tmp_path / "x"
    extracted.mkdir()
    subprocess.run(["tar", "-xf", archive, "-C", extracted], check=True)
    assert (extracted / "disk.img").read_bytes() == image  # the oracle is tar -x's
    (tmp_path / "mnt").mkdir()
    served = mount(archive, tmp_path / "mnt")
    before = answered_in_c(served)
    reads = edge_reads(LAYOUT)
    found = read_direct(tmp_path / "mnt" / "disk.img", reads)
    expected = [image[max(o, 0) : o + n] for o, n in reads if o >= 0]
    assert [i for i, (f, e) in enumerate(zip(found, expected, strict=True)) if f != e] == []
    assert answered_in_c(served) - before >= len(expected) - 2  # all but those the kernel did not send


def test_a_lease_break_in_the_middle_of_reads_takes_them_off_the_c_path(
    sparse_tree: tuple[Path, bytes], mount: MountFactory, tmp_path: Path
) -> None:
    """Readers keep reading while someone opens the archive for writing and changes it: every read gives
    the archive's bytes as they were or EIO, never the new ones; after the change every read is EIO."""
    top, image = sparse_tree
    archive = tmp_path / "vm.tar"
    subprocess.run(["tar", "--format=posix", "-S", "-cf", archive, "-C", top, "disk.img"], check=True)
    (tmp_path / "mnt").mkdir()
    served = mount(archive, tmp_path / "mnt")
    disk = tmp_path / "mnt" / "disk.img"
    assert read_direct(disk, [(0, 4 * KiB)]) == [image[: 4 * KiB]]
    assert answered_in_c(served) > 0
    wrong: list[tuple[int, bytes]] = []
    changed = threading.Event()
    after_change: list[bool] = []  # per read after the change: whether it failed with EIO

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
        buffer = _aligned(memoryview(bytearray(12 * KiB)), 4 * KiB)
        try:
            while len(after_change) < 50:
                offset = rng.randrange(0, LAYOUT.size // (4 * KiB)) * 4 * KiB
                was_changed = changed.is_set()
                try:
                    got = os.preadv(fd, [buffer], offset)
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        wrong.append((offset, str(exc).encode()))
                    if was_changed:
                        after_change.append(True)
                    continue
                if bytes(buffer[:got]) != image[offset : offset + 4 * KiB]:
                    wrong.append((offset, bytes(buffer[:16])))
                if was_changed:
                    after_change.append(False)
        finally:
            os.close(fd)

    readers = [threading.Thread(target=reader, args=(seed,)) for seed in range(2)]
    for thread in readers:
        thread.start()
    with archive.open("r+b") as file:  # waits until the daemon has let go of its lease
        file.seek(0, os.SEEK_END)
        size = file.tell()
        for at in range(0, size - 1024, 64 * KiB):  # the data too, wherever it is in the archive
            file.seek(at + 512)
            file.write(b"\xee" * 512)
    os.utime(archive, ns=(0, 12345))
    changed.set()
    for thread in readers:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in readers)
    assert wrong == []
    assert after_change
    assert all(after_change), "a read after the change was answered"
    assert "changed while mounted" in served.stderr_text()


def test_workers_each_answer_in_c(
    sparse_tree: tuple[Path, bytes], mount: MountFactory, tmp_path: Path
) -> None:
    top, image = sparse_tree
    archive = tmp_path / "vm.tar"
    subprocess.run(["tar", "--format=oldgnu", "-S", "-cf", archive, "-C", top, "disk.img"], check=True)
    (tmp_path / "mnt").mkdir()
    served = mount(archive, tmp_path / "mnt", "-o", "workers=2")
    reads = edge_reads(LAYOUT) * 20
    results: list[list[bytes]] = [[], []]
    threads = [
        threading.Thread(
            target=lambda i=i: results[i].extend(read_direct(served.mountpoint / "disk.img", reads))
        )
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    expected = [image[max(o, 0) : o + n] for o, n in reads if o >= 0]
    assert results == [expected, expected]
    assert answered_in_c(served) > 0  # of whichever worker answered the status
