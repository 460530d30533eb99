"""Time hole-aware tools on the 4 GiB sparse bench image, with and without SEEK_DATA/SEEK_HOLE answered.

    .venv/bin/python -m scripts.bench.seek [--quick] [--case sparse-pax] [--plain-venv DIR]

Servers, steps and columns: docs/benchmarks.md, "SEEK_DATA/SEEK_HOLE", which keeps a run's output. Each step
runs once, on a fresh mount, with the page cache dropped first (as root): run it twice to see the noise.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .data import FULL, QUICK, Dataset, build
from .harness import ToolFailed, drop_caches, run_main, run_timed, scratch, watchdog
from .host import CACHE, venv_install
from .peers import Ratarmount
from .report import DASH, table
from .results import load_average, machine
from .tools import REPO, Tarfuse, Tool

CAP_S = 600.0  # per step; a daemon that hangs ends the step instead of stalling the run
MiB = 1 << 20
NO_HANDLER = "no lseek handler"  # what tarfuse --version says on a pyfuse3 without one

Step = Callable[[str, Path, Dataset], list[str]]  # (served image, scratch, dataset) -> table cells


class PlainTarfuse(Tarfuse):
    """This checkout's tarfuse on plain pyfuse3 from PyPI, which has no lseek handler: the "before"."""

    name = "tarfuse-plain"

    def __init__(self, venv: Path) -> None:
        self.venv = venv

    def command(self) -> list[str]:
        # The checkout first on the path: the same tarfuse as the "after", not the copy pip installed.
        return ["env", f"PYTHONPATH={REPO}", str(self.venv / "bin" / "python"), "-m", "tarfuse"]

    def _setup(self) -> None:
        venv_install(self.venv, "tarfuse", str(REPO))  # its dependencies, plain pyfuse3 among them
        if NO_HANDLER not in self.version():
            raise ToolFailed(f"{self.venv} has a pyfuse3 with an lseek handler: {self.version()}")


def qemu_map(image: str, work: Path, dataset: Dataset) -> list[str]:
    seconds, out = run_timed(["qemu-img", "map", "--output=json", "-f", "raw", image], CAP_S)
    data = [entry for entry in json.loads(out) if entry["data"]]
    return [f"{seconds:.2f} s", f"{len(data):,} ({sum(entry['length'] for entry in data) / MiB:,.0f} MiB)"]


def copy_sparse(image: str, work: Path, dataset: Dataset) -> list[str]:
    copy = work / "copy.raw"
    seconds, _ = run_timed(["cp", "--sparse=auto", image, str(copy)], CAP_S)
    with copy.open("rb") as file:
        if hashlib.file_digest(file, "sha256").hexdigest() != dataset.model.sha256:
            raise ToolFailed("the copy's sha256 differs from the image's")
    return [f"{seconds:.2f} s", _du(copy)]  # the copy stays: convert's output is compared with it


def convert_qcow2(image: str, work: Path, dataset: Dataset) -> list[str]:
    qcow2, copy = work / "copy.qcow2", str(work / "copy.raw")
    try:
        seconds, _ = run_timed(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, str(qcow2)], CAP_S)
        run_timed(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(qcow2), copy], CAP_S)
        return [f"{seconds:.2f} s", _du(qcow2)]
    finally:
        qcow2.unlink(missing_ok=True)
        Path(copy).unlink(missing_ok=True)


def _du(path: Path) -> str:
    return f"{path.stat().st_blocks * 512 / MiB:,.1f} MiB"


STEPS: tuple[tuple[Step, str], ...] = (
    (qemu_map, "qemu-img map | data extents (MiB)"),
    (copy_sparse, "cp --sparse=auto | du of the copy"),
    (convert_qcow2, "qemu-img convert -O qcow2 | du of the qcow2"),
)


def measure(tool: Tool, dataset: Dataset, work: Path) -> list[str]:
    """The row of `tool`: each step on a fresh mount, with cold caches; a failed step says why."""
    cells: list[str] = []
    for step, header in STEPS:
        drop_caches()
        try:
            with tool.serve(dataset, work, CAP_S) as served, watchdog(served, CAP_S):
                assert served.qemu_source is not None  # a FUSE tool: the image's path
                cells += step(served.qemu_source, work, dataset)
        except (OSError, subprocess.SubprocessError, ToolFailed) as exc:
            reason = str(exc).replace("|", "/").replace("\n", " ")[:200] or type(exc).__name__
            cells += [f"failed: {reason}"] + [DASH] * header.count("|")
            print(f"  {tool.name}: {step.__name__} failed: {reason}", file=sys.stderr)
    return cells


def data_runs(dataset: Dataset) -> int:
    """The image's data extents with adjacent ones merged: what an exact `qemu-img map` lists."""
    runs, end = 0, -1
    for extent in dataset.model.extents:
        runs += extent.offset != end
        end = extent.offset + extent.length
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 512 MiB image with 32 MiB of data")
    parser.add_argument("--case", choices=("sparse-oldgnu", "sparse-pax"), default="sparse-oldgnu")
    parser.add_argument("--plain-venv", type=Path, default=CACHE / "venv-tarfuse-plain",
                        help="venv with plain pyfuse3, made if missing (default: %(default)s)")  # fmt: skip
    parser.add_argument("--workdir", help="parent of the temporary data directory (default /tmp)")
    args = parser.parse_args()
    servers: list[tuple[str, Tool]] = [
        ("tarfuse, lseek (after)", Tarfuse()),
        ("tarfuse, no lseek (before)", PlainTarfuse(args.plain_venv)),
        ("ratarmount", Ratarmount()),
    ]
    for _, tool in servers:
        tool.setup()
    if NO_HANDLER in servers[0][1].version():
        raise SystemExit(f"{servers[0][1].version()}: run make dev for the patched pyfuse3")
    started, load = machine(), load_average()
    with scratch("tarfuse-seek-", args.workdir) as work:
        print(f"building {args.case} in {work}", flush=True)
        dataset = build(args.case, work, QUICK if args.quick else FULL)
        rows = []
        for label, tool in servers:
            print(f"{label}: {tool.problem or 'measuring'}", flush=True)
            cells = (
                [f"not run: {tool.problem}"] + [DASH] * 5 if tool.problem else measure(tool, dataset, work)
            )
            rows.append([label, *cells])
    print(f"\n{dataset.title}; {data_runs(dataset):,} data runs once adjacent extents merge")
    print(f"{started['date']}; Linux {started['kernel']}, {started['cpu']}, {started['cores']} cores")
    print(f"load average {load} at the start, {load_average()} at the end; one run per figure")
    dropped = "dropped" if os.geteuid() == 0 else "NOT dropped (not root)"
    print(f"page cache {dropped} before each step; each step on a fresh mount")
    for label, tool in servers:
        print(f"- {label}: {tool.version()}")
    print()
    print("\n".join(table(["server", *" | ".join(h for _, h in STEPS).split(" | ")], rows)))


if __name__ == "__main__":
    run_main(main)
