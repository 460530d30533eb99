"""Benchmark results: samples per (case, metric, tool), their medians and ratios, as markdown and JSON.

A figure counts only if the tool's bytes were verified; otherwise its row carries the reason instead
("WRONG BYTES ...", "timed out after N s", "failed: ...", "n/a: ..."). Ratios divide a tool's median by
the best limit's median and by the best peer's median, so they hold even when the machine is noisy.
"""

import datetime
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

X, DASH = "\u00d7", "\u2013"  # the multiplication sign and the en dash, for the tables
NOTES_HEADING = "## Notes"  # docs/benchmarks.md keeps everything from this heading on across runs


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool

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
        Metric("rand1", "random 4 KiB reads, 1 reader (fio)", "reads/s", True),
        Metric("rand4", "random 4 KiB reads, 4 readers (fio)", "reads/s", True),
        Metric("qemu", "qemu-img convert -O raw to a file", "s", False),
        Metric("rss", "daemon peak RSS (VmHWM)", "MiB", False),
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
        """The best median among tools of `role` whose figures count, with the tool's name."""
        key = METRICS[metric]
        found = [
            (t.name, o.median)
            for t in self.tools
            if t.role == role and (o := self.outcomes.get((case, metric, t.name))) is not None and o.ok
        ]
        if not found:
            return None
        found.sort(key=lambda item: item[1], reverse=key.higher_is_better)
        return found[0]

    def median(self, case: str, metric: str, tool: str) -> float | None:
        outcome = self.outcomes.get((case, metric, tool))
        return outcome.median if outcome is not None and outcome.ok else None


# ---- Targets (issue 4), checked on tarfuse's figures ------------------------------------------------


@dataclass(frozen=True)
class Target:
    case: str
    metric: str
    text: str
    met: Callable[[Results, float], bool | None]  # None: nothing to compare with


def _vs_best_peer(factor: float) -> Callable[[Results, str, str, float], bool | None]:
    def check(results: Results, case: str, metric: str, value: float) -> bool | None:
        best = results.best(case, metric, "peer")
        return None if best is None else value >= factor * best[1]

    return check


def _targets(results: Results) -> list[Target]:
    targets: list[Target] = []

    def peer(case: str, metric: str, factor: float, text: str) -> None:
        check = _vs_best_peer(factor)
        targets.append(Target(case, metric, text, lambda r, v: check(r, case, metric, v)))

    def at_most(case: str, metric: str, limit: float, text: str) -> None:
        targets.append(Target(case, metric, text, lambda r, v: v <= limit))

    peer("plain", "seq", 1.2, f"≥ 1.2{X} best peer")

    def rand1(r: Results, v: float) -> bool | None:
        ratarmount = r.median("plain", "rand1", "ratarmount")
        return None if ratarmount is None else v >= 2 * ratarmount

    targets.append(Target("plain", "rand1", f"≥ 2{X} ratarmount", rand1))
    peer("plain", "rand4", 1.0, "≥ best peer")
    peer("sparse-oldgnu", "seq", 1.2, f"≥ 1.2{X} best peer")
    peer("sparse-pax", "seq", 1.2, f"≥ 1.2{X} best peer")
    at_most("plain", "ready", 0.1, "≤ 100 ms")
    at_most("many", "ready", 0.3, "≤ 0.3 s")
    at_most("extents", "ready", 1.0, "≤ 1 s")
    for case in results.cases:
        budget = 40 + 40 * case.extents / (1 << 20)
        at_most(case.name, "rss", budget, f"≤ {budget:.0f} MiB (40 MiB + 40 B/extent)")
    return targets


# ---- Markdown and JSON --------------------------------------------------------------------------------


def _ratio(value: float | None, reference: tuple[str, float] | None) -> str:
    if value is None or reference is None or reference[1] == 0:
        return DASH
    ratio = value / reference[1]
    if ratio >= 100:
        return f"{ratio:,.0f}{X}"
    return f"{ratio:.1f}{X}" if ratio >= 10 else f"{ratio:.2f}{X}"


def summary_table(results: Results) -> list[str]:
    """tarfuse against the limit, the best peer and issue 4's targets."""
    lines = [
        f"| case | metric | tarfuse | limit | {X} limit | best peer | {X} best peer | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    cases = {c.name for c in results.cases}
    for target in _targets(results):
        if target.case not in cases:
            continue
        metric = METRICS[target.metric]
        outcome = results.outcomes.get((target.case, target.metric, "tarfuse"))
        value = results.median(target.case, target.metric, "tarfuse")
        limit = results.best(target.case, target.metric, "limit")
        peer = results.best(target.case, target.metric, "peer")
        shown = (
            metric.format(value)
            if value is not None
            else _cell((outcome.status if outcome else None) or DASH)
        )
        met = None if value is None else target.met(results, value)
        lines.append(
            f"| {target.case} | {target.metric} | {shown} | {_named(metric, limit)} | {_ratio(value, limit)} "
            f"| {_named(metric, peer)} | {_ratio(value, peer)} | {target.text} "
            f"| {DASH if met is None else 'yes' if met else '**no**'} |"
        )
    return lines


def _cell(text: str) -> str:
    """Make text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _named(metric: Metric, best: tuple[str, float] | None) -> str:
    return DASH if best is None else f"{metric.format(best[1])} ({best[0]})"


def case_table(results: Results, case: CaseInfo) -> list[str]:
    lines = [
        f"| metric | tool | median | min{DASH}max | {X} limit | {X} best peer | notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in ("ready", *case.metrics, "rss"):
        metric = METRICS[key]
        limit, peer = results.best(case.name, key, "limit"), results.best(case.name, key, "peer")
        for tool in results.tools:
            outcome = results.outcomes.get((case.name, key, tool.name))
            if outcome is None or (case.name, tool.name) in results.excluded:
                continue
            name = f"**{tool.name}**" if tool.role == "tarfuse" else tool.name
            if outcome.ok:
                value = outcome.median
                spread = f"{metric.format(min(outcome.samples))} {DASH} {metric.format(max(outcome.samples))}"
                note = f"n={len(outcome.samples)}"
                lines.append(
                    f"| {metric.key} | {name} | {metric.format(value)} | {spread} | {_ratio(value, limit)} "
                    f"| {_ratio(value, peer)} | {note} |"
                )
            else:
                status = _cell(outcome.status or "no figures")
                lines.append(f"| {metric.key} | {name} | {DASH} | {DASH} | {DASH} | {DASH} | {status} |")
    return lines


def verification_lines(results: Results, case: str) -> list[str]:
    checked = [f"{tool}: {how}" for (c, tool), how in results.verified.items() if c == case]
    left_out = [f"{tool}: {why}" for (c, tool), why in results.excluded.items() if c == case]
    lines = [f"Bytes checked: {'; '.join(checked)}."] if checked else []
    if left_out:
        lines += ["", f"Not measured: {'; '.join(left_out)}."]
    return lines


def markdown(results: Results, meta: dict[str, Any]) -> str:
    lines = [
        "# tarfuse benchmarks",
        "",
        f"Generated by `scripts/bench.py` (`make bench`) on {meta['date']}.",
        "",
        f"- Command: `{meta['command']}`; tarfuse at commit {meta['tarfuse_commit']}",
        f"- Machine: Linux {meta['kernel']}, {meta['cpu']}, {meta['cores']} cores, {meta['memory']} RAM; "
        f"load average {meta['load_start']} at the start, {meta['load_end']} at the end "
        "(a shared host: compare ratios, not absolute figures)",
        f"- Page cache: {meta.get('reclaim', 'proactive reclaim not recorded')}",
        f"- Run: {meta['reps']} repetitions per figure, fio {meta['fio_runtime']} s per run, "
        f"time cap {meta['cap']:g} s per step; took {meta['elapsed']}",
        "- Versions: " + "; ".join(f"{t.name}: {t.version}" for t in results.tools if t.version),
        "",
        "## How it is measured",
        "",
        *_method(),
        "",
        "## tarfuse against the limit, the peers and the targets of issue 4",
        "",
        f"`{X} limit` and `{X} best peer` divide tarfuse's median by theirs: above 1 is better for "
        "throughput (GB/s, reads/s), below 1 is better for times and memory.",
        "",
        *summary_table(results),
        "",
        "## All figures",
    ]
    for case in results.cases:
        lines += ["", f"### {case.name}: {case.title}", "", *case_table(results, case)]
        lines += ["", *verification_lines(results, case.name)]
    return "\n".join(lines).rstrip() + "\n"


def _method() -> list[str]:
    return [
        "- Everything in one run, on the same data, one repetition of every tool after the other, so noise "
        "from other work on the host spreads over all tools alike. The archive is read once before each "
        "step (tar warm in the page cache); each repetition mounts afresh (FUSE cache cold).",
        "- The limit: `pread` reads the member's bytes straight out of the tar in the bench's own Python "
        "(holes of sparse members filled from a zero buffer; its ready time is `dd` reading the first "
        "byte; fio reads the tar's byte range buffered, qemu-img a `json:` raw driver with offset and "
        "size); `losetup` maps the member's byte range with `losetup -r --offset --sizelimit` "
        "(non-sparse members only).",
        "- ready: from the command's start (the daemon in the foreground) until the image's first byte "
        "reads, polled every millisecond.",
        "- seq: 1 MiB `preadv` calls from offset 0 to the end on a fresh mount; for the sparse cases this "
        "is the full read of the sparse image.",
        "- rand1/rand4: `fio --rw=randread --bs=4k --direct=1 --ioengine=psync --randrepeat=1 "
        "--time_based` with 1 or 4 jobs, a fresh mount per run (the pread limit reads buffered).",
        "- qemu: `qemu-img convert -f raw -O raw` of the mounted image to a file in the bench's temporary "
        "directory, deleted afterwards.",
        "- rss: VmHWM of the daemon and its children (nbdfuse runs nbdkit) when it is unmounted, after the "
        "full read (or after the first byte, where a case has no read metric).",
        "- Bytes: every tool's image is checked against the model of the image before its figures count: "
        "its size, 70-odd sampled ranges (ends, extent edges, random places), then the sha256 of a full "
        "read (within the time cap).",
        "- Peers run as their authors document: ratarmount `-f --index-file :memory:` (index built at "
        "every mount, like tarfuse, which has no index), `nbdfuse -r MNT/FILE [ nbdkit --exit-with-parent "
        "-r file TAR --filter=tar tar-entry=MEMBER ]`, `archivemount -f -o readonly`. tarfuse runs with "
        "`-f -o member=MEMBER`.",
    ]


def to_json(results: Results, meta: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for (case, key, tool), outcome in results.outcomes.items():
        metric = METRICS[key]
        role = next(t.role for t in results.tools if t.name == tool)
        value = outcome.median if outcome.ok else None
        limit, peer = results.best(case, key, "limit"), results.best(case, key, "peer")
        rows.append(
            {
                "case": case,
                "metric": key,
                "unit": metric.unit,
                "higher_is_better": metric.higher_is_better,
                "tool": tool,
                "role": role,
                "samples": outcome.samples,
                "median": value,
                "min": min(outcome.samples) if outcome.ok else None,
                "max": max(outcome.samples) if outcome.ok else None,
                "status": outcome.status,
                "limit": limit[0] if limit else None,
                "ratio_to_limit": value / limit[1] if value is not None and limit else None,
                "best_peer": peer[0] if peer else None,
                "ratio_to_best_peer": value / peer[1] if value is not None and peer else None,
            }
        )
    return {
        "meta": meta,
        "cases": [c.__dict__ | {"metrics": list(c.metrics)} for c in results.cases],
        "tools": [t.__dict__ for t in results.tools],
        "verified": [{"case": c, "tool": t, "how": how} for (c, t), how in results.verified.items()],
        "not_measured": [{"case": c, "tool": t, "why": why} for (c, t), why in results.excluded.items()],
        "results": rows,
    }


def from_json(data: dict[str, Any]) -> tuple[Results, dict[str, Any]]:
    """Rebuild the results of a run from its results.json, to render them again."""
    results = Results([ToolInfo(t["name"], t["role"], t["version"]) for t in data["tools"]])
    for case in data["cases"]:
        results.cases.append(
            CaseInfo(case["name"], case["title"], case["members"], case["extents"], tuple(case["metrics"]))
        )
    for row in data["results"]:
        outcome = results.outcome(row["case"], row["metric"], row["tool"])
        outcome.samples, outcome.status = list(row["samples"]), row["status"]
    for item in data["verified"]:
        results.verified[(item["case"], item["tool"])] = item["how"]
    for item in data["not_measured"]:
        results.excluded[(item["case"], item["tool"])] = item["why"]
    return results, data["meta"]


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
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


def write_docs(path: Path, text: str) -> None:
    """Write the generated page, keeping any hand-written section from NOTES_HEADING on."""
    notes = ""
    if path.exists():
        old = path.read_text()
        at = old.find("\n" + NOTES_HEADING)
        if at >= 0:
            notes = "\n" + old[at + 1 :].rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + notes)
