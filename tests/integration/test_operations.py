"""Running it as an operator does: the one-command local run, its logs, health and metrics."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg

from common.settings import Settings
from common.topology import EXCHANGE
from tests.support import processes
from tests.support.config import TOKEN
from tests.support.database import connect_migrated
from tests.support.load import post
from tests.support.processes import env_for, exit_code, free_port, free_port_run
from tests.support.waiting import wait_until

CANARY = "canary-logs-9d41@example.cz"


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.get(url) as response:
            return response.status
    except aiohttp.ClientConnectionError:
        return 0


async def test_local_run_serves_logs_without_personal_data_and_stops_on_ctrl_c(
    settings: Settings, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    first_worker_port = free_port_run(2, avoid=settings.receiver_port)
    metrics_port = free_port()  # the receiver's /metrics, on a port of its own
    output = tmp_path / "run_local.log"
    proc = processes.spawn(  # the script itself, as an operator runs it
        "scripts/run_local.py",
        "--workers",
        "2",
        "--worker-port",
        str(first_worker_port),
        env=env_for(settings, LOG_FORMAT="json", RECEIVER_METRICS_PORT=str(metrics_port)),
        log=output,
    )
    try:
        receiver = f"http://127.0.0.1:{settings.receiver_port}"
        workers = [f"http://127.0.0.1:{first_worker_port + i}" for i in range(2)]
        for base in (receiver, *workers):
            try:
                await wait_until(lambda b=base: _ready(http, b), timeout=30)
            except AssertionError as not_ready:
                # Nothing carrying personal data has been sent yet: the log says why it is down.
                raise AssertionError(f"{base} not ready; log:\n{output.read_text()}") from not_ready

        good = {"customer_id": 1, "email": CANARY, "creation_time": "2025-05-05T10:00:00+02:00"}
        bad = {"customer_id": "x", "email": CANARY, "creation_time": "2025-05-05T10:00:00+02:00"}
        status, answer = await post(
            http, receiver, "create", {"project_name": "ops-shop", "customers": [good, bad]}
        )
        assert status == 200
        request_id = answer["request_id"]
        # A malformed body and a poison message carry the canary into the error paths too.
        bad_json = b'{"project_name": "ops-shop", "customers": [{"email": "' + CANARY.encode()
        assert (await post(http, receiver, "update", bad_json))[0] == 400
        wrong_type = {"project_name": ["ops-shop", CANARY], "customers": []}
        status, error = await post(http, receiver, "update", wrong_type)
        assert status == 422
        assert CANARY not in json.dumps(error)
        await _publish_poison(settings)

        conn = await wait_until(lambda: connect_migrated(settings))
        try:
            await wait_until(
                lambda: conn.fetchval(
                    "SELECT count(*) = 1 FROM rejected_records WHERE request_id = $1", request_id
                )
            )
            await wait_until(lambda: conn.fetchval("SELECT count(*) = 1 FROM customers"))
        finally:
            await conn.close()

        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        metrics = await (await http.get(metrics_url)).text()
        assert 'upgates_receiver_requests_total{event="create",status="200"} 1.0' in metrics
        assert 'upgates_receiver_requests_total{event="update",status="400"} 1.0' in metrics
        await wait_until(lambda: _dead_lettered(http, workers))
    finally:
        proc.send_signal(signal.SIGINT)
        code = await exit_code(proc, within=60)

    assert code == 0
    log = output.read_text()
    assert CANARY not in log
    assert TOKEN not in log
    lines = [line for line in log.splitlines() if "| " in line]
    names = {line.split("|", 1)[0].strip() for line in lines}
    assert {"receiver", "worker-1", "worker-2"} <= names
    records = [json.loads(line.split("| ", 1)[1]) for line in lines]
    # One line per request and per batch, tied together by the request id.
    webhook_lines = [r for r in records if r.get("msg") == "webhook"]
    assert any(r.get("request_id") == request_id and r["records"] == 2 for r in webhook_lines)
    batches = [r for r in records if r.get("msg") == "batch committed"]
    assert any(request_id in r["request_ids"] for r in batches)
    assert any(r.get("msg") == "message dead-lettered" for r in records)
    assert sum(r.get("msg") == "worker stopped" for r in records) == 2


async def _ready(http: aiohttp.ClientSession, base: str) -> bool:
    return await _status(http, f"{base}/readyz") == 200


async def _dead_lettered(http: aiohttp.ClientSession, workers: list[str]) -> bool:
    total = 0.0
    for base in workers:
        async with http.get(f"{base}/metrics") as response:
            for line in (await response.text()).splitlines():
                if line.startswith("upgates_worker_dead_letters_total "):
                    total += float(line.split()[1])
    return total >= 1


async def _publish_poison(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(EXCHANGE)
        body: Any = json.dumps({"customers": [{"email": CANARY}]}).encode()
        await exchange.publish(
            aio_pika.Message(body, headers={"x-event": "create"}), routing_key="customers.create"
        )


async def test_worker_readiness_follows_postgres(
    settings: Settings, http: aiohttp.ClientSession, spawn: Any
) -> None:
    port = free_port()
    spawn("worker", WORKER_PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    await wait_until(lambda: _ready(http, base), timeout=30)
    assert await _status(http, f"{base}/healthz") == 200
    # Make Postgres refuse this database: the worker stays alive but is no longer ready.
    admin = await asyncpg.connect(settings.database_url.rsplit("/", 1)[0] + "/postgres")
    name = settings.database_url.rsplit("/", 1)[1]
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await wait_until(lambda: _not_ready(http, base), timeout=10)
        assert await _status(http, f"{base}/healthz") == 200
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    await wait_until(lambda: _ready(http, base), timeout=30)


async def _not_ready(http: aiohttp.ClientSession, base: str) -> bool:
    return await _status(http, f"{base}/readyz") == 503
