"""The short form of `make stress`: scripts/stress.py for a few seconds, which must pass.

The long form (`make stress`, 10 minutes) is run by hand; its figures are not asserted here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from kit.needs import require_tool

pytestmark = pytest.mark.fuse

STRESS = Path(__file__).parents[2] / "scripts" / "stress.py"
DURATION = 5


def test_short_stress_run_reads_right_bytes_without_errors_or_memory_growth(tmp_path: Path) -> None:
    require_tool("tar")
    figures = tmp_path / "stress.json"
    result = subprocess.run(
        [
            sys.executable,
            str(STRESS),
            "--duration",
            str(DURATION),
            "--image-mib",
            "64",
            "--json",
            str(figures),
        ],
        capture_output=True,
        text=True,
        timeout=DURATION + 120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(figures.read_text())
    assert report["passed"]
    assert report["reader"]["reads"] > 0
    assert report["reader"]["errors"] == []
    assert report["reader"]["wrong"] == report["reader"]["short"] == 0
    assert report["daemon_read_bytes"] > 0, "every read was served from the page cache"
    if report["loop"] is not None:
        assert report["loop"]["reads"] > 0
        assert report["loop"]["errors"] == []
        assert report["loop"]["wrong"] == report["loop"]["short"] == 0
    assert report["rss_end_kib"] - report["rss_start_kib"] <= report["rss_growth_bound_kib"]
    assert report["daemon_exit_status"] == 0
