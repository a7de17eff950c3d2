"""The benchmark keeps working: its quick mode runs end to end and reports every scenario.

Numbers are not asserted (speed is measured by the benchmark, not by tests); only that each
scenario ran, every webhook it counted was answered, and the three result files were written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SCENARIOS = {
    "burst-16",
    "burst-64",
    "naive-burst-16",
    "naive-burst-64",
    "scale-1-worker",
    "scale-4-workers",
    "everyday-64",
    "naive-everyday-64",
}


def test_quick_benchmark_reports_every_scenario(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads((tmp_path / "quick.json").read_text())
    assert {s["name"] for s in document["scenarios"]} == SCENARIOS
    for scenario in document["scenarios"]:
        assert scenario["accepted"] > 0, scenario
        assert scenario["e2e_records_per_s"] > 0, scenario
        assert scenario["latency_ms"]["p99"] > 0, scenario
        if scenario["kind"] == "burst":
            assert "floor_ratio" in scenario, scenario
    assert document["floor"]["records_per_s"] > 0
    assert {"cores", "ram_gib", "python", "postgres", "rabbitmq"} <= set(document["machine"])
    assert "| burst, 16 concurrent | pipeline |" in (tmp_path / "quick.md").read_text()
    assert (tmp_path / "quick.png").read_bytes().startswith(b"\x89PNG")
