"""Where the shared local servers are, the webhook token, and the settings of a test's services.

The servers are the real local ones (see .ci/run); tests make a database and a vhost of their own
in them (tests/conftest.py). TEST_PG_ADMIN and TEST_AMQP_BASE point elsewhere.
"""

from __future__ import annotations

import os
from typing import Any

from common.settings import Settings
from tests.support.processes import free_port

PG_ADMIN = os.environ.get("TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_BASE = os.environ.get("TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
TOKEN = "test-token-not-secret"


def service_settings(amqp_url: str, database_url: str, **changes: Any) -> Settings:
    """Settings for a test's services: a free receiver port and quick retries."""
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "database_url": database_url,
        "webhook_tokens": (TOKEN,),
        "receiver_host": "127.0.0.1",
        "receiver_port": free_port(),
        "worker_host": "127.0.0.1",
        "worker_port": 0,
        "receiver_metrics_port": 0,
        "batch_max_wait": 0.02,
        "retry_max_backoff": 0.5,
        "shutdown_grace": 5.0,
    }
    values.update(changes)
    return Settings(**values)
