"""The report of a run: markdown tables, JSON, the chart, and the generated part of docs/benchmarks.md.

The method is prose in docs/benchmarks.md; this module writes only figures, and in that page only the part
between its BEGIN and END comments. The chart (matplotlib, imported only to draw it) shows every tool's
median as a multiple of the C ceiling.
"""

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from .results import (
    BOOT_MOUNT,
    BOOT_RAW,
    C_CEILING,
    C_CEILING_MT,
    CEILINGS,
    METRICS,
    CaseInfo,
    Metric,
    Results,
    ToolInfo,
    X,
    targets,
)

DASH = "\u2013"  # the en dash, for an empty cell
BEGIN = "<!-- BEGIN: written by `python -m scripts.bench` (make bench); edit the text outside this part -->"
END = "<!-- END of the part written by the bench -->"


def _ratio(value: float | None, reference: tuple[str, float] | None) -> str:
    if value is None or reference is None or reference[1] == 0:
        return DASH
    ratio = value / reference[1]
    if ratio >= 100:
        return f"{ratio:,.0f}{X}"
    return f"{ratio:.1f}{X}" if ratio >= 10 else f"{ratio:.2f}{X}"


def _met(met: bool | None) -> str:
    return DASH if met is None else "yes" if met else "**no**"


def _cell(text: str) -> str:
    """Make text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _named(metric: Metric, best: tuple[str, float] | None) -> str:
    return DASH if best is None else f"{metric.format(best[1])} ({best[0]})"


def _row(*cells: object) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _head(*cells: str) -> list[str]:
    return [_row(*cells), _row(*["---"] * len(cells))]


def _bold(tool: ToolInfo) -> str:
    return f"**{tool.name}**" if tool.role == "tarfuse" else tool.name


# ---- Tables -------------------------------------------------------------------------------------------


def summary_table(results: Results) -> list[str]:
    """tarfuse against the limit, the C ceiling, the best peer and the targets."""
    lines = _head("set", "case", "metric", "tarfuse", "limit", f"{X} limit", "C ceiling", f"{X} C ceiling",
                  "best peer", f"{X} best peer", "target", "met")  # fmt: skip
    cases = {c.name for c in results.cases}
    for target in (t for t in targets(results) if t.case in cases):
        case, key = target.case, target.metric
        metric = METRICS[key]
        outcome = results.outcomes.get((case, key, target.tool))
        value = results.median(case, key, target.tool)
        limit, ceiling = results.best(case, key, "limit"), results.ceiling(case, key)
        peer = results.best(case, key, "peer")
        status = (outcome.status if outcome else None) or DASH
        shown = metric.format(value) if value is not None else _cell(status)
        if target.tool != "tarfuse":
            shown += f" ({target.tool.removeprefix('tarfuse ')})"
        met = None if value is None else target.met(results, case, key, value)
        lines.append(_row(target.group, case, key, shown, _named(metric, limit), _ratio(value, limit),
                          _named(metric, ceiling), _ratio(value, ceiling), _named(metric, peer),
                          _ratio(value, peer), target.text, _met(met)))  # fmt: skip
    return lines


def case_table(results: Results, case: CaseInfo) -> list[str]:
    ratios = (f"{X} limit", f"{X} C ceiling", f"{X} best peer")
    lines = _head("metric", "tool", "median", f"min{DASH}max", *ratios, "notes")
    for key in ("ready", *case.metrics, "rss"):
        metric = METRICS[key]
        limit, peer = results.best(case.name, key, "limit"), results.best(case.name, key, "peer")
        ceiling = results.ceiling(case.name, key)
        for tool in results.tools:
            outcome = results.outcomes.get((case.name, key, tool.name))
            if outcome is None or (case.name, tool.name) in results.excluded:
                continue
            name = _bold(tool)
            if not outcome.ok:
                status = _cell(outcome.status or "no figures")
                lines.append(_row(key, name, *[DASH] * 5, status))
                continue
            value = outcome.median
            spread = f"{metric.format(min(outcome.samples))} {DASH} {metric.format(max(outcome.samples))}"
            shown = [_ratio(value, limit), _ratio(value, ceiling), _ratio(value, peer)]
            lines.append(_row(key, name, metric.format(value), spread, *shown, f"n={len(outcome.samples)}"))
    return lines


def placement_table(results: Results) -> list[str]:
    """Random 4 KiB reads of the plain case, one row per tool: where the server and fio ran."""
    keys = ("rand1", "rand1-same", "rand1-apart", "rand4")
    if "plain" not in {c.name for c in results.cases}:
        return []
    lines = _head("tool", "1 reader, unpinned", "1 reader, same CPU", "µs per read, same CPU",
                  "1 reader, different CPUs", "4 readers, unpinned")  # fmt: skip
    for tool in results.tools:
        values = {key: results.median("plain", key, tool.name) for key in keys}
        if all(v is None for v in values.values()):
            continue
        cells = [DASH if (v := values[k]) is None else METRICS[k].format(v) for k in keys]
        same = values["rand1-same"]
        per_read = DASH if not same else f"{1e6 / same:.1f} µs"
        lines.append(_row(_bold(tool), cells[0], cells[1], per_read, cells[2], cells[3]))
    return lines


def workers_table(results: Results) -> list[str]:
    """tarfuse's figures by number of worker processes (plain case), with the C ceilings for scale."""
    workers = [t for t in results.tools if t.role == "tarfuse" and t.name != "tarfuse"]
    one = results.median("plain", "rand4", "tarfuse workers=1")
    if not workers or "plain" not in {c.name for c in results.cases}:
        return []
    lines = _head("tool", "4 readers, unpinned", f"{X} workers=1", f"{X} C ceiling", "sequential", "ready",
                  "peak PSS")  # fmt: skip
    for tool in [*(t for t in results.tools if t.name in CEILINGS), *workers,
                 *(t for t in results.tools if t.name == "tarfuse")]:  # fmt: skip
        rand4 = results.median("plain", "rand4", tool.name)
        cells = [DASH if (v := results.median("plain", k, tool.name)) is None else METRICS[k].format(v)
                 for k in ("rand4", "seq", "ready", "rss")]  # fmt: skip
        scale = _ratio(rand4, None if one is None else ("workers=1", one))
        ceiling = _ratio(rand4, results.ceiling("plain", "rand4"))
        lines.append(_row(_bold(tool), cells[0], scale, ceiling, *cells[1:]))
    return lines


def boot_table(results: Results) -> list[str]:
    if not results.boot:
        return [f"Not measured: {results.boot_status}."] if results.boot_status else []
    lines = _head("booted from", "median", f"min{DASH}max", "n")
    fmt = METRICS["ready"].format
    for name in (BOOT_RAW, BOOT_MOUNT):
        if samples := results.boot.get(name):
            spread = f"{fmt(min(samples))} {DASH} {fmt(max(samples))}"
            lines.append(_row(name, fmt(statistics.median(samples)), spread, len(samples)))
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


def markdown(results: Results, meta: dict[str, Any], chart: str | None, chart_note: str) -> str:
    """The figures of a run; `chart` is the chart's path from the page, or `chart_note` why there is none."""
    lines = [
        "## The run",
        "",
        f"Generated by `python -m scripts.bench` (`make bench`) on {meta['date']}.",
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
        "## tarfuse against the limit, the C ceiling, the peers and the targets",
        "",
        f"`{X} limit`, `{X} C ceiling` and `{X} best peer` divide tarfuse's median by theirs: above 1 is "
        "better for throughput (GB/s, reads/s), below 1 is better for times and memory. The targets of the "
        "set `peers` were stated against the peers, with start-up and memory budgets; those of `ceiling` "
        "against the C ceiling.",
        "",
        *summary_table(results),
    ]
    if chart is not None:
        lines += ["", f"![tarfuse, its peers and the limits, as a multiple of the C ceiling]({chart})"]
    elif chart_note:
        lines += ["", f"No chart: {chart_note}."]
    sections = [
        ("One reader: where the server and the reader run (plain case)", placement_table(results)),
        ("Workers: processes serving one mount (plain case)", workers_table(results)),
        ("Time to boot: QEMU (KVM) from power-on to the sample image's serial line", boot_table(results)),
    ]
    for heading, table in sections:
        lines += ["", f"## {heading}", "", *table] if table else []
    lines += ["", "## All figures"]
    for case in results.cases:
        lines += ["", f"### {case.name}: {case.title}", "", *case_table(results, case)]
        lines += ["", *verification_lines(results, case.name)]
    return "\n".join(lines).rstrip() + "\n"


# ---- JSON and files -----------------------------------------------------------------------------------


def to_json(results: Results, meta: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for (case, key, tool), outcome in results.outcomes.items():
        metric = METRICS[key]
        value = outcome.median if outcome.ok else None
        row = {
            "case": case, "metric": key, "unit": metric.unit, "higher_is_better": metric.higher_is_better,
            "tool": tool, "role": next(t.role for t in results.tools if t.name == tool),
            "samples": outcome.samples, "median": value,
            "min": min(outcome.samples) if outcome.ok else None,
            "max": max(outcome.samples) if outcome.ok else None,
            "status": outcome.status,
        }  # fmt: skip
        references = {
            ("limit", "ratio_to_limit"): results.best(case, key, "limit"),
            ("c_ceiling", "ratio_to_c_ceiling"): results.ceiling(case, key),
            ("best_peer", "ratio_to_best_peer"): results.best(case, key, "peer"),
        }
        for (name, ratio), reference in references.items():
            row[name] = reference[0] if reference else None
            row[ratio] = value / reference[1] if value is not None and reference else None
        rows.append(row)
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
    boot = data.get("boot", {})  # absent in results.json of runs from before the boot step
    results.boot = {name: list(seconds) for name, seconds in boot.get("seconds", {}).items()}
    results.boot_status = boot.get("status")
    return results, data["meta"]


def write_outputs(results: Results, meta: dict[str, Any], out: Path, docs: Path | None) -> None:
    """Write results.{md,json} and the chart to `out`; put the figures into the page `docs` if given."""
    out.mkdir(parents=True, exist_ok=True)
    chart = out / "results.svg"
    chart_note = write_chart(results, chart)
    if chart_note is not None:
        print(f"no chart: {chart_note}")
    text = markdown(results, meta, None if chart_note else chart.name, chart_note or "")
    method = "How it is measured: docs/benchmarks.md, the section of that name."
    (out / "results.md").write_text(f"# tarfuse benchmarks\n\n{method}\n\n{text}")
    (out / "results.json").write_text(json.dumps(to_json(results, meta), indent=1) + "\n")
    print("\n" + text)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}" + ("" if chart_note else f", {chart}"))
    if docs is None:
        return
    docs_chart = docs.with_suffix(".svg")  # beside the page, linked relatively: docs/benchmarks.svg
    if chart_note is None:
        docs_chart.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chart, docs_chart)
    write_docs(docs, markdown(results, meta, None if chart_note else docs_chart.name, chart_note or ""))
    print(f"written: {docs}" + ("" if chart_note else f", {docs_chart}"))


def write_docs(page: Path, figures: str) -> None:
    """Put `figures` between the page's BEGIN and END comments; the text around them stays as it is."""
    text = page.read_text() if page.exists() else f"# tarfuse benchmarks\n\n{BEGIN}\n{END}\n"
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        raise SystemExit(f"{page}: the generated part must sit between the lines {BEGIN!r} and {END!r}")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(f"{head}{BEGIN}\n\n{figures}\n{END}{tail}")


# ---- The chart ----------------------------------------------------------------------------------------

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
    shown = [(name, style) for name, style in styles.items() if any(name in ratios for _, ratios in rows)]
    handles = [
        Line2D([], [], color=c, marker=m, markersize=min(s, 10), markeredgewidth=2.5 if m == "|" else 1.0,
               linestyle="", label=name)
        for name, (c, m, s) in shown
    ]  # fmt: skip
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
        else:
            styles[tool.name] = next(workers) if tool.role == "tarfuse" else next(peers)
    return styles
