"""The report of a run: markdown tables, JSON, the chart, and the part of docs/benchmarks.md between its
BEGIN and END comments (the method is prose in that page; this module writes only figures).
"""

import json
import shutil
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .results import (
    BOOT_MOUNT,
    BOOT_RAW,
    C_CEILING,
    C_CEILING_MT,
    CEILINGS,
    METRICS,
    Best,
    CaseInfo,
    Outcome,
    Results,
    ToolInfo,
    X,
    targets,
)

DASH = "\u2013"  # the en dash, for an empty cell
BEGIN = "<!-- BEGIN: written by `python -m scripts.bench` (make bench); edit the text outside this part -->"
END = "<!-- END of the part written by the bench -->"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table, one line per row; every bench prints its figures as one."""
    return ["| " + " | ".join(map(str, row)) + " |" for row in (header, ["---"] * len(header), *rows)]


def _ratio(value: float | None, reference: Best) -> str:
    if value is None or reference is None or reference[1] == 0:
        return DASH
    ratio = value / reference[1]
    return f"{ratio:,.0f}{X}" if ratio >= 100 else f"{ratio:.1f}{X}" if ratio >= 10 else f"{ratio:.2f}{X}"


def _fmt(key: str, value: float | None) -> str:
    return DASH if value is None else METRICS[key].format(value)


def _named(key: str, best: Best) -> str:
    return DASH if best is None else f"{METRICS[key].format(best[1])} ({best[0]})"


def _spread(key: str, samples: list[float]) -> str:
    return f"{_fmt(key, min(samples))} {DASH} {_fmt(key, max(samples))}"


def _cell(text: str) -> str:
    """Make text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _bold(tool: ToolInfo) -> str:
    return f"**{tool.name}**" if tool.role == "tarfuse" else tool.name


def summary_table(results: Results) -> list[str]:
    """tarfuse against the limit, the C ceiling, the best peer and the targets."""
    rows, cases = [], {c.name for c in results.cases}
    for target in (t for t in targets(results) if t.case in cases):
        case, key, tool = target.case, target.metric, target.tool
        value, outcome = results.median(case, key, tool), results.outcomes.get((case, key, tool))
        shown = _fmt(key, value) if value is not None else _cell((outcome and outcome.status) or DASH)
        shown += "" if tool == "tarfuse" else f" ({tool.removeprefix('tarfuse ')})"
        met = None if value is None else target.met(results, value)
        references = results.references(case, key)
        against = [cell for ref in references for cell in (_named(key, ref), _ratio(value, ref))]
        rows.append([target.group, case, key, shown, *against, target.text,
                     DASH if met is None else "yes" if met else "**no**"])  # fmt: skip
    return table(("set", "case", "metric", "tarfuse", "limit", f"{X} limit", "C ceiling", f"{X} C ceiling",
                  "best peer", f"{X} best peer", "target", "met"), rows)  # fmt: skip


def case_table(results: Results, case: CaseInfo) -> list[str]:
    rows: list[list[object]] = []
    for key in ("ready", *case.metrics, "rss"):
        references = results.references(case.name, key)
        for tool in results.tools:
            outcome = results.outcomes.get((case.name, key, tool.name))
            if outcome is None or (case.name, tool.name) in results.excluded:
                continue
            if not outcome.ok:
                rows.append([key, _bold(tool), *[DASH] * 5, _cell(outcome.status or "no figures")])
                continue
            value, samples = outcome.median, outcome.samples
            shown = [_fmt(key, value), _spread(key, samples), *(_ratio(value, ref) for ref in references)]
            rows.append([key, _bold(tool), *shown, f"n={len(samples)}"])
    ratios = (f"{X} limit", f"{X} C ceiling", f"{X} best peer")
    return table(("metric", "tool", "median", f"min{DASH}max", *ratios, "notes"), rows)


def placement_table(results: Results) -> list[str]:
    """Random 4 KiB reads of the plain case, one row per tool: where the server and fio ran."""
    if "plain" not in {c.name for c in results.cases}:
        return []
    keys, rows = ("rand1", "rand1-same", "rand1-apart", "rand4"), []
    for tool in results.tools:
        values = [results.median("plain", key, tool.name) for key in keys]
        if any(v is not None for v in values):
            unpinned, same, apart, four = (_fmt(k, v) for k, v in zip(keys, values, strict=True))
            per_read = DASH if not values[1] else f"{1e6 / values[1]:.1f} µs"
            rows.append([_bold(tool), unpinned, same, per_read, apart, four])
    return table(("tool", "1 reader, unpinned", "1 reader, same CPU", "µs per read, same CPU",
                  "1 reader, different CPUs", "4 readers, unpinned"), rows)  # fmt: skip


def workers_table(results: Results) -> list[str]:
    """tarfuse's figures by number of worker processes (plain case), with the C ceilings for scale."""
    workers = [t for t in results.tools if t.role == "tarfuse" and t.name != "tarfuse"]
    if not workers or "plain" not in {c.name for c in results.cases}:
        return []
    one, rows = results.median("plain", "rand4", "tarfuse workers=1"), []
    for tool in [*(t for t in results.tools if t.name in CEILINGS), *workers,
                 *(t for t in results.tools if t.name == "tarfuse")]:  # fmt: skip
        cells = [_fmt(k, results.median("plain", k, tool.name)) for k in ("rand4", "seq", "ready", "rss")]
        value, ceiling = results.median("plain", "rand4", tool.name), results.ceiling("plain", "rand4")
        scale = _ratio(value, None if one is None else ("workers=1", one))
        rows.append([_bold(tool), cells[0], scale, _ratio(value, ceiling), *cells[1:]])
    return table(("tool", "4 readers, unpinned", f"{X} workers=1", f"{X} C ceiling", "sequential", "ready",
                  "peak PSS"), rows)  # fmt: skip


def boot_table(results: Results) -> list[str]:
    if not results.boot:
        return [f"Not measured: {results.boot_status}."] if results.boot_status else []
    runs = [(name, results.boot[name]) for name in (BOOT_RAW, BOOT_MOUNT) if results.boot.get(name)]
    rows = [(name, _fmt("ready", statistics.median(s)), _spread("ready", s), len(s)) for name, s in runs]
    lines = table(("booted from", "median", f"min{DASH}max", "n"), rows)
    if len(runs) == 2:
        raw, mount = (statistics.median(samples) for _, samples in runs)
        lines.append(f"| {X} raw file | {_ratio(mount, ('raw', raw))} | | |")
    if results.boot_status:
        lines += ["", f"Not all figures: {results.boot_status}."]
    return lines


def verification_lines(results: Results, case: str) -> list[str]:
    checked = [f"{tool}: {how}" for (c, tool), how in results.verified.items() if c == case]
    left_out = [f"{tool}: {why}" for (c, tool), why in results.excluded.items() if c == case]
    lines = [f"Bytes checked: {'; '.join(checked)}."] if checked else []
    return lines + (["", f"Not measured: {'; '.join(left_out)}."] if left_out else [])


def markdown(results: Results, meta: dict[str, Any], chart: str | None, chart_note: str) -> str:
    """The figures of a run; `chart` is the chart's path from the page, or `chart_note` why there is none."""
    lines = [
        f"## The run\n\nGenerated by `python -m scripts.bench` (`make bench`) on {meta['date']}.\n",
        f"- Command: `{meta['command']}`; tarfuse at commit {meta['tarfuse_commit']}",
        f"- Machine: Linux {meta['kernel']}, {meta['cpu']}, {meta['cores']} cores, {meta['memory']} RAM; "
        f"load average {meta['load_start']} at the start, {meta['load_end']} at the end "
        "(a shared host: compare ratios, not absolute figures)",
        f"- Page cache: {meta.get('reclaim', 'proactive reclaim not recorded')}",
        f"- Run: {meta['reps']} repetitions per figure, fio {meta['fio_runtime']} s per run, "
        f"time cap {meta['cap']:g} s per step; took {meta['elapsed']}",
        "- Versions: " + "; ".join(f"{t.name}: {t.version}" for t in results.tools if t.version),
        "\n## tarfuse against the limit, the C ceiling, the peers and the targets\n",
        f"`{X} limit`, `{X} C ceiling` and `{X} best peer` divide tarfuse's median by theirs: above 1 is "
        "better for throughput (GB/s, reads/s), below 1 is better for times and memory. The targets of the "
        "set `peers` were stated against the peers, with start-up and memory budgets; those of `ceiling` "
        "against the C ceiling.\n",
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
    for heading, section in sections:
        lines += [f"\n## {heading}\n", *section] if section else []
    lines += ["", "## All figures"]
    for case in results.cases:
        lines += [f"\n### {case.name}: {case.title}\n", *case_table(results, case)]
        lines += ["", *verification_lines(results, case.name)]
    return "\n".join(lines).rstrip() + "\n"


def to_json(results: Results, meta: dict[str, Any]) -> dict[str, Any]:
    roles, rows = {t.name: t.role for t in results.tools}, []
    for (case, key, tool), outcome in results.outcomes.items():
        metric, ok, samples = METRICS[key], outcome.ok, outcome.samples
        value = outcome.median if ok else None
        row = {
            "case": case, "metric": key, "unit": metric.unit, "higher_is_better": metric.higher_is_better,
            "tool": tool, "role": roles[tool], "samples": samples, "median": value,
            "min": min(samples) if ok else None, "max": max(samples) if ok else None,
            "status": outcome.status,
        }  # fmt: skip
        for name, ref in zip(("limit", "c_ceiling", "best_peer"), results.references(case, key), strict=True):
            row[name] = ref[0] if ref else None
            row[f"ratio_to_{name}"] = value / ref[1] if value is not None and ref else None
        rows.append(row)
    return {
        "meta": meta,
        "cases": [c._asdict() | {"metrics": list(c.metrics)} for c in results.cases],
        "tools": [t._asdict() for t in results.tools],
        "verified": [{"case": c, "tool": t, "how": how} for (c, t), how in results.verified.items()],
        "not_measured": [{"case": c, "tool": t, "why": why} for (c, t), why in results.excluded.items()],
        "results": rows,
        "boot": {"seconds": results.boot, "status": results.boot_status},
    }


def from_json(data: dict[str, Any]) -> tuple[Results, dict[str, Any]]:
    """Rebuild the results of a run from its results.json, to render them again."""
    results = Results([ToolInfo(**t) for t in data["tools"]])
    results.cases = [CaseInfo(**c | {"metrics": tuple(c["metrics"])}) for c in data["cases"]]
    for row in data["results"]:
        results.outcomes[(row["case"], row["metric"], row["tool"])] = Outcome(
            list(row["samples"]), row["status"]
        )
    results.verified = {(item["case"], item["tool"]): item["how"] for item in data["verified"]}
    results.excluded = {(item["case"], item["tool"]): item["why"] for item in data["not_measured"]}
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


# The chart: every tool's median as a multiple of the C ceiling. Tools not named here are peers (grey-green
# shades, small marks) or tarfuse's workers variants.
_STYLES = {"tarfuse": ("#d62728", "o", 11), "pread": ("#1f77b4", "s", 7), "losetup": ("#6baed6", "s", 7)}
_STYLES |= {C_CEILING: ("#000000", "|", 16), C_CEILING_MT: ("#555555", "|", 16)}
_PEER_STYLES = [("#2ca02c", "D", 7), ("#9467bd", "^", 8), ("#8c564b", "v", 8), ("#17becf", "P", 8)]
_WORKER_STYLES = [("#ff7f0e", "o", 7), ("#e377c2", "o", 7), ("#bcbd22", "o", 7), ("#7f7f7f", "o", 7)]


def chart_rows(results: Results) -> list[tuple[str, dict[str, float]]]:
    """Per test (case, metric), every tool's figure as a multiple of the C ceiling (right is better)."""
    rows = []
    for case in results.cases:
        for key in ("ready", *case.metrics, "rss"):
            reference = results.ceiling(case.name, key) or results.best(case.name, key, "limit")
            if reference is None or reference[1] <= 0:
                continue
            ratios = {}
            for tool in results.tools:
                if (value := results.median(case.name, key, tool.name) or 0) > 0:
                    higher = METRICS[key].higher_is_better
                    ratios[tool.name] = value / reference[1] if higher else reference[1] / value
            if "tarfuse" in ratios or len(ratios) > 1:
                label = f"{case.name} · {key}" + ("" if reference[0] in CEILINGS else f" (÷ {reference[0]})")
                rows.append((label, ratios))
    return rows


def _marks(style: tuple[str, str, int], largest: int = 99) -> dict[str, Any]:
    color, marker, size = style
    width = 2.5 if marker == "|" else 1.0  # the C ceilings: a bold tick
    return {"color": color, "marker": marker, "markersize": min(size, largest), "markeredgewidth": width}


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
    peers, workers = iter(_PEER_STYLES * 3), iter(_WORKER_STYLES * 3)
    styles = {
        t.name: _STYLES.get(t.name) or next(workers if t.role == "tarfuse" else peers) for t in results.tools
    }
    drawn = [*(t.name for t in results.tools if t.name != "tarfuse"), "tarfuse"]  # tarfuse over the others
    figure, axes = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.6))
    for y, (_, ratios) in enumerate(reversed(rows)):
        axes.axhline(y, color="#eeeeee", linewidth=0.8, zorder=0)
        for name in (n for n in drawn if n in ratios):
            axes.plot(ratios[name], y, **_marks(styles[name]), zorder=5 if name == "tarfuse" else 2)
    axes.axvline(1.0, color="#000000", linewidth=0.8, linestyle=":")
    axes.set_xscale("log")
    axes.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    axes.set_xlabel(f"{X} C ceiling (right is better; times and memory turned: ceiling ÷ tool)")
    axes.set_title("tarfuse (red) against its peers, pread/losetup and the C ceiling (dotted line)")
    shown = [(name, style) for name, style in styles.items() if any(name in ratios for _, ratios in rows)]
    handles = [Line2D([], [], **_marks(style, 10), linestyle="", label=name) for name, style in shown]
    axes.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="svg", metadata={"Date": None})  # no date: reruns differ only in figures
    plt.close(figure)
    return None
