"""What a run measured: samples per (case, metric, tool), their medians and ratios, and the targets. A figure
counts only if the tool's bytes were verified; otherwise its row carries the reason ("WRONG BYTES ...",
"timed out after N s", "failed: ...", "n/a: ..."). Ratios divide medians (docs/benchmarks.md).
"""

import datetime
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

X = "\u00d7"  # the multiplication sign
C_CEILING, C_CEILING_MT = "C ceiling", "C ceiling mt"  # fuse_ceiling.c, role "limit"
CEILINGS = (C_CEILING, C_CEILING_MT)
BOOT_RAW, BOOT_MOUNT = "raw file", "tarfuse mount"  # the two ways the boot step boots the sample image
Best = tuple[str, float] | None  # a reference: (tool, median), or none with figures


class Metric(NamedTuple):
    unit: str
    higher_is_better: bool
    many_readers: bool = False  # "x C ceiling" divides by the better C loop, not the single-threaded one

    def format(self, value: float) -> str:
        if self.unit == "s":
            return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
        if self.unit == "reads/s":
            return f"{value:,.0f}/s" if value >= 10 else f"{value:.2g}/s"
        return f"{value:.2f} GB/s" if self.unit == "GB/s" else f"{value:.1f} {self.unit}"


METRICS = {  # what each one times: docs/benchmarks.md, "How it is measured"
    "ready": Metric("s", False),
    "seq": Metric("GB/s", True),
    "rand1": Metric("reads/s", True),
    "rand1-same": Metric("reads/s", True),
    "rand1-apart": Metric("reads/s", True),
    "rand4": Metric("reads/s", True, True),
    "qemu": Metric("s", False, True),
    "rss": Metric("MiB", False),
}


@dataclass
class Outcome:
    """What one tool did on one metric of one case: samples, or why there are none."""

    samples: list[float] = field(default_factory=list)
    status: str | None = None  # None: the samples count

    @property
    def ok(self) -> bool:
        return self.status is None and bool(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


class ToolInfo(NamedTuple):
    name: str
    role: str  # "limit", "tarfuse" or "peer"
    version: str


class CaseInfo(NamedTuple):
    name: str
    title: str
    members: int
    extents: int
    metrics: tuple[str, ...]


@dataclass
class Results:
    """Everything one run measured, in the order it ran."""

    tools: list[ToolInfo]
    cases: list[CaseInfo] = field(default_factory=list)
    outcomes: dict[tuple[str, str, str], Outcome] = field(default_factory=dict)
    verified: dict[tuple[str, str], str] = field(default_factory=dict)  # (case, tool) -> how
    excluded: dict[tuple[str, str], str] = field(default_factory=dict)  # (case, tool) -> why not measured
    boot: dict[str, list[float]] = field(default_factory=dict)  # BOOT_RAW / BOOT_MOUNT -> seconds
    boot_status: str | None = None  # why the boot step has no (or not all) figures

    def outcome(self, case: str, metric: str, tool: str) -> Outcome:
        return self.outcomes.setdefault((case, metric, tool), Outcome())

    def add(self, case: str, metric: str, tool: str, value: float) -> None:
        self.outcome(case, metric, tool).samples.append(value)

    def stop(self, case: str, metric: str, tool: str, status: str) -> None:
        """Record why `tool` has no (more) figures for this metric; the first reason stays."""
        outcome = self.outcome(case, metric, tool)
        outcome.status = outcome.status or status

    def exclude(self, case: str, metrics: tuple[str, ...], tool: str, status: str) -> None:
        """The tool takes no part in this case (not installed, not applicable, wrong bytes)."""
        self.excluded[(case, tool)] = status
        for metric in metrics:
            self.stop(case, metric, tool, status)

    def median(self, case: str, metric: str, tool: str) -> float | None:
        outcome = self.outcomes.get((case, metric, tool))
        return outcome.median if outcome is not None and outcome.ok else None

    def best(self, case: str, metric: str, role: str) -> Best:
        """The best median among tools of `role`; the C ceilings are not a limit here (see `ceiling`)."""
        names = [t.name for t in self.tools if t.role == role and t.name not in CEILINGS]
        return self._best_of(case, metric, names)

    def ceiling(self, case: str, metric: str) -> Best:
        """The single-threaded C loop for one reader, the better loop for several requests in flight."""
        return self._best_of(case, metric, list(CEILINGS) if METRICS[metric].many_readers else [C_CEILING])

    def _best_of(self, case: str, metric: str, names: list[str]) -> Best:
        found = [(name, value) for name in names if (value := self.median(case, metric, name)) is not None]
        found.sort(key=lambda item: item[1], reverse=METRICS[metric].higher_is_better)
        return found[0] if found else None

    def references(self, case: str, metric: str) -> tuple[Best, Best, Best]:
        """What a figure is divided by: the limit, the C ceiling, the best peer."""
        return self.best(case, metric, "limit"), self.ceiling(case, metric), self.best(case, metric, "peer")


class Target(NamedTuple):
    """A figure tarfuse should reach, stated against the peers ("peers") or the C ceiling ("ceiling")."""

    group: str
    case: str
    metric: str
    text: str
    at_least: tuple[tuple[float, str], ...] = ()  # (factor, "best peer" | "ceiling" | a tool's name)
    at_most: float | None = None
    tool: str = "tarfuse"  # whose figure is checked

    def met(self, results: Results, value: float) -> bool | None:
        """Whether `value` meets the target; None where a reference has no figure to compare with."""
        if self.at_most is not None:
            return value <= self.at_most
        found = [
            (factor, _reference(results, self.case, self.metric, name)) for factor, name in self.at_least
        ]
        parts = [None if median is None else value >= factor * median for factor, median in found]
        return False if False in parts else None if None in parts else True


def _reference(results: Results, case: str, metric: str, name: str) -> float | None:
    """The median `name` stands for: the best peer's, the C ceiling's, or a tool's."""
    if name in ("best peer", "ceiling"):
        found = results.best(case, metric, "peer") if name == "best peer" else results.ceiling(case, metric)
        return None if found is None else found[1]
    return results.median(case, metric, name)


def targets(results: Results) -> list[Target]:
    best, ratarmount, ceiling = "best peer", "ratarmount", "ceiling"
    budgets = [(case.name, 40 + 40 * case.extents / (1 << 20)) for case in results.cases]
    return [
        Target("peers", "plain", "seq", f"≥ 1.2{X} best peer", ((1.2, best),)),
        Target("peers", "plain", "rand1", f"≥ 2{X} ratarmount", ((2, ratarmount),)),
        Target("peers", "plain", "rand4", "≥ best peer", ((1.0, best),)),
        Target("peers", "sparse-oldgnu", "seq", f"≥ 1.2{X} best peer", ((1.2, best),)),
        Target("peers", "sparse-pax", "seq", f"≥ 1.2{X} best peer", ((1.2, best),)),
        Target("peers", "plain", "ready", "≤ 100 ms", at_most=0.1),
        Target("peers", "many", "ready", "≤ 0.3 s", at_most=0.3),
        Target("peers", "extents", "ready", "≤ 1 s", at_most=1.0),
        *(Target("peers", c, "rss", f"≤ {b:.0f} MiB (40 MiB + 40 B/extent)", at_most=b) for c, b in budgets),
        # plain reads answered in C (serve/direct.py): what FUSE allows, within 15 %
        Target("ceiling", "plain", "rand4", f"≥ 1.0{X} the better C loop and ≥ 1.3{X} ratarmount",
               ((1.0, ceiling), (1.3, ratarmount))),
        Target("ceiling", "plain", "rand1-same", f"≥ 0.85{X} C ceiling (single-threaded) and ≥ 1.2{X} "
               "ratarmount", ((0.85, ceiling), (1.2, ratarmount))),
        Target("ceiling", "plain", "rand1-apart", f"≥ 3{X} C ceiling (the spin)", ((3.0, ceiling),)),
        Target("ceiling", "plain", "seq", f"≥ 1.3{X} ratarmount and ≥ 0.9{X} C ceiling (same readahead)",
               ((1.3, ratarmount), (0.9, ceiling))),
        Target("ceiling", "plain", "ready", "≤ 120 ms", at_most=0.12),
        Target("ceiling", "plain", "rss", "≤ 50 MiB PSS", at_most=50, tool="tarfuse workers=2"),
    ]  # fmt: skip


def machine() -> dict[str, str]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": cpu or "unknown CPU",
        "cores": str(os.cpu_count()),
        "memory": f"{memory / (1 << 30):.0f} GiB",
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
