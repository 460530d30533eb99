"""The read list's recorder (sources/http/readlist.py): whatever is read while recording, what it keeps
is bounded."""

import json

from tarfuse.sources.http import readlist


def test_recording_a_long_sequential_read_keeps_at_most_max_blocks() -> None:
    recorder = readlist.Recorder()
    for first in range(0, 4 * readlist.MAX_BLOCKS, 8):  # 1 MiB reads, four times past the bound
        recorder.saw(first, first + 7)
    runs = json.loads(recorder.encode(1 << 40, None, 128 * 1024))["runs"]
    assert runs == [[0, readlist.MAX_BLOCKS]]


def test_recording_scattered_reads_keeps_at_most_max_runs() -> None:
    recorder = readlist.Recorder()
    for block in range(0, 4 * readlist.MAX_RUNS * 2, 2):  # every other block: a run each
        recorder.saw(block, block)
    recorder.saw(0, 0)  # seen already: still nothing more
    runs = json.loads(recorder.encode(1 << 40, None, 128 * 1024))["runs"]
    assert len(runs) == readlist.MAX_RUNS
    assert runs[-1] == [2 * (readlist.MAX_RUNS - 1), 1]
