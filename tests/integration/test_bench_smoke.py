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
from tests.support.config import PG_ADMIN
from tests.support.processes import ROOT

SCENARIOS = {
    "burst-16",
    "burst-64",
    "naive-burst-16",
    "naive-burst-64",
    "scale-1-worker",
    "scale-4-workers",
    "grown-16",
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
    assert {"cores", "ram_gib", "python", "postgres", "rabbitmq", "sched_autogroup"} <= set(
        document["machine"]
    )
    assert "| burst, 16 concurrent | pipeline |" in (tmp_path / "quick.md").read_text()
    # 4 payloads per burst judge nothing: no verdicts on the targets.
    assert document["targets"] == []
    assert "Against the targets" not in (tmp_path / "quick.md").read_text()
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


def _everyday(rate: float, p99: float, keep_up: float) -> dict[str, object]:
    return {
        "name": "everyday-64",
        "kind": "everyday",
        "design": "pipeline",
        "workers": 2,
        "requests": 1000,
        "accepted": 1000,
        "answers_over_1s": 0,
        "latency_ms": {"p50": p99 / 3, "p99": p99, "max": p99 * 2},
        "webhooks_per_s": rate,
        "e2e_records_per_s": 5.5 * rate * keep_up,
        "acked_records_per_s": 5.5 * rate,
        "worker_peak_rss_mb": 53.0,
    }


def _verdicts(runs: list[dict[str, object]]) -> dict[str, bool | None]:
    return {t["target"]: t["met"] for t in report.targets(report.summary(runs))}


def test_targets_are_judged_on_the_medians_at_their_bounds() -> None:
    met = _verdicts(
        [
            _run("burst-16", 0.5, 150.0, 0, 62.0),  # exactly at the bounds: met
            _run("burst-64", 0.5, 300.0, 0, 62.0),
            _everyday(3000.0, 99.9, 0.9),
        ]
    )
    assert met == {
        "bursts end to end, 2 workers": True,
        "ack p99, 16 in flight": True,
        "ack p99, 64 in flight": True,
        "answers at or over 1 s (pipeline)": True,
        "everyday traffic": True,
        "workers keep up (everyday)": True,
        "worker peak memory": None,  # reported, not judged
    }
    missed = _verdicts(
        [
            _run("burst-16", 0.55, 150.1, 0, 62.0),
            _run("burst-64", 0.497, 250.0, 1, 62.0),  # one answer at 1 s or more, in any run
            _everyday(3000.0, 100.0, 0.89),  # the p99 must be under 100 ms
        ]
    )
    assert missed == {
        "bursts end to end, 2 workers": False,  # both bursts must reach 0.5
        "ack p99, 16 in flight": False,
        "ack p99, 64 in flight": True,
        "answers at or over 1 s (pipeline)": False,
        "everyday traffic": False,
        "workers keep up (everyday)": False,
        "worker peak memory": None,
    }
    # The median of three runs decides, and a ratio just short of 0.5 shows as such.
    judged = report.targets(
        report.summary(
            [_run("burst-16", r, 100.0, 0, 62.0) for r in (0.45, 0.497, 0.6)]
            + [_run("burst-64", 0.55, 250.0, 0, 62.0)]
        )
    )
    assert judged[0] == {
        "target": "bursts end to end, 2 workers",
        "asked": "0.5 x floor",
        "measured": "0.497 (0.450-0.600) at 16, 0.550 at 64",
        "met": False,
    }
    assert report.target_line(judged[0]) == (
        "bursts end to end, 2 workers: 0.497 (0.450-0.600) at 16, 0.550 at 64 "
        "(asked 0.5 x floor): not met"
    )


def test_targets_cover_only_the_scenarios_that_ran() -> None:
    assert _verdicts([_run("burst-16", 0.6, 100.0, 0, None)]) == {
        "bursts end to end, 2 workers": True,
        "ack p99, 16 in flight": True,
        "answers at or over 1 s (pipeline)": True,
    }
    document = {
        "summary": report.summary([_run("burst-16", 0.6, 100.0, 0, 62.0)]),
        "targets": [],
        "floor": {"records": 1, "measurements": []},
        "config": {"repeat": 1, "payloads_per_burst": 1, "records_per_payload": 1,
                   "mean_payload_bytes": 1, "shops": 1, "receivers": 2},
        "machine": {"cores": 2, "cpu_model": "x", "ram_gib": 1, "python": "3", "postgres": "15",
                    "rabbitmq": "3", "load_average_at_start": [0.0], "git": "abc"},
        "command": "python -m bench.run", "started": "now",
    }  # fmt: skip
    assert "Against the targets" not in report.markdown(document)
    document["targets"] = report.targets(document["summary"])
    assert "| ack p99, 16 in flight | 150 ms | 100.0 ms | met |" in report.markdown(document)
