"""The operator's soak keeps working: its quick mode injects faults under load and loses nothing.

`python -m scripts.soak` starts its own private RabbitMQ node and Postgres cluster, a receiver and
workers, and sends Upgates-like traffic while it kills a worker, crashes Postgres and blackholes a
broker link; it exits 0 only when the table equals the fold of everything answered 200.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.processes import ROOT
from tests.support.servers import RABBIT_BIN, pg_bin


@pytest.mark.fault
def test_quick_soak_loses_nothing() -> None:
    if not (RABBIT_BIN / "rabbitmq-server").exists() or not (pg_bin() / "initdb").exists():
        pytest.skip("the soak needs RabbitMQ and Postgres server binaries for its private servers")
    result = subprocess.run(
        [sys.executable, "-m", "scripts.soak", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    assert "LOST: 0" in result.stdout.splitlines(), output
    assert "FAULT kill:" in result.stdout, output  # the faults really ran
