"""The project's own promises about itself: docs and compose agree with the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.settings import ENV_VARS, Settings, SettingsError, load_settings
from receiver.metrics import ReceiverMetrics
from tests.support.processes import ROOT
from worker.metrics import WorkerMetrics


def _documented_settings(table: str) -> set[str]:
    # The first column of each row names the variables.
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return {name for cell in first_cells for name in re.findall(r"`([A-Z0-9_]+)`", cell)}


def test_the_configuration_reference_lists_every_setting() -> None:
    documented = _documented_settings((ROOT / "docs" / "configuration.md").read_text())
    assert set(ENV_VARS) <= documented
    assert documented <= set(ENV_VARS)
    # The README's table is a selection, of real settings, and points to the whole reference.
    readme = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    assert _documented_settings(readme) <= set(ENV_VARS)
    assert "docs/configuration.md" in readme


def compose_config(*options: str) -> str:
    """`docker-compose config` of the project's compose file, as Docker would read it."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (.ci/run installs it)")
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), *options, "config"],
        env={**os.environ, "WEBHOOK_TOKEN": "check"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_compose_file_is_valid_and_runs_the_tested_commands() -> None:
    config = compose_config()
    assert "- python\n    - -m\n    - receiver" in config
    assert "- python\n    - -m\n    - worker" in config
    assert "- python\n    - -m\n    - admin\n    - sync\n    - --all\n    - --every" in config
    assert "container_name" not in config  # the worker must scale


def test_the_cluster_profile_is_valid_and_runs_the_tested_commands() -> None:
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed (.ci/run installs it)")
    config = compose_config("--profile", "cluster")
    for node in ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3"):
        assert f"hostname: {node}" in config
        assert f"@{node}:5672/" in config  # every node in the services' AMQP_URL
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(
    "variable",
    ["RETENTION_INTERVAL", "RETRY_MAX_BACKOFF", "MAX_IN_FLIGHT", "BODY_READ_TIMEOUT",
     "HEADER_READ_TIMEOUT", "KEEPALIVE_TIMEOUT", "MAX_BODY_BYTES_IN_FLIGHT", "WORKER_PROCESSES"],
)  # fmt: skip
def test_a_zero_that_would_break_the_service_is_refused_at_start(variable: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({variable: "0"})
    assert str(refused.value) == f"{variable} must be above 0"


def test_defaults_are_the_documented_ones() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert settings.database_url == "postgresql://postgres@localhost:5432/upgates"
    assert (settings.receiver_host, settings.receiver_port) == ("0.0.0.0", 8080)  # noqa: S104
    assert settings.max_body_bytes >= 16 * 1024 * 1024
    assert settings.publish_timeout < 1


def test_settings_are_read_and_checked() -> None:
    settings = load_settings({"WEBHOOK_TOKEN": "a, b", "WORKER_PREFETCH": "7"})
    assert settings.webhook_tokens == ("a", "b")
    assert settings.prefetch == 7
    with pytest.raises(SettingsError, match="PUBLISH_TIMEOUT"):
        load_settings({"PUBLISH_TIMEOUT": "1.5"})
    with pytest.raises(SettingsError, match="RECEIVER_PORT"):
        load_settings({"RECEIVER_PORT": "eighty"})


def test_shop_tokens_are_read_as_pairs() -> None:
    settings = load_settings({"SHOP_TOKENS": "shop-a=aaa, shop-b=bbb"})
    assert settings.shop_tokens == (("shop-a", "aaa"), ("shop-b", "bbb"))
    with pytest.raises(SettingsError, match="SHOP_TOKENS"):
        load_settings({"SHOP_TOKENS": "shop-a"})


def _exported_metric_names() -> set[str]:
    names: set[str] = set()
    for registry in (ReceiverMetrics().registry, WorkerMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
    # Series that appear only once a labelled child exists.
    for family in list(names):
        names.update({f"{family}_total", f"{family}_bucket", f"{family}_sum", f"{family}_count"})
    return names


def test_dashboard_queries_name_metrics_the_code_exports() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/upgates-ingest.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(upgates_[a-z_]+)\b", e)}
    assert used, "the dashboard queries no metric of ours"
    assert used <= _exported_metric_names()
    rabbit = {name for e in exprs for name in re.findall(r"\b(rabbitmq_[a-z_]+)\b", e)}
    # RabbitMQ's own (rabbitmq_prometheus, family queue_coarse_metrics, scraped in prometheus.yml)
    assert rabbit <= {"rabbitmq_detailed_queue_messages"}
    prometheus = (ROOT / "deploy/prometheus.yml").read_text()
    assert "queue_coarse_metrics" in prometheus


def test_the_image_build_installs_from_what_the_dockerfile_copies(tmp_path: Path) -> None:
    # No Docker engine here: rebuild the image's /app from its COPY lines and install it as the
    # Dockerfile does, then check the three commands exist and the migrations are packaged.
    app = tmp_path / "app"
    app.mkdir()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(src, app / source, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    (app / source).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, app / source)
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(app),
        ],
        check=True,
        capture_output=True,
    )
    assert {"upgates-receiver", "upgates-worker", "upgates-admin"} <= {
        p.name for p in (target / "bin").iterdir()
    }
    assert (target / "worker" / "migrations" / "0001_init.sql").exists()
    for package in ("common", "receiver", "worker", "admin", "shopapi"):
        assert (target / package / "__main__.py").exists() or package in {"common", "shopapi"}
