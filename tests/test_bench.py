"""Keep `make bench` alive: its smoke mode must produce a full, correct table. Nothing here is timed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool

REPO = Path(__file__).resolve().parent.parent
CASES = ("plain", "sparse-oldgnu")
METRICS = {
    "plain": {"ready", "seq", "rand1", "rand4", "qemu", "rss"},
    "sparse-oldgnu": {"ready", "seq", "rss"},
}


@pytest.mark.fuse
def test_quick_bench_measures_every_metric_of_tarfuse_and_the_limit(tmp_path: Path) -> None:
    for tool in ("fio", "qemu-img"):
        require_tool(tool)
    command = [
        sys.executable, "scripts/bench.py", "--quick", "--tools", "tarfuse", "--reps", "1",
        "--only", ",".join(CASES), "--no-docs", "--out", str(tmp_path),
        "--workdir", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]

    data = json.loads((tmp_path / "results.json").read_text())
    figures = {(r["case"], r["metric"], r["tool"]): r for r in data["results"]}
    for case in CASES:
        for metric in METRICS[case]:
            mine = figures[(case, metric, "tarfuse")]
            assert mine["status"] is None, (case, metric, mine["status"])
            assert mine["median"] > 0
            if metric != "rss":  # the limit has no daemon
                assert figures[(case, metric, "pread")]["median"] > 0
        checked = {(v["case"], v["tool"]) for v in data["verified"]}
        assert (case, "tarfuse") in checked  # its bytes were compared before its figures counted
    table = (tmp_path / "results.md").read_text()
    assert "| plain | rand1 |" in table
    assert "**tarfuse**" in table
