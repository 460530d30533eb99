"""Benchmark results: samples per (case, metric, tool), their medians and ratios, as markdown and JSON.

A figure counts only if the tool's bytes were verified; otherwise its row carries the reason instead
("WRONG BYTES ...", "timed out after N s", "failed: ...", "n/a: ..."). Ratios divide a tool's median by
the best limit's median, by the C ceiling's and by the best peer's, so they hold even when the machine is
noisy. The chart (matplotlib, imported only to draw it) shows the same ratios to the C ceiling.
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
C_CEILING, C_CEILING_MT = "C ceiling", "C ceiling mt"  # scripts/fuse_ceiling.c, role "limit"
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


# ---- Targets (issues 4 and 15), checked on tarfuse's figures -------------------------------------------

Check = Callable[["Results", float], bool | None]  # None: nothing to compare with


@dataclass(frozen=True)
class Target:
    issue: int
    case: str
    metric: str
    text: str
    met: Check
    tool: str = "tarfuse"  # whose figure is checked


def _all(*checks: Check) -> Check:
    """Met if every part is; not met if one is not; unknown (None) if a part has nothing to compare with."""

    def check(results: Results, value: float) -> bool | None:
        parts = [c(results, value) for c in checks]
        return False if False in parts else None if None in parts else True

    return check


def _times(case: str, metric: str, factor: float, reference: str) -> Check:
    """`value` >= factor times the reference's median: "best peer", "ceiling" or a tool's name."""

    def check(results: Results, value: float) -> bool | None:
        if reference == "best peer":
            found = results.best(case, metric, "peer")
        elif reference == "ceiling":
            found = results.ceiling(case, metric)
        else:
            median = results.median(case, metric, reference)
            found = None if median is None else (reference, median)
        return None if found is None else value >= factor * found[1]

    return check


def _at_most(limit: float) -> Check:
    return lambda results, value: value <= limit


def _targets(results: Results) -> list[Target]:
    best, ratarmount, ceiling = "best peer", "ratarmount", "ceiling"
    targets = [
        Target(4, "plain", "seq", f"≥ 1.2{X} best peer", _times("plain", "seq", 1.2, best)),
        Target(4, "plain", "rand1", f"≥ 2{X} ratarmount", _times("plain", "rand1", 2, ratarmount)),
        Target(4, "plain", "rand4", "≥ best peer", _times("plain", "rand4", 1.0, best)),
        Target(4, "sparse-oldgnu", "seq", f"≥ 1.2{X} best peer", _times("sparse-oldgnu", "seq", 1.2, best)),
        Target(4, "sparse-pax", "seq", f"≥ 1.2{X} best peer", _times("sparse-pax", "seq", 1.2, best)),
        Target(4, "plain", "ready", "≤ 100 ms", _at_most(0.1)),
        Target(4, "many", "ready", "≤ 0.3 s", _at_most(0.3)),
        Target(4, "extents", "ready", "≤ 1 s", _at_most(1.0)),
    ]
    for case in results.cases:
        budget = 40 + 40 * case.extents / (1 << 20)
        text = f"≤ {budget:.0f} MiB (40 MiB + 40 B/extent)"
        targets.append(Target(4, case.name, "rss", text, _at_most(budget)))
    rand4 = _all(_times("plain", "rand4", 1.5, ratarmount), _times("plain", "rand4", 0.6, ceiling))
    same = _all(_times("plain", "rand1-same", 0.6, ceiling), _times("plain", "rand1-same", 1.2, ratarmount))
    seq = _all(_times("plain", "seq", 1.3, ratarmount), _times("plain", "seq", 0.9, ceiling))
    return [
        *targets,
        Target(15, "plain", "rand4", f"≥ 1.5{X} ratarmount and ≥ 0.6{X} the better C loop", rand4),
        Target(
            15, "plain", "rand1-same", f"≥ 0.6{X} C ceiling (single-threaded) and ≥ 1.2{X} ratarmount", same
        ),
        Target(
            15, "plain", "rand1-apart", f"≥ 0.9{X} C ceiling", _times("plain", "rand1-apart", 0.9, ceiling)
        ),
        Target(15, "plain", "seq", f"≥ 1.3{X} ratarmount and ≥ 0.9{X} C ceiling (same readahead)", seq),
        Target(15, "plain", "ready", "≤ 120 ms", _at_most(0.12)),
        Target(15, "plain", "rss", "≤ 50 MiB PSS", _at_most(50), tool="tarfuse workers=2"),
    ]


# ---- Markdown and JSON --------------------------------------------------------------------------------


def _ratio(value: float | None, reference: tuple[str, float] | None) -> str:
    if value is None or reference is None or reference[1] == 0:
        return DASH
    ratio = value / reference[1]
    if ratio >= 100:
        return f"{ratio:,.0f}{X}"
    return f"{ratio:.1f}{X}" if ratio >= 10 else f"{ratio:.2f}{X}"


def summary_table(results: Results) -> list[str]:
    """tarfuse against the limit, the C ceiling, the best peer and the targets of issues 4 and 15."""
    lines = [
        f"| issue | case | metric | tarfuse | limit | {X} limit | C ceiling | {X} C ceiling | best peer "
        f"| {X} best peer | target | met |",
        "| --- " * 12 + "|",
    ]
    cases = {c.name for c in results.cases}
    for target in _targets(results):
        if target.case not in cases:
            continue
        case, key = target.case, target.metric
        metric = METRICS[key]
        outcome = results.outcomes.get((case, key, target.tool))
        value = results.median(case, key, target.tool)
        limit, ceiling, peer = (
            results.best(case, key, "limit"),
            results.ceiling(case, key),
            results.best(case, key, "peer"),
        )
        shown = (
            metric.format(value)
            if value is not None
            else _cell((outcome.status if outcome else None) or DASH)
        )
        if target.tool != "tarfuse":
            shown += f" ({target.tool.removeprefix('tarfuse ')})"
        met = None if value is None else target.met(results, value)
        lines.append(
            f"| {target.issue} | {case} | {key} | {shown} | {_named(metric, limit)} | {_ratio(value, limit)} "
            f"| {_named(metric, ceiling)} | {_ratio(value, ceiling)} | {_named(metric, peer)} "
            f"| {_ratio(value, peer)} | {target.text} | {_met(met)} |"
        )
    return lines


def _met(met: bool | None) -> str:
    return DASH if met is None else "yes" if met else "**no**"


def _cell(text: str) -> str:
    """Make text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _named(metric: Metric, best: tuple[str, float] | None) -> str:
    return DASH if best is None else f"{metric.format(best[1])} ({best[0]})"


def case_table(results: Results, case: CaseInfo) -> list[str]:
    lines = [
        f"| metric | tool | median | min{DASH}max | {X} limit | {X} C ceiling | {X} best peer | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in ("ready", *case.metrics, "rss"):
        metric = METRICS[key]
        limit, peer = results.best(case.name, key, "limit"), results.best(case.name, key, "peer")
        ceiling = results.ceiling(case.name, key)
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
                    f"| {_ratio(value, ceiling)} | {_ratio(value, peer)} | {note} |"
                )
            else:
                status = _cell(outcome.status or "no figures")
                lines.append(
                    f"| {metric.key} | {name} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | {status} |"
                )
    return lines


def placement_table(results: Results) -> list[str]:
    """Random 4 KiB reads of the plain case, one row per tool: where the server and fio ran."""
    keys = ("rand1", "rand1-same", "rand1-apart", "rand4")
    if "plain" not in {c.name for c in results.cases}:
        return []
    lines = [
        "| tool | 1 reader, unpinned | 1 reader, same CPU | µs per read, same CPU | 1 reader, different CPUs "
        "| 4 readers, unpinned |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for tool in results.tools:
        values = {key: results.median("plain", key, tool.name) for key in keys}
        if all(v is None for v in values.values()):
            continue
        cells = [DASH if (v := values[k]) is None else METRICS[k].format(v) for k in keys]
        same = values["rand1-same"]
        per_read = DASH if not same else f"{1e6 / same:.1f} µs"
        name = f"**{tool.name}**" if tool.role == "tarfuse" else tool.name
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {per_read} | {cells[2]} | {cells[3]} |")
    return lines


def workers_table(results: Results) -> list[str]:
    """tarfuse's figures by number of worker processes (plain case), with the C ceilings for scale."""
    workers = [t for t in results.tools if t.role == "tarfuse" and t.name != "tarfuse"]
    one = results.median("plain", "rand4", "tarfuse workers=1")
    if not workers or "plain" not in {c.name for c in results.cases}:
        return []
    lines = [
        f"| tool | 4 readers, unpinned | {X} workers=1 | {X} C ceiling | sequential | ready | peak PSS |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tool in [*(t for t in results.tools if t.name in CEILINGS), *workers,
                 *(t for t in results.tools if t.name == "tarfuse")]:  # fmt: skip
        rand4 = results.median("plain", "rand4", tool.name)
        cells = []
        for key in ("seq", "ready", "rss"):
            value = results.median("plain", key, tool.name)
            cells.append(DASH if value is None else METRICS[key].format(value))
        shown = DASH if rand4 is None else METRICS["rand4"].format(rand4)
        scale = _ratio(rand4, None if one is None else ("workers=1", one))
        name = f"**{tool.name}**" if tool.role == "tarfuse" else tool.name
        lines.append(
            f"| {name} | {shown} | {scale} | {_ratio(rand4, results.ceiling('plain', 'rand4'))} "
            f"| {' | '.join(cells)} |"
        )
    return lines


def boot_table(results: Results) -> list[str]:
    if not results.boot:
        return [f"Not measured: {results.boot_status}."] if results.boot_status else []
    lines = [f"| booted from | median | min{DASH}max | n |", "| --- | --- | --- | --- |"]
    fmt = METRICS["ready"].format
    for name in (BOOT_RAW, BOOT_MOUNT):
        samples = results.boot.get(name)
        if samples:
            spread = f"{fmt(min(samples))} {DASH} {fmt(max(samples))}"
            lines.append(f"| {name} | {fmt(statistics.median(samples))} | {spread} | {len(samples)} |")
    if results.boot.get(BOOT_RAW) and results.boot.get(BOOT_MOUNT):
        raw, mount = statistics.median(results.boot[BOOT_RAW]), statistics.median(results.boot[BOOT_MOUNT])
        lines.append(f"| {X} raw file | {_ratio(mount, ('raw', raw))} | | |")
    if results.boot_status:
        lines += ["", f"Not all figures: {results.boot_status}."]
    return lines


def verification_lines(results: Results, case: str) -> list[str]:
    checked = [f"{tool}: {how}" for (c, tool), how in results.verified.items() if c == case]
    left_out = [f"{tool}: {why}" for (c, tool), why in results.excluded.items() if c == case]
    lines = [f"Bytes checked: {'; '.join(checked)}."] if checked else []
    if left_out:
        lines += ["", f"Not measured: {'; '.join(left_out)}."]
    return lines


def markdown(results: Results, meta: dict[str, Any], chart: str | None = None, chart_note: str = "") -> str:
    """The page: `chart` is the image's path relative to the page, `chart_note` why there is none."""
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
        "## tarfuse against the limit, the C ceiling, the peers and the targets of issues 4 and 15",
        "",
        f"`{X} limit`, `{X} C ceiling` and `{X} best peer` divide tarfuse's median by theirs: above 1 is "
        "better for throughput (GB/s, reads/s), below 1 is better for times and memory.",
        "",
        *summary_table(results),
    ]
    if chart is not None:
        lines += ["", f"![tarfuse, its peers and the limits, as a multiple of the C ceiling]({chart})"]
    elif chart_note:
        lines += ["", f"No chart: {chart_note}."]
    if placements := placement_table(results):
        lines += ["", "## One reader: where the server and the reader run (plain case)", "", *placements]
    if workers := workers_table(results):
        lines += ["", "## Workers: processes serving one mount (plain case)", "", *workers]
    if boot := boot_table(results):
        lines += [
            "",
            "## Time to boot: QEMU (KVM) from power-on to the sample image's serial line",
            "",
            *boot,
        ]
    lines += ["", "## All figures"]
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
        "(non-sparse members only). No FUSE server can reach it.",
        "- The C ceiling (`scripts/fuse_ceiling.c`, built by the bench with cc and libfuse3-dev): what a "
        "FUSE server can reach here. A minimal libfuse low-level server with tarfuse's read path: the "
        "member's segment map (holes included, so sparse members have a ceiling too), each read answered "
        "with `fuse_reply_data` from the tar's fd, holes from a buffer of zeros. `C ceiling` runs "
        "libfuse's single-threaded `fuse_session_loop`, `C ceiling mt` its `fuse_session_loop_mt`. "
        f"`{X} C ceiling` divides by the single-threaded loop for one reader (ready, seq, rand1 in every "
        "placement, rss) and by the better of the two loops where several requests are in flight (rand4, "
        f"qemu): 1.00{X} is as fast as FUSE gets, whatever the language.",
        "- Readahead and request size: tarfuse and the C ceiling both set the mount's "
        "`/sys/class/bdi/<major:minor>/read_ahead_kb` to 4096 right after the FUSE INIT reply (a per-mount "
        "setting, not a machine-wide one) and keep libfuse's 1 MiB requests (`max_pages` 256), so the "
        "sequential ceiling is the same game. The peers keep their own settings.",
        "- ready: from the command's start (the daemon in the foreground) until the image's first byte "
        "reads, polled every millisecond.",
        "- seq: 1 MiB `preadv` calls from offset 0 to the end on a fresh mount; for the sparse cases this "
        "is the full read of the sparse image.",
        "- Random reads: `fio --rw=randread --bs=4k --direct=1 --ioengine=psync --randrepeat=1 "
        "--time_based`, a fresh mount per run (the pread limit reads buffered). Placements: rand1 and "
        "rand4 (1 and 4 jobs) are unpinned, where the scheduler puts them; rand1-same pins the server and "
        "fio on CPU 0, rand1-apart the server on CPU 0 and fio on CPU 1. Pinning the server is "
        "`taskset -a -p -c 0 PID` for the daemon and each of its descendants (every thread of every "
        "process: tarfuse's workers, nbdfuse's nbdkit; threads started later inherit it), fio runs under "
        "`taskset -c`. On one CPU the pinned placements are skipped. Same CPU shows the CPU cost of a "
        "request (µs per read = 1 / rate: server, kernel and fio together); different CPUs the cost of "
        "waking a task on another CPU twice per request; unpinned mixes the two and swings from run to run.",
        "- Workers: `tarfuse` runs with its default (`-o workers=`: one process per 4 CPUs, 1 to 8), "
        "`tarfuse workers=N` with N = 1, 2 and on bigger machines up to the CPU count, on the plain "
        "case's ready, seq, rand1-same, rand1-apart, rand4 and rss. All the workers of a pinned server are "
        "pinned to the same CPU, so the pinned one-reader figures show what idle workers cost.",
        "- qemu: `qemu-img convert -f raw -O raw` of the mounted image to a file in the bench's temporary "
        "directory, deleted afterwards.",
        "- rss: the peak PSS (proportional set size) of the daemon's whole process tree: the sum of `Pss` "
        "in `/proc/PID/smaps_rollup` over the daemon and all its descendants (tarfuse's workers, "
        "nbdfuse's nbdkit), so pages they share count once, sampled every 50 ms during the full read (or "
        "the first byte, where a case has no read metric) and once more at its end.",
        "- Boot: QEMU with KVM boots the tests' 24 MiB sample image (kit.sample: a boot sector that "
        "prints one line on COM1), read-only, from the raw file and through a fresh tarfuse mount of an "
        "old GNU sparse tar of it, in turns; the time is from QEMU's start until the line is in its "
        "serial log (polled every millisecond).",
        "- Bytes: every tool's image is checked against the model of the image before its figures count: "
        "its size, 70-odd sampled ranges (ends, extent edges, random places), then the sha256 of a full "
        "read (within the time cap).",
        "- Peers run as their authors document: ratarmount `-f --index-file :memory:` (index built at "
        "every mount, like tarfuse, which has no index), `nbdfuse -r MNT/FILE [ nbdkit --exit-with-parent "
        "-r file TAR --filter=tar tar-entry=MEMBER ]`, `archivemount -f -o readonly`. tarfuse runs with "
        "`-f -o member=MEMBER`.",
        "- The chart: for each test (case and metric), every tool's median as a multiple of the C ceiling "
        f"(as `{X} C ceiling`; where the C ceiling has no figure, of the limit), turned so that right is "
        "better: for times and memory it is the ceiling's figure divided by the tool's. Log scale.",
    ]


def to_json(results: Results, meta: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for (case, key, tool), outcome in results.outcomes.items():
        metric = METRICS[key]
        role = next(t.role for t in results.tools if t.name == tool)
        value = outcome.median if outcome.ok else None
        limit, peer = results.best(case, key, "limit"), results.best(case, key, "peer")
        ceiling = results.ceiling(case, key)
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
                "c_ceiling": ceiling[0] if ceiling else None,
                "ratio_to_c_ceiling": value / ceiling[1] if value is not None and ceiling else None,
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
        "boot": {"seconds": results.boot, "status": results.boot_status},
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
    boot = data.get("boot", {})  # absent in runs from before issue 15
    results.boot = {name: list(seconds) for name, seconds in boot.get("seconds", {}).items()}
    results.boot_status = boot.get("status")
    return results, data["meta"]


# ---- The chart -----------------------------------------------------------------------------------------

# Tools not named here are peers: grey-green shades, small marks.
_STYLE = {
    "tarfuse": ("#d62728", "o", 11),
    C_CEILING: ("#000000", "|", 16),
    C_CEILING_MT: ("#555555", "|", 16),
    "pread": ("#1f77b4", "s", 7),
    "losetup": ("#6baed6", "s", 7),
}
_PEER_STYLES = [("#2ca02c", "D", 7), ("#9467bd", "^", 8), ("#8c564b", "v", 8), ("#17becf", "P", 8)]
_WORKER_STYLES = [("#ff7f0e", "o", 7), ("#e377c2", "o", 7), ("#bcbd22", "o", 7), ("#7f7f7f", "o", 7)]


def chart_rows(results: Results) -> list[tuple[str, dict[str, float]]]:
    """Per test (case, metric), every tool's figure as a multiple of the C ceiling (right is better)."""
    rows = []
    for case in results.cases:
        for key in ("ready", *case.metrics, "rss"):
            metric = METRICS[key]
            reference = results.ceiling(case.name, key) or results.best(case.name, key, "limit")
            if reference is None or reference[1] <= 0:
                continue
            ratios = {}
            for tool in results.tools:
                value = results.median(case.name, key, tool.name)
                if value is not None and value > 0:
                    ratios[tool.name] = (
                        value / reference[1] if metric.higher_is_better else reference[1] / value
                    )
            if ratios.get("tarfuse") is not None or len(ratios) > 1:
                label = f"{case.name} · {key}" + ("" if reference[0] in CEILINGS else f" (÷ {reference[0]})")
                rows.append((label, ratios))
    return rows


def write_chart(results: Results, path: Path) -> str | None:
    """Draw the chart as SVG at `path`; return None, or why there is no chart (matplotlib missing...)."""
    rows = chart_rows(results)
    if not rows:
        return "no figures to draw"
    try:
        import matplotlib  # a dev extra: imported only to draw the chart

        matplotlib.use("svg")
        matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: small, searchable, selectable
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or make dev: it is in the dev extra)"
    styles = _tool_styles(results)
    figure, axes = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.6))
    for y, (_, ratios) in enumerate(reversed(rows)):
        axes.axhline(y, color="#eeeeee", linewidth=0.8, zorder=0)
        for tool in results.tools:  # limits first, tarfuse drawn over the others
            if tool.name in ratios and tool.name != "tarfuse":
                color, marker, size = styles[tool.name]
                width = 2.5 if marker == "|" else 1.0  # the C ceilings: a bold tick
                axes.plot(
                    ratios[tool.name], y, marker=marker, color=color, markersize=size, markeredgewidth=width
                )
        if "tarfuse" in ratios:
            color, marker, size = styles["tarfuse"]
            axes.plot(ratios["tarfuse"], y, marker=marker, color=color, markersize=size, zorder=5)
    axes.axvline(1.0, color="#000000", linewidth=0.8, linestyle=":")
    axes.set_xscale("log")
    axes.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    axes.set_xlabel(f"{X} C ceiling (right is better; times and memory turned: ceiling ÷ tool)")
    axes.set_title("tarfuse (red) against its peers, pread/losetup and the C ceiling (dotted line)")
    handles = [
        Line2D(
            [],
            [],
            color=c,
            marker=m,
            markersize=min(s, 10),
            markeredgewidth=2.5 if m == "|" else 1.0,
            linestyle="",
            label=name,
        )
        for name, (c, m, s) in styles.items()
        if any(name in ratios for _, ratios in rows)
    ]
    axes.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="svg", metadata={"Date": None})  # no date: reruns differ only in figures
    plt.close(figure)
    return None


def _tool_styles(results: Results) -> dict[str, tuple[str, str, int]]:
    styles: dict[str, tuple[str, str, int]] = {}
    peers, workers = iter(_PEER_STYLES * 3), iter(_WORKER_STYLES * 3)
    for tool in results.tools:
        if tool.name in _STYLE:
            styles[tool.name] = _STYLE[tool.name]
        elif tool.role == "tarfuse":
            styles[tool.name] = next(workers)
        else:
            styles[tool.name] = next(peers)
    return styles


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
