"""What a run measured: samples per (case, metric, tool), their medians and ratios, and the targets.

A figure counts only if the tool's bytes were verified; otherwise its row carries the reason instead
("WRONG BYTES ...", "timed out after N s", "failed: ...", "n/a: ..."). Ratios divide a tool's median by
the best limit's median, by the C ceiling's and by the best peer's, so they hold even when the machine is
noisy.
"""

import datetime
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

X = "\u00d7"  # the multiplication sign
C_CEILING, C_CEILING_MT = "C ceiling", "C ceiling mt"  # fuse_ceiling.c, role "limit"
CEILINGS = (C_CEILING, C_CEILING_MT)
BOOT_RAW, BOOT_MOUNT = "raw file", "tarfuse mount"  # the two ways the boot step boots the sample image


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    many_readers: bool = False  # "x C ceiling" divides by the better C loop, not the single-threaded one

    def format(self, value: float) -> str:
        if self.unit == "s":
            return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
        if self.unit == "GB/s":
            return f"{value:.2f} GB/s"
        if self.unit == "reads/s":
            return f"{value:,.0f}/s" if value >= 10 else f"{value:.2g}/s"
        return f"{value:.1f} {self.unit}"


METRICS = {
    m.key: m
    for m in (
        Metric("ready", "ready (command start to first byte read)", "s", False),
        Metric("seq", "sequential 1 MiB reads of the whole image, fresh mount", "GB/s", True),
        Metric("rand1", "random 4 KiB reads, 1 reader, unpinned (fio)", "reads/s", True),
        Metric("rand1-same", "random 4 KiB reads, 1 reader, server and fio on the same CPU", "reads/s", True),
        Metric("rand1-apart", "random 4 KiB reads, 1 reader, server on CPU 0, fio on CPU 1", "reads/s", True),
        Metric("rand4", "random 4 KiB reads, 4 readers, unpinned (fio)", "reads/s", True, True),
        Metric("qemu", "qemu-img convert -O raw to a file", "s", False, True),
        Metric("rss", "peak PSS of the daemon and all its descendants", "MiB", False),
    )
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


@dataclass(frozen=True)
class ToolInfo:
    name: str
    role: str  # "limit", "tarfuse" or "peer"
    version: str


@dataclass(frozen=True)
class CaseInfo:
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
        if outcome.status is None:
            outcome.status = status

    def exclude(self, case: str, metrics: tuple[str, ...], tool: str, status: str) -> None:
        """The tool takes no part in this case (not installed, not applicable, wrong bytes)."""
        self.excluded[(case, tool)] = status
        for metric in metrics:
            self.stop(case, metric, tool, status)

    def stopped(self, case: str, metric: str, tool: str) -> bool:
        return self.outcome(case, metric, tool).status is not None

    def best(self, case: str, metric: str, role: str) -> tuple[str, float] | None:
        """The best median among tools of `role` whose figures count, with the tool's name.

        The limit is the best of pread and losetup: the C ceilings have a column of their own (`ceiling`).
        """
        names = [t.name for t in self.tools if t.role == role and t.name not in CEILINGS]
        return self._best_of(case, metric, names)

    def ceiling(self, case: str, metric: str) -> tuple[str, float] | None:
        """What "x C ceiling" divides by: the single-threaded C loop for one reader, the better loop for
        several (4 fio readers, qemu-img's requests in flight)."""
        names = list(CEILINGS) if METRICS[metric].many_readers else [C_CEILING]
        return self._best_of(case, metric, names)

    def _best_of(self, case: str, metric: str, names: list[str]) -> tuple[str, float] | None:
        found = [(name, value) for name in names if (value := self.median(case, metric, name)) is not None]
        if not found:
            return None
        found.sort(key=lambda item: item[1], reverse=METRICS[metric].higher_is_better)
        return found[0]

    def median(self, case: str, metric: str, tool: str) -> float | None:
        outcome = self.outcomes.get((case, metric, tool))
        return outcome.median if outcome is not None and outcome.ok else None


# ---- Targets, checked on tarfuse's figures ------------------------------------------------------------

Check = Callable[[Results, str, str, float], bool | None]  # (results, case, metric, value); None: unknown


@dataclass(frozen=True)
class Target:
    """A figure tarfuse should reach. `group` says against what the set was stated: "peers" (the peers,
    start-up time and memory budgets) or "ceiling" (the C ceiling, what FUSE allows here)."""

    group: str
    case: str
    metric: str
    text: str
    met: Check
    tool: str = "tarfuse"  # whose figure is checked


def _times(factor: float, reference: str) -> Check:
    """`value` >= factor times the reference's median: "best peer", "ceiling" or a tool's name."""

    def check(results: Results, case: str, metric: str, value: float) -> bool | None:
        if reference == "best peer":
            found = results.best(case, metric, "peer")
        elif reference == "ceiling":
            found = results.ceiling(case, metric)
        else:
            median = results.median(case, metric, reference)
            found = None if median is None else (reference, median)
        return None if found is None else value >= factor * found[1]

    return check


def _both(first: Check, second: Check) -> Check:
    """Met if both parts are; not met if one is not; unknown (None) if a part has nothing to compare with."""

    def check(results: Results, case: str, metric: str, value: float) -> bool | None:
        parts = [first(results, case, metric, value), second(results, case, metric, value)]
        return False if False in parts else None if None in parts else True

    return check


def _at_most(limit: float) -> Check:
    return lambda results, case, metric, value: value <= limit


def targets(results: Results) -> list[Target]:
    best, ratarmount, ceiling = "best peer", "ratarmount", "ceiling"
    peers = [
        Target("peers", "plain", "seq", f"≥ 1.2{X} best peer", _times(1.2, best)),
        Target("peers", "plain", "rand1", f"≥ 2{X} ratarmount", _times(2, ratarmount)),
        Target("peers", "plain", "rand4", "≥ best peer", _times(1.0, best)),
        Target("peers", "sparse-oldgnu", "seq", f"≥ 1.2{X} best peer", _times(1.2, best)),
        Target("peers", "sparse-pax", "seq", f"≥ 1.2{X} best peer", _times(1.2, best)),
        Target("peers", "plain", "ready", "≤ 100 ms", _at_most(0.1)),
        Target("peers", "many", "ready", "≤ 0.3 s", _at_most(0.3)),
        Target("peers", "extents", "ready", "≤ 1 s", _at_most(1.0)),
    ]
    for case in results.cases:
        budget = 40 + 40 * case.extents / (1 << 20)
        text = f"≤ {budget:.0f} MiB (40 MiB + 40 B/extent)"
        peers.append(Target("peers", case.name, "rss", text, _at_most(budget)))
    return [
        *peers,
        Target("ceiling", "plain", "rand4", f"≥ 1.5{X} ratarmount and ≥ 0.6{X} the better C loop",
               _both(_times(1.5, ratarmount), _times(0.6, ceiling))),
        Target("ceiling", "plain", "rand1-same",
               f"≥ 0.6{X} C ceiling (single-threaded) and ≥ 1.2{X} ratarmount",
               _both(_times(0.6, ceiling), _times(1.2, ratarmount))),
        Target("ceiling", "plain", "rand1-apart", f"≥ 0.9{X} C ceiling", _times(0.9, ceiling)),
        Target("ceiling", "plain", "seq", f"≥ 1.3{X} ratarmount and ≥ 0.9{X} C ceiling (same readahead)",
               _both(_times(1.3, ratarmount), _times(0.9, ceiling))),
        Target("ceiling", "plain", "ready", "≤ 120 ms", _at_most(0.12)),
        Target("ceiling", "plain", "rss", "≤ 50 MiB PSS", _at_most(50), tool="tarfuse workers=2"),
    ]  # fmt: skip


# ---- The machine --------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{memory / (1 << 30):.0f} GiB",
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
