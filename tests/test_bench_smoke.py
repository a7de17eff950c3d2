"""The benchmark keeps working: its quick mode runs end to end and reports every scenario.

Numbers are not asserted (speed is measured by the benchmark, not by tests); only that each
scenario ran, every webhook it counted was answered, and the three result files were written.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from bench import report
from tests.conftest import PG_ADMIN, ROOT

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
    assert [entry["runs"] for entry in document["summary"]] == [1] * len(SCENARIOS)
    assert document["floor"]["records_per_s"] > 0
    assert {"cores", "ram_gib", "python", "postgres", "rabbitmq"} <= set(document["machine"])
    assert "| burst, 16 concurrent | pipeline |" in (tmp_path / "quick.md").read_text()
    assert (tmp_path / "quick.png").read_bytes().startswith(b"\x89PNG")


def test_write_cost_probe_reports_each_phase_and_drops_its_database() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.write_cost", "--pg-url", PG_ADMIN, "--rounds", "1",
         "--shops", "1", "--blocks", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.fullmatch(
        r"creates [\d.]+ s \(floor [\d.]+\), updates [\d.]+ s \(floor [\d.]+\), "
        r"the same updates again [\d.]+ s\n",
        result.stdout,
    ), result.stdout
    listed = subprocess.run(
        ["psql", PG_ADMIN, "-Atc", "SELECT datname FROM pg_database"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "bench_cost_" not in listed.stdout


def _run(name: str, ratio: float, p99: float, over_1s: int, rss: float | None) -> dict[str, object]:
    return {
        "name": name,
        "kind": "burst",
        "design": "pipeline",
        "workers": 2,
        "requests": 201,
        "accepted": 200,
        "answers_over_1s": over_1s,
        "latency_ms": {"p50": p99 / 2, "p99": p99, "max": p99 + 10},
        "webhooks_per_s": 300.0,
        "e2e_records_per_s": 200_000.0,
        "floor_ratio": ratio,
        "worker_peak_rss_mb": rss,
    }


def test_repeated_runs_are_reported_as_median_and_range() -> None:
    runs = [
        _run("burst-16", 0.40, 120.0, 0, 63.0),
        _run("burst-64", 0.38, 300.0, 1, 64.0),
        _run("burst-16", 0.46, 110.0, 0, 65.0),
        _run("burst-64", 0.39, 280.0, 0, 62.0),
        _run("burst-16", 0.42, 150.0, 2, 64.0),
    ]
    burst16, burst64 = report.summary(runs)
    assert burst16["name"] == "burst-16"
    assert burst16["runs"] == 3
    assert burst16["floor_ratio"] == {"median": 0.42, "min": 0.40, "max": 0.46}
    assert burst16["p99_ms"] == {"median": 120.0, "min": 110.0, "max": 150.0}
    assert burst16["max_ms"] == 160.0  # the worst run's
    assert burst16["answers_over_1s"] == 2  # summed: the target is none in any run
    assert burst16["not_200"] == 3
    assert burst16["worker_peak_rss_mb"] == 65.0
    assert burst64["floor_ratio"]["median"] == 0.385
    shown = report.shown(burst16["floor_ratio"], ".2f")
    assert shown == "0.42 (0.40-0.46)"
    assert report.shown({"median": 5.0, "min": 5.0, "max": 5.0}) == "5"
