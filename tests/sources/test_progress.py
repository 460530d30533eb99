"""The background pass's progress line: percent, rate and time left wherever the total is known, in
decompressed bytes where the library says no compressed position but knows the size at open (xz)."""

import lzma
import re
import threading
from pathlib import Path

from tarfuse.passes import IndexingPass
from tarfuse.sources.compressed import CompressedSource, decompressed
from tarfuse.sources.file import ArchiveFile

MiB = 1 << 20
PROGRESS = re.compile(r"indexing: \d+ MiB of 8 MiB decompressed \(\d+%\), \d+ MiB/s, ETA \d+ s")


def test_an_xz_pass_tells_percent_and_time_left_from_the_size_it_knows(tmp_path: Path) -> None:
    data = bytes(range(256)) * (8 * MiB // 256)
    (path := tmp_path / "blob.xz").write_bytes(lzma.compress(data, preset=0))  # one block
    source = decompressed(ArchiveFile(str(path)))
    assert isinstance(source, CompressedSource)
    with source:
        indexing = IndexingPass(source, "blob", None, scan=False)
        line = indexing.status()
        assert PROGRESS.fullmatch(line), line
        indexing.run(threading.Event())
        report = indexing.report()
    assert report["state"] == "done"
    assert (report["unit"], report["done_bytes"], report["total_bytes"]) == ("decompressed", 8 * MiB, 8 * MiB)
    assert report["percent"] == 100.0
