"""Settings the worker cannot run with are refused, in one line and before it starts (items 6 and
10 of the worker hardening, tests/integration/test_worker_hardening.py): no services."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.settings import SettingsError, load_settings
from tests.support.processes import ROOT


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DB_POOL_SIZE", "1", "DB_POOL_SIZE must be at least 2"),
        ("DB_POOL_SIZE", "0", "DB_POOL_SIZE must be at least 2"),
        ("RETENTION_INTERVAL", "0", "RETENTION_INTERVAL must be above 0"),
        ("RETRY_MAX_BACKOFF", "0", "RETRY_MAX_BACKOFF must be above 0"),
    ],
)
def test_settings_the_worker_cannot_run_with_are_refused(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({variable: value})
    assert str(refused.value) == message


def test_worker_with_a_pool_of_one_exits_2_with_one_line_and_no_traceback() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env["DB_POOL_SIZE"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "worker"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == ["worker: DB_POOL_SIZE must be at least 2"]
    assert b"Traceback" not in done.stdout + done.stderr
