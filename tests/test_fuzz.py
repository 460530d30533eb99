"""The fuzzer's short slice: mutated real-tool archives end in an image or an ArchiveError, nothing else.

`make fuzz` (scripts/fuzz.py) runs the same engine (tests/kit/fuzz/) over a million cases;
here a few thousand run in two worker processes, under the memory ceiling, some compressed or read over
HTTP and mounted as the CLI mounts them, and twenty compared with what GNU tar extracts: among them, images
that are in the archive several times, plain and compressed, and link, device, directory, FIFO,
contiguous and dumpdir headers with a size.
"""

import os
import random
import time
from pathlib import Path

import pytest
from kit.fuzz import engine, pool, seeds
from kit.fuzz.engine import Case
from kit.fuzz.packed import Packing

SLICE = pool.Config(seed=0, cases=4000, jobs=2, compare_every=200)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> engine.Corpus:
    try:
        archives = seeds.make_seeds(tmp_path_factory.mktemp("seeds"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return engine.Corpus(archives)


def test_slice_has_no_findings(corpus: engine.Corpus) -> None:
    summary = pool.run(corpus, SLICE)
    report = "\n\n".join(f"{f.headline()}\n{f.detail}" for f in summary.findings)
    assert not summary.findings, report
    assert summary.cases == SLICE.cases
    assert summary.outcomes["served"] > SLICE.cases // 10  # the mutations leave many archives readable
    assert sum(summary.compared.values()) == SLICE.cases // SLICE.compare_every
    assert summary.compared["agree"] > 0
    mounted = {outcome: n for outcome, n in summary.outcomes.items() if " " in outcome}  # "gzip served"...
    assert sum(mounted.values()) > SLICE.cases // 10, mounted
    assert sum(n for outcome, n in mounted.items() if outcome.startswith("http")) > SLICE.cases // 100
    assert 0 < summary.memory.baseline <= summary.memory.peak < SLICE.rss_ceiling


def _plan(case: Case) -> str:
    """Which kind of case the differential slice is meant to hold this one for."""
    packed = "compressed" if case.packing is not None else "plain"
    if any("more member(s) named" in step for step in case.steps):
        return f"duplicate {packed}"
    if any(" header of size " in step for step in case.steps):
        return "sized header"
    return f"mutated {packed}"


def test_the_compared_cases_hold_duplicates_and_sized_headers(corpus: engine.Corpus) -> None:
    compared = [corpus.case(SLICE.seed, n) for n in range(0, SLICE.cases, SLICE.compare_every)]
    plans = [_plan(case) for case in compared]
    for plan in ("duplicate plain", "duplicate compressed", "sized header", "mutated plain"):
        assert plans.count(plan) >= 3, plans
    sized = [step for case in compared for step in case.steps if " header of size " in step]
    assert any(" before the image" in step for step in sized), sized
    assert any(" after the image" in step for step in sized), sized


def test_every_seed_is_served_as_gnu_tar_extracts_it(corpus: engine.Corpus, tmp_path: Path) -> None:
    for seed in corpus.seeds:
        case = Case(0, seed.name, (), seed.data)
        assert engine.check_archive(case, random.Random(0)) == "served", seed.name
        category, detail = engine.compare_with_gnu_tar(case, tmp_path, random.Random(0))
        assert category == "agree", (seed.name, detail)


def test_a_case_is_made_again_from_its_number(corpus: engine.Corpus) -> None:
    assert corpus.case(3, 1234) == corpus.case(3, 1234)
    assert corpus.case(3, 1234).data != corpus.case(4, 1234).data


def test_every_seed_compressed_is_served_as_gnu_tar_extracts_it(
    corpus: engine.Corpus, tmp_path: Path
) -> None:
    """The mount of each seed, gzip-compressed, before and after the background pass."""
    for seed in corpus.seeds:
        case = Case(0, seed.name, (), seed.data, Packing("gzip"))
        assert engine.check_archive(case, random.Random(0)).startswith("gzip served"), seed.name
        category, detail = engine.compare_with_gnu_tar(case, tmp_path, random.Random(0))
        assert category in ("agree", "served-then-refused"), (seed.name, detail)


def _misbehave(case: Case, rng: random.Random) -> str:
    """What a bug in tarfuse could do, by case: raise, hang, allocate, hold memory, or kill the process."""
    roll = rng.randrange(8)
    if roll == 0:
        raise ValueError("not an ArchiveError")
    if roll == 1:
        time.sleep(3600)
    if roll == 2:
        bytearray(2 << 30)  # past the workers' RLIMIT_AS
    if roll == 3:
        os._exit(3)
    if roll == 4:
        resident = b"\x01" * (300 << 20)  # written, so resident: past the RSS ceiling, under RLIMIT_AS
        del resident
    return "served"


def test_engine_turns_exceptions_hangs_memory_and_crashes_into_findings(corpus: engine.Corpus) -> None:
    # time_limit: writing 300 MiB on a loaded machine takes well over half a second; two cases hang.
    config = pool.Config(cases=24, jobs=2, compare_every=0, time_limit=3, memory_limit=1 << 30, batch=8)
    summary = pool.run(corpus, config, check=_misbehave)
    kinds = {0: "ValueError", 1: "hang", 2: "MemoryError", 3: "crash (exit status 3)", 4: "memory-ceiling"}
    expected = {n: kinds[r] for n in range(24) if (r := random.Random(n).randrange(8)) in kinds}
    assert {f.case: f.kind for f in summary.findings} == expected
    assert summary.cases == 24
    hang = next(f for f in summary.findings if f.kind == "hang")
    assert "_misbehave" in hang.detail  # faulthandler's stack of the stuck worker
    ceiling = next(f for f in summary.findings if f.kind == "memory-ceiling")
    assert "over the 256 MiB ceiling" in ceiling.detail


def _served_by_pid(case: Case, rng: random.Random) -> str:
    return f"pid {os.getpid()}"


def test_a_worker_makes_way_for_a_fresh_one_after_its_share_of_cases(corpus: engine.Corpus) -> None:
    # A long-lived worker's heap fragments over hundreds of thousands of different archives; it is
    # replaced before that, and every case still runs once.
    config = pool.Config(cases=24, jobs=2, compare_every=0, batch=8, cases_per_worker=5)
    summary = pool.run(corpus, config, check=_served_by_pid)
    assert summary.cases == 24
    assert not summary.findings
    assert sum(summary.outcomes.values()) == 24
    assert max(summary.outcomes.values()) <= 5
    assert len(summary.outcomes) >= 5  # 24 cases, at most 5 a worker
