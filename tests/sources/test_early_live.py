"""A tar whose stream can only be read forward (one xz block) goes live once the headers before its image
are decompressed, as gzip and zstd do: the one background pass walks the rest and writes the spill.

Shown on storage that fails every read past the image (kit/faultyfs.py): a mount that read every header
before it went live would have to decompress the whole stream, and fails; one that goes live early serves
the image whole, and its pass then says, in one line, that the archive cannot be read.
"""

import random
import subprocess
import tarfile
from pathlib import Path

import pytest
from kit.mounts import MountFactory
from kit.needs import require_tool
from kit.sample import SampleImage
from kit.storage import faulty_storage

pytestmark = pytest.mark.fuse

MiB = 1 << 20
FILLER = 16 * MiB  # random, so it compresses to as much: the bad range lies well inside it
MARGIN = 2 * MiB  # read-ahead of the decoder past the image, and the index at the end of the file


def test_a_one_block_tar_xz_is_served_before_the_rest_of_it_is_decompressed(
    sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    xz = require_tool("xz")
    (work := tmp_path / "work").mkdir()
    (work / "filler.bin").write_bytes(random.Random(1).randbytes(FILLER))
    archive = work / "vm.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(sample_image.path, "disk.raw")
        tar.add(work / "filler.bin", "filler.bin")  # after the image: read by the pass only
    with tarfile.open(archive) as tar:
        image_end = tar.getmember(
            "filler.bin"
        ).offset  # the filler's header: everything before is the image's
    (prefix := work / "prefix.tar").write_bytes(archive.read_bytes()[:image_end])
    subprocess.run([xz, "-T1", "-0", "-k", str(prefix), str(archive)], check=True)
    compressed = work / "vm.tar.xz"
    head = (work / "prefix.tar.xz").stat().st_size  # about where the image's compressed bytes end
    size = compressed.stat().st_size
    assert size > head + FILLER - MARGIN  # the filler did not compress: the bad range is inside it
    bad = (head + MARGIN, size - head - 2 * MARGIN)
    with faulty_storage(compressed, tmp_path, bad) as storage:
        (served := tmp_path / "mnt").mkdir()
        mounted = mount(storage.archive, served, "-o", "noindex")
        assert (served / "disk.raw").read_bytes() == sample_image.data
        log = mounted.wait_for_log("indexing pass: cannot read the archive (Input/output error)")
    assert "a bug in tarfuse" not in log
