"""Keep `make bench` alive: its smoke mode must produce a full, correct table. Nothing here is timed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kit.needs import require_tool
from kit.qemu import kvm_usable

REPO = Path(__file__).resolve().parent.parent
CASES = ("plain", "sparse-oldgnu")
METRICS = {
    "plain": {"ready", "seq", "rand1", "rand1-same", "rand1-apart", "rand4", "qemu", "rss"},
    "sparse-oldgnu": {"ready", "seq", "qemu", "rss"},
}
PINNED = {"rand1-same", "rand1-apart"}
CEILINGS = ("C ceiling", "C ceiling mt")
WORKERS = "tarfuse workers=2"
WORKERS_METRICS = {"ready", "seq", "rand1-same", "rand1-apart", "rand4", "rss"}


@pytest.mark.fuse
def test_quick_bench_measures_every_metric_of_tarfuse_the_limit_and_the_c_ceiling(tmp_path: Path) -> None:
    for tool in ("fio", "qemu-img", "cc", "pkg-config", "taskset"):
        require_tool(tool)
    boot = kvm_usable() and shutil.which("qemu-system-x86_64") is not None  # else a reason, no figures
    command = [
        sys.executable, "-m", "scripts.bench", "--quick", "--tools", f"tarfuse,{WORKERS}", "--reps", "1",
        "--only", ",".join((*CASES, "boot")), "--no-docs", "--out", str(tmp_path),
        "--workdir", str(tmp_path), "--cap", "120",
    ]  # fmt: skip
    # --cap: --quick cuts a step (a boot, a mount) off at 5 s, a timed assertion on a busy machine
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]

    data = json.loads((tmp_path / "results.json").read_text())
    figures = {(r["case"], r["metric"], r["tool"]): r for r in data["results"]}
    one_cpu = len(os.sched_getaffinity(0)) < 2
    for case in CASES:
        for metric in METRICS[case]:
            if metric in PINNED and one_cpu:
                assert figures[(case, metric, "tarfuse")]["status"].startswith("n/a: one CPU")
                continue
            mine = figures[(case, metric, "tarfuse")]
            assert mine["status"] is None, (case, metric, mine["status"])
            assert mine["median"] > 0
            for ceiling in CEILINGS:  # the segment map gives the sparse case a ceiling too
                assert figures[(case, metric, ceiling)]["median"] > 0, (case, metric, ceiling)
            assert mine["ratio_to_c_ceiling"] > 0
            pread_has_it = metric != "rss" and (metric != "qemu" or case == "plain")  # no daemon; one range
            if pread_has_it:
                assert figures[(case, metric, "pread")]["median"] > 0
        checked = {(v["case"], v["tool"]) for v in data["verified"]}
        assert {(case, "tarfuse"), (case, "C ceiling"), (case, "C ceiling mt")} <= checked
    measured = {m for (c, m, t), r in figures.items() if t == WORKERS and r["median"]}
    assert measured == (WORKERS_METRICS - PINNED if one_cpu else WORKERS_METRICS)  # plain only, cheap ones
    assert data["boot"]["seconds"].keys() == ({"raw file", "tarfuse mount"} if boot else set())

    table = (tmp_path / "results.md").read_text()
    assert "| plain | rand1 |" in table
    assert "**tarfuse**" in table
    assert "| ceiling | plain | rand1-apart |" in table
    assert ("](results.svg)" in table) == (tmp_path / "results.svg").exists()


def test_render_rewrites_the_tables_of_an_earlier_run(tmp_path: Path) -> None:
    results = {
        "meta": {
            "date": "2026-12-02 00:00 UTC", "command": "make bench", "tarfuse_commit": "abc", "kernel": "6",
            "cpu": "cpu", "cores": "2", "memory": "1 GiB", "load_start": "0", "load_end": "0", "reps": 1,
            "fio_runtime": 1.0, "cap": 5.0, "elapsed": "1 min",
        },
        "cases": [{"name": "plain", "title": "t", "members": 1, "extents": 1, "metrics": ["rand4"]}],
        "tools": [
            {"name": "C ceiling", "role": "limit", "version": ""},
            {"name": "C ceiling mt", "role": "limit", "version": ""},
            {"name": "tarfuse", "role": "tarfuse", "version": ""},
            {"name": "ratarmount", "role": "peer", "version": ""},
        ],
        "verified": [],
        "not_measured": [],
        "results": [
            {"case": "plain", "metric": "rand4", "tool": tool, "samples": [value], "status": None}
            for tool, value in (("C ceiling", 80e3), ("C ceiling mt", 100e3), ("tarfuse", 110e3),
                                ("ratarmount", 40e3))
        ],
    }  # fmt: skip
    source = tmp_path / "old.json"
    source.write_text(json.dumps(results))
    command = [
        sys.executable,
        "-m",
        "scripts.bench",
        "--render",
        str(source),
        "--no-docs",
        "--out",
        str(tmp_path),
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    table = (tmp_path / "results.md").read_text()
    # 4 readers: divided by the better C loop (mt, 100k): 1.10x; and 2.75x ratarmount: met
    assert "| ceiling | plain | rand4 | 110,000/s |" in table
    row = next(line for line in table.splitlines() if line.startswith("| ceiling | plain | rand4 |"))
    assert "100,000/s (C ceiling mt) | 1.10\u00d7" in row
    assert row.endswith("| yes |")
