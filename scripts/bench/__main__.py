"""`make bench`: tarfuse against the physical limit, the C ceiling and (with --peers) its peers.

Writes results.{md,json,svg} to --out, and the figures into docs/benchmarks.md after a full run; what it
mounts, attaches or creates is undone before it exits, also on Ctrl-C or SIGTERM.

    .venv/bin/python -m scripts.bench --quick            # smoke run, a few minutes
    .venv/bin/python -m scripts.bench --peers --only plain --tools tarfuse,ratarmount --reps 5
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Container, Sequence
from pathlib import Path

from .data import CASES, FULL, QUICK
from .harness import ToolFailed, run_main, scratch
from .host import ensure_commands, reclaim_paused
from .measure import BOOT, Options, run_boot, run_case
from .peers import peers
from .report import from_json, write_outputs
from .results import Results, ToolInfo, load_average, machine
from .tools import REPO, measured_tools

SELECTABLE = (*CASES, BOOT)


def main() -> int:
    args = _parser().parse_args()
    if args.render is not None:
        results, meta = from_json(json.loads(args.render.read_text()))
        write_outputs(results, meta, args.out, _docs_page(args))
        return 0
    tools = measured_tools() + (peers() if args.peers else [])
    hint = "" if args.peers else "; the peers need --peers"
    wanted_tools = _pick(args.tools, [t.name for t in tools], "tool", hint)
    tools = [t for t in tools if t.role == "limit" or t.name in wanted_tools]
    wanted_cases = _pick(args.only, SELECTABLE, "case")
    cases = [c for c in SELECTABLE if c in wanted_cases]
    started, load_start = time.monotonic(), load_average()
    print(f"tools: {', '.join(t.name for t in tools)}; cases: {', '.join(cases)}", flush=True)
    try:
        ensure_commands(("fio", ("fio",)), ("qemu-img", ("qemu-utils",)), ("fusermount3", ("fuse3",)))
    except ToolFailed as exc:
        print(f"bench: cannot run: {exc}", file=sys.stderr)
        return 1
    for tool in tools:
        tool.setup()
        if tool.problem:
            print(f"  {tool.name}: {tool.problem}", flush=True)
    results = Results([ToolInfo(t.name, t.role, "" if t.problem else t.version()) for t in tools])
    with scratch("tarfuse-bench-", args.workdir, keep=args.keep) as workdir:
        runtime = args.runtime if args.runtime is not None else (0.5 if args.quick else 5.0)
        cap = args.cap if args.cap is not None else (5.0 if args.quick else 30.0)
        options = Options(QUICK if args.quick else FULL, args.reps, runtime, cap, workdir)
        with reclaim_paused(keep=not args.pause_reclaim) as reclaim:
            for case in cases:
                if case == BOOT:
                    run_boot(tools, options, results)
                else:
                    run_case(case, tools, options, results)
    meta = machine() | {
        "reclaim": reclaim, "command": _command_shown(), "tarfuse_commit": _tarfuse_commit(),
        "load_start": load_start, "load_end": load_average(), "reps": options.reps,
        "fio_runtime": options.fio_runtime, "cap": options.cap, "quick": args.quick,
        "elapsed": f"{(time.monotonic() - started) / 60:.1f} min",
    }  # fmt: skip
    write_outputs(results, meta, args.out, _docs_page(args))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="small data and short runs (smoke test)")
    add("--peers", action="store_true", help="also measure the peers, installing those that are missing")
    add("--only", metavar="CASE[,CASE]", help=f"cases to run, of: {', '.join(SELECTABLE)}")
    add("--tools", metavar="TOOL[,TOOL]", help="tools to run (the limits always run)")
    add("--reps", type=int, default=3, help="repetitions per figure (default 3)")
    add("--runtime", type=float, help="seconds per fio run (default 5, --quick 0.5)")
    add("--cap", type=float, help="seconds before a step is cut off (default 30, --quick 5)")
    add("--out", type=Path, default=REPO / "build" / "bench", help="where results.{md,json,svg} go")
    add("--workdir", default=None, help="parent of the temporary data directory (default /tmp)")
    add("--docs", type=Path, help="also write the figures into this page (default after a full run with "
        "--peers: docs/benchmarks.md, between its BEGIN and END comments)")  # fmt: skip
    add("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    add("--keep", action="store_true", help="keep the data directory (for debugging)")
    add("--pause-reclaim", action="store_true", help="pause DAMON proactive reclaim for the run, as "
        "root, and restore it after (machine-wide; the report says whether it was used)")  # fmt: skip
    add("--render", type=Path, metavar="JSON", help="measure nothing: write the tables of a results.json")
    return parser


def _docs_page(args: argparse.Namespace) -> Path | None:
    """The page the figures go into: --docs, or docs/benchmarks.md after a full run (all cases, peers)."""
    if args.no_docs or args.docs:
        return None if args.no_docs else args.docs
    full = args.peers and not (args.quick or args.only or args.tools or args.render)
    return REPO / "docs" / "benchmarks.md" if full else None


def _pick(names: str | None, known: Sequence[str], what: str, hint: str = "") -> Container[str]:
    """The comma-separated `names`, all of them `known` (default: all)."""
    if names is None:
        return known
    if unknown := set(names.split(",")) - set(known):
        raise SystemExit(f"unknown {what}(s): {', '.join(sorted(unknown))}; known: {', '.join(known)}{hint}")
    return names.split(",")


def _command_shown() -> str:
    """The command line, less the options that only say where output goes."""
    words, shown = iter(sys.argv[1:]), []
    for word in words:
        if word in ("--out", "--docs", "--workdir"):
            next(words, None)
        elif not word.startswith(("--out=", "--docs=", "--workdir=")):
            shown.append(word)
    return shlex.join(["python", "-m", "scripts.bench", *shown]) if shown != ["--peers"] else "make bench"


def _tarfuse_commit() -> str:
    """The commit of the tarfuse code measured, and whether tarfuse/ had uncommitted changes."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" with uncommitted changes" if git("status", "--porcelain", "--", "tarfuse") else "")


if __name__ == "__main__":
    run_main(main)
