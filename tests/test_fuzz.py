"""The fuzzer's short slice: mutated real-tool archives end in an image or an ArchiveError, nothing else.

`make fuzz` (scripts/fuzz.py) runs the same engine (tests/fuzzing.py, fuzzpool.py) over a million cases;
here a few thousand run in two worker processes, twenty of them compared with what GNU tar extracts.
"""

import os
import random
import time
from pathlib import Path

import fuzzing
import fuzzpool
import fuzzseeds
import pytest

SLICE = fuzzpool.Config(seed=0, cases=4000, jobs=2, compare_every=200)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> fuzzing.Corpus:
    try:
        seeds = fuzzseeds.make_seeds(tmp_path_factory.mktemp("seeds"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return fuzzing.Corpus(seeds)


def test_slice_has_no_findings(corpus: fuzzing.Corpus) -> None:
    summary = fuzzpool.run(corpus, SLICE)
    report = "\n\n".join(f"{f.headline()}\n{f.detail}" for f in summary.findings)
    assert not summary.findings, report
    assert summary.cases == SLICE.cases
    assert summary.outcomes["served"] > SLICE.cases // 10  # the mutations leave many archives readable
    assert sum(summary.compared.values()) == SLICE.cases // SLICE.compare_every
    assert summary.compared["agree"] > 0


def test_every_seed_is_served_as_gnu_tar_extracts_it(corpus: fuzzing.Corpus, tmp_path: Path) -> None:
    for seed in corpus.seeds:
        assert fuzzing.check_archive(seed.data, random.Random(0)) == "served", seed.name
        category, detail = fuzzing.compare_with_gnu_tar(seed.data, tmp_path, random.Random(0))
        assert category == "agree", (seed.name, detail)


def test_a_case_is_made_again_from_its_number(corpus: fuzzing.Corpus) -> None:
    assert corpus.case(3, 1234) == corpus.case(3, 1234)
    assert corpus.case(3, 1234).data != corpus.case(4, 1234).data


def _misbehave(data: bytes, rng: random.Random) -> str:
    """What a bug in tarfuse could do, by case: raise, hang, allocate, or kill the process."""
    roll = rng.randrange(8)
    if roll == 0:
        raise ValueError("not an ArchiveError")
    if roll == 1:
        time.sleep(3600)
    if roll == 2:
        bytearray(2 << 30)  # past the workers' RLIMIT_AS
    if roll == 3:
        os._exit(3)
    return "served"


def test_engine_turns_exceptions_hangs_memory_and_crashes_into_findings(corpus: fuzzing.Corpus) -> None:
    config = fuzzpool.Config(cases=24, jobs=2, compare_every=0, time_limit=0.5, memory_limit=1 << 30, batch=8)
    summary = fuzzpool.run(corpus, config, check=_misbehave)
    kinds = {0: "ValueError", 1: "hang", 2: "MemoryError", 3: "crash (exit status 3)"}
    expected = {n: kinds[r] for n in range(24) if (r := random.Random(n).randrange(8)) in kinds}
    assert {f.case: f.kind for f in summary.findings} == expected
    assert summary.cases == 24
    hang = next(f for f in summary.findings if f.kind == "hang")
    assert "_misbehave" in hang.detail  # faulthandler's stack of the stuck worker
