"""A compressed archive that names its image twice (`tar -r`): the mount serves the copy `tar -x` keeps.

A compressed tar's image is served as soon as its header is decompressed; the background pass finds a later
member of the same name only afterwards. If nothing of the first copy was answered yet, the mount serves
the later one from then on, silently; once bytes of the first were read, reads fail with EIO instead, since
bytes never change under a reader. The EIO case needs the pass held back while the first copy is read: the
archive is served over http by a server that holds every request past a point until the test lets it go.
"""

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest
from kit.httpserver import RangeServer
from kit.mounts import MountFactory

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("no_proxy_from_outside", "private_cache")]

MiB = 1 << 20
COPY_SIZE = MiB


def appended(tmp_path: Path, name: str, copies: list[bytes], between: bytes = b"") -> Path:
    """`tar -r` each copy of `name` in turn (with a file `pad.bin` of `between` after the first), then
    `gzip -1`: the archive the way tar -r leaves it."""
    tree, plain = tmp_path / "tree", tmp_path / "twice.tar"
    tree.mkdir()
    for number, data in enumerate(copies):
        (tree / name).write_bytes(data)
        subprocess.run(["tar", "-rf", str(plain), "-C", str(tree), name], check=True)
        if number == 0 and between:
            (tree / "pad.bin").write_bytes(between)
            subprocess.run(["tar", "-rf", str(plain), "-C", str(tree), "pad.bin"], check=True)
    subprocess.run(["gzip", "-1", str(plain)], check=True)
    return plain.with_name("twice.tar.gz")


def extracted(archive: Path, name: str, where: Path) -> bytes:
    """What `tar -x` leaves under `name`."""
    where.mkdir()
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(where)], check=True)
    return (where / name).read_bytes()


def test_a_later_copy_found_before_any_read_is_served_as_tar_x_leaves_it(
    mount: MountFactory, tmp_path: Path
) -> None:
    copies = [random.Random(seed).randbytes(COPY_SIZE) for seed in range(2)]
    archive = appended(tmp_path, "disk.img", copies)
    (served := tmp_path / "mnt").mkdir()
    mounted = mount(archive, served, "-o", "noindex")
    log = mounted.wait_for_log("index complete")  # the pass has ended; nothing was read
    assert "replaces the first, as tar -x would" in log
    assert (served / "disk.img").read_bytes() == extracted(archive, "disk.img", tmp_path / "x") == copies[1]
    assert "reads fail" not in mounted.stderr_text()


def test_a_later_copy_of_another_size_still_fails_reads(mount: MountFactory, tmp_path: Path) -> None:
    # The size may have been answered to a stat already, and the kernel keeps it: no switch.
    copies = [random.Random(2).randbytes(COPY_SIZE), random.Random(3).randbytes(COPY_SIZE + 512)]
    archive = appended(tmp_path, "disk.img", copies)
    (served := tmp_path / "mnt").mkdir()
    mounted = mount(archive, served, "-o", "noindex")
    mounted.wait_for_log("replaces the one this mount served")
    with pytest.raises(OSError, match="Input/output error") as failed:
        (served / "disk.img").read_bytes()
    assert failed.value.errno == errno.EIO


def test_a_later_copy_found_after_a_read_fails_reads_with_eio(
    mount: MountFactory, server: RangeServer, tmp_path: Path
) -> None:
    copies = [random.Random(seed).randbytes(COPY_SIZE) for seed in (4, 5)]
    pad = random.Random(6).randbytes(24 * MiB)  # stored by gzip, so the gate falls inside it
    archive = appended(tmp_path, "disk.img", copies, between=pad)
    # The pass reads ahead at most 16 MiB in one request: held from 20 MiB on, no request it makes can
    # cover the first copy (the first MiB), which a read therefore gets while the pass waits.
    url = server.put("twice.tar.gz", archive.read_bytes(), held_from=20 * MiB)
    (served := tmp_path / "mnt").mkdir()
    try:
        mounted = mount(url, served, "-o", "noindex,timeout=60")
        with (served / "disk.img").open("rb", buffering=0) as image:
            assert image.read(COPY_SIZE) == copies[0]  # answered before the pass can know of a later copy
            assert "replaces" not in mounted.stderr_text()
            server.release("twice.tar.gz")
            log = mounted.wait_for_log("replaces the one this mount served")
            assert "replaces the first" not in log
            os.posix_fadvise(image.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read again, not the cache
            with pytest.raises(OSError, match="Input/output error") as failed:
                os.pread(image.fileno(), 4096, 0)
            assert failed.value.errno == errno.EIO
    finally:
        server.release("twice.tar.gz")
