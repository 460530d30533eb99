"""Fuzz tarfuse's archive reader: mutated archives from GNU tar, bsdtar and Python's tarfile.

`make fuzz` runs this with 1,000,000 cases; `make fuzz FUZZ_ARGS="--cases 5000 --seed 7"` runs others.
Each case must end in a served image or an ArchiveError with reason and offset; anything else (another
exception, a case past --time-limit, a peak RSS past --rss-ceiling or an allocation past --memory-limit,
other bytes than GNU tar extracts, a compressed or HTTP archive served otherwise than the same tar plain)
is a finding: it is printed and its archive saved under --findings, and the exit status is 1.
A case is made again from its number: `scripts/fuzz.py --seed S --replay N` runs case N alone, in this
process, and says what tarfuse and GNU tar make of it.

The engine is the test kit's (tests/kit/fuzz/: seeds.py, seed archives; ratio.py, high-ratio compressed
seeds (zeros, repeated blocks, a long zstd window, a patched xz dictionary); layout.py, mutate.py, maps.py,
mutations; engine.py, one case; pool.py, worker processes), shared with tests/test_fuzz.py, which runs a short
slice of the same cases in `make test`.
"""

import argparse
import logging
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

from kit.fuzz import engine, pool, seeds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="fuzz seed: with a case number, fixes a case")
    parser.add_argument("--cases", type=int, default=1_000_000, help="how many cases (default 1,000,000)")
    parser.add_argument("--start", type=int, default=0, help="first case number")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--compare-every", type=int, default=200, metavar="N", help="extract every Nth case with GNU tar too"
    )
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds a case may take")
    parser.add_argument(
        "--memory-limit", type=int, default=2048, help="MiB of address space per worker (RLIMIT_AS)"
    )
    parser.add_argument(
        "--rss-ceiling", type=int, default=256, help="MiB of peak RSS per worker: more is a finding"
    )
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"), help="where findings go")
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--replay", type=int, metavar="CASE", help="run one case here, verbosely, and stop")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tarfuse-seeds-") as tmp:
        archives = seeds.make_seeds(Path(tmp))
    corpus = engine.Corpus(archives)  # and the high-ratio seeds (kit/fuzz/ratio.py), compressed as they are
    print(
        f"fuzz: {len(archives)} seed archives: "
        + ", ".join(f"{s.name} ({len(s.data) // 1024} KiB)" for s in archives)
    )
    print(
        f"fuzz: {len(corpus.high_ratio)} high-ratio seeds ({engine.HIGH_RATIO:.1%} of the cases, "
        "mounted only): " + ", ".join(f"{s.name} ({len(s.data) // 1024} KiB)" for s in corpus.high_ratio)
    )
    config = pool.Config(
        seed=args.seed,
        cases=args.cases,
        start=args.start,
        jobs=args.jobs,
        compare_every=args.compare_every,
        time_limit=args.time_limit,
        memory_limit=args.memory_limit << 20,
        rss_ceiling=args.rss_ceiling << 20,
    )
    if args.replay is not None:
        return replay(corpus, config, args.replay, args.findings)
    stride, cycle = engine.DIFFERENTIAL_STRIDE, engine.DIFFERENTIAL_STRIDE * len(engine.PLANS)
    if args.compare_every and (args.compare_every % stride or args.compare_every % cycle == 0):
        print(
            f"fuzz: --compare-every {args.compare_every} is not a multiple of {stride}, or is one of "
            f"{cycle}: the cases compared with GNU tar do not go through every plan (engine.PLANS)"
        )
    started = time.monotonic()
    summary = pool.run(corpus, config, progress=_progress(config), interval=args.progress_every)
    elapsed = time.monotonic() - started
    return report(corpus, config, summary, elapsed, args.findings)


def _progress(config: pool.Config) -> pool.Progress:
    def show(summary: pool.Summary, elapsed: float) -> None:
        rate = summary.cases / elapsed if elapsed else 0.0
        left = (config.cases - summary.cases) / rate if rate else 0.0
        print(
            f"fuzz: {summary.cases:,}/{config.cases:,} cases, {rate:,.0f} cases/s, "
            f"{_share(summary.outcomes['served'], summary.cases)} served, {len(summary.findings)} findings, "
            f"{sum(summary.compared.values())} compared with GNU tar, "
            f"peak RSS {summary.memory.peak >> 20} MiB, about {left / 60:.0f} min left",
            flush=True,
        )

    return show


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def report(
    corpus: engine.Corpus, config: pool.Config, summary: pool.Summary, elapsed: float, findings: Path
) -> int:
    """Print the figures and every finding; save findings and disagreements; return the exit status."""
    rate = summary.cases / elapsed if elapsed else 0.0
    stopped = " (interrupted)" if summary.interrupted else ""
    print(f"\nfuzz: {summary.cases:,} cases in {elapsed:,.0f} s, {rate:,.0f} cases/s", end="")
    print(f", seed {config.seed}{stopped}")
    for outcome, count in summary.outcomes.most_common():
        print(f"  {outcome:<34} {count:>10,}  {_share(count, summary.cases)}")
    memory = summary.memory
    print(
        f"memory per worker: {memory.baseline >> 20} MiB resident at the start, peak RSS {memory.peak >> 20} "
        f"MiB (after case {memory.peak_case}; ceiling {config.rss_ceiling >> 20} MiB), "
        f"peak address space {memory.address_space >> 20} MiB (RLIMIT_AS {config.memory_limit >> 20} MiB)"
    )
    if summary.compared:
        print(f"compared with GNU tar: {sum(summary.compared.values()):,} cases")
        for category, count in summary.compared.most_common():
            print(f"  {category:<28} {count:>8,}")
    for item in summary.inspect:
        path = pool.save_finding(corpus, config, item, findings / "inspect")
        print(f"to inspect (not a finding): {item.headline()}\n  {item.detail[:300]}\n  saved as {path}")
    for finding in summary.findings:
        path = pool.save_finding(corpus, config, finding, findings)
        print(f"FINDING {finding.headline()}\n{finding.detail}\n  saved as {path}")
    print(f"fuzz: {len(summary.findings)} findings")
    return 1 if summary.findings or summary.interrupted else 0


def replay(corpus: engine.Corpus, config: pool.Config, number: int, directory: Path) -> int:
    """Run one case in this process, say everything about it, and save its archive under `directory`."""
    case = corpus.case(config.seed, number)
    print(f"case {number} (seed {config.seed}): {case.seed}, {len(case.data)} bytes")
    for step in case.steps:
        print(f"  {step}")
    logging.basicConfig(format="tarfuse log: %(levelname)s %(message)s", level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="tarfuse-replay-") as tmp:
        os.environ["XDG_CACHE_HOME"] = tmp  # spills of a compressed case
        try:
            outcome = engine.check_archive(case, random.Random(number))
        except Exception:  # show it, whatever it is
            traceback.print_exc()
            outcome = "finding"
        print(f"tarfuse: {outcome}")
        category, detail = engine.compare_with_gnu_tar(case, Path(tmp), random.Random(number))
    print(f"GNU tar: {category}" + (f"\n{detail}" if detail else ""))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"replay-seed{config.seed}-case{number}{case.suffix}"
    path.write_bytes(case.archive())
    print(f"archive written to {path}")
    return 1 if outcome == "finding" or category in (engine.DIFFERS, engine.NOT_EXTRACTED) else 0


if __name__ == "__main__":
    sys.exit(main())
