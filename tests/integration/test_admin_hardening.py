"""Hardening of the deployment and of what operators touch.

- The observability profile is closed: Grafana and Prometheus on 127.0.0.1 only, no anonymous
  Grafana and no default admin password, Grafana with no route to the data; the services log in
  to Postgres and RabbitMQ as users that can do their work and no more.
- Dead letters survive any number of looks, on RabbitMQ 3.10 as on 4.x (whose quorum queues
  drop a message after 20 returns by default).
- `upgates-admin` asks before it deletes (or takes --yes), shows what would go (--dry-run),
  names dead letters by a stable id, and `dead show` prints only fields that say nothing about
  who the customer is.
- A compressed message may not unpack to more than the receiver could have accepted.

Real RabbitMQ and Postgres, as everywhere; Docker is not needed: the compose file is read with
docker-compose's own `config`, and the deploy scripts run against the local servers.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import msgspec
import pytest
import zstandard

from common import schema
from common.message import ZSTD, Webhook, pack, unpack
from common.settings import Settings
from common.topology import DEAD_EXCHANGE, DEAD_QUEUE, EXCHANGE, declare_topology
from tests.support.broker import dead_count, dead_letter
from tests.support.config import PG_ADMIN
from tests.support.load import ADMIN_CANARY as CANARY
from tests.support.load import webhook
from tests.support.processes import ROOT
from tests.support.servers import RABBIT_BIN, PrivateRabbit, rabbitmqctl
from tests.support.services import admin
from tests.support.waiting import wait_until
from worker.service import Worker
from worker.store import migrate


async def declared(settings: Settings) -> None:
    """The topology, declared as the services declare it."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        await declare_topology(await connection.channel(), settings)


async def listing(settings: Settings) -> str:
    status, out = await admin(settings, "dead", "list")
    assert status == 0, out
    return out


class Terminal(io.StringIO):
    """Standard input as an operator at a terminal answers a question."""

    def isatty(self) -> bool:
        return True


# --- 5: dead letters survive browsing --------------------------------------------------------

# RabbitMQ 4.x's default for quorum queues (3.10 has none): a message returned unacknowledged
# more often than this is dropped, or dead-lettered if its queue has somewhere to send it.
FOUR_X_DELIVERY_LIMIT = json.dumps({"delivery-limit": 20})


@pytest.mark.parametrize("policy", [None, FOUR_X_DELIVERY_LIMIT], ids=["as-is", "4x-default"])
async def test_dead_letters_survive_any_number_of_looks(
    settings: Settings, vhost: str, policy: str | None
) -> None:
    await declared(settings)
    if policy is not None:
        await rabbitmqctl(
            "set_policy", "-p", vhost, "--apply-to", "queues",
            "four-x-delivery-limit", r"^upgates\.customers\.dead", policy,
        )  # fmt: skip
    ids = [f"req-look-{i}" for i in range(3)]
    for i, request_id in enumerate(ids):
        await dead_letter(settings, webhook(i), **{schema.H_REQUEST_ID: request_id})
    await wait_until(lambda: _dead_at_least(settings, 3))

    for _ in range(25):  # the hourly retention run and the operators, over a day or so
        assert "3 dead letter(s)" in await listing(settings)
    final = await listing(settings)
    assert all(f"id={request_id}" in final for request_id in ids), final
    assert await dead_count(settings) == 3
    status, shown = await admin(settings, "dead", "show", ids[0])
    assert status == 0
    # Every look put each letter back as a new message: none was ever delivered twice.
    assert "header x-delivery-count: 0" in shown


async def _dead_at_least(settings: Settings, n: int) -> bool:
    return await dead_count(settings) >= n


# --- 12: operators' commands -----------------------------------------------------------------


async def test_purging_dead_letters_asks_first_and_a_dry_run_deletes_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await declared(settings)
    for request_id in ("req-a", "req-b"):
        await dead_letter(settings, webhook(1), **{schema.H_REQUEST_ID: request_id})
    await wait_until(lambda: _dead_at_least(settings, 2))

    # No terminal to ask on (a script, cron): nothing without --yes.
    status, out = await admin(settings, "dead", "purge", "--all")
    assert status == 2
    assert "--yes" in out
    assert await dead_count(settings) == 2

    status, out = await admin(settings, "dead", "purge", "--all", "--dry-run")
    assert status == 0
    assert "id=req-a" in out
    assert "id=req-b" in out
    assert "would purge 2 dead letter(s)" in out
    assert await dead_count(settings) == 2

    # At a terminal: what would go is listed, then the question; only y deletes.
    monkeypatch.setattr(sys, "stdin", Terminal("\n"))
    status, out = await admin(settings, "dead", "purge", "--all")
    assert status == 1
    assert "id=req-a" in out
    assert "nothing deleted" in out
    assert await dead_count(settings) == 2
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    status, out = await admin(settings, "dead", "purge", "--id", "req-a")
    assert status == 0
    assert out.splitlines()[0].startswith("id=req-a ")
    assert out.splitlines()[-1] == "purged 1 dead letter(s)"
    assert await dead_count(settings) == 1
    monkeypatch.undo()

    assert await admin(settings, "dead", "purge", "--id", "req-b", "--yes") == (
        0,
        "purged 1 dead letter(s)",
    )
    assert await dead_count(settings) == 0


async def test_a_dead_letter_is_named_by_its_id_not_its_place_in_a_listing(
    settings: Settings,
) -> None:
    await declared(settings)
    await dead_letter(settings, webhook(1), **{schema.H_REQUEST_ID: "req-first"})
    await dead_letter(settings, webhook(2), **{schema.H_REQUEST_ID: "req-second"})
    # A bundle left whole by RabbitMQ has no request id of its own: its message id names it.
    bundle = pack([_webhook(3), _webhook(4)])
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await (await channel.get_exchange(DEAD_EXCHANGE)).publish(bundle, routing_key="")
    await wait_until(lambda: _dead_at_least(settings, 3))
    out = await listing(settings)
    assert f"id={bundle.message_id}" in out

    # The operator read "#2 is the one to purge" while somebody else replayed #1 ...
    assert await admin(settings, "dead", "replay", "--id", "req-first") == (
        0,
        "replayed 1 dead letter(s)",
    )
    # ... and an index would now point at the bundle; the id still points at the second.
    with pytest.raises(SystemExit):
        await admin(settings, "dead", "purge", "--index", "2", "--yes")
    status, _ = await admin(settings, "dead", "purge", "--id", "req-second", "--yes")
    assert status == 0
    out = await listing(settings)
    assert "1 dead letter(s)" in out
    assert f"id={bundle.message_id}" in out

    status, out = await admin(settings, "dead", "purge", "--id", "req-gone", "--yes")
    assert status == 1
    assert "no dead letter with id req-gone" in out
    assert await dead_count(settings) == 1


def _webhook(cid: int) -> Webhook:
    body = webhook(cid)
    return Webhook("create", "admin-shop", 1, int(time.time() * 1000), uuid.uuid4().hex, body)


async def test_purging_rejected_records_asks_first(
    settings: Settings, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await db.execute(
        "INSERT INTO rejected_records (project_name, event, reason, record, received_at,"
        " request_id, position) VALUES"
        " ('s', 'create', 'bad id', '{}', now() - interval '40 days', 'r1', 0),"
        " ('s', 'create', 'bad id', '{}', now() - interval '1 day', 'r2', 0)"
    )

    async def rows() -> int:
        count: int = await db.fetchval("SELECT count(*) FROM rejected_records")
        return count

    status, out = await admin(settings, "rejected", "purge", "--all")
    assert status == 2
    assert "--yes" in out
    status, out = await admin(settings, "rejected", "purge", "--older-than", "30", "--dry-run")
    assert status == 0
    assert "reason=bad id" in out
    assert "would purge 1 rejected record(s)" in out
    assert await rows() == 2

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    status, out = await admin(settings, "rejected", "purge", "--all")
    assert status == 1
    assert "nothing deleted" in out
    assert await rows() == 2
    monkeypatch.undo()

    assert await admin(settings, "rejected", "purge", "--older-than", "30", "--yes") == (
        0,
        "purged 1 rejected record(s)",
    )
    # Nothing to delete: nothing to confirm.
    assert await admin(settings, "rejected", "purge", "--older-than", "30") == (
        0,
        "purged 0 rejected record(s)",
    )
    assert await rows() == 1


PERSONAL = {
    "email": CANARY,
    "firstname": "Bohumila",
    "surname": "Nováčková",
    "phone": "+420 777 123 456",
    "company": "Kolonial Nováčková s.r.o.",
    "street": "Dlouhá 12",
    "city": "Kostelec nad Orlicí",
    "zip": "51741",
    "addresses": [{"street": "Krátká 3", "city": "Ústí nad Labem"}],
}


async def test_dead_show_prints_which_record_and_when_never_who(settings: Settings) -> None:
    await declared(settings)
    record = {
        "customer_id": 4711,
        "code": "ZK-4711",
        "creation_time": "2025-03-04T05:06:07+01:00",
        "last_update_time": "2025-03-05T05:06:07+01:00",
        "active_yn": True,
        "blocked_yn": False,
        **PERSONAL,
    }
    body = msgspec.json.encode({"project_name": "admin-shop", "customers": [record]})
    await dead_letter(settings, body, **{schema.H_REQUEST_ID: "req-person"})
    await wait_until(lambda: _dead_at_least(settings, 1))

    status, shown = await admin(settings, "dead", "show", "req-person")
    assert status == 0
    for value in ("4711", "ZK-4711", "2025-03-04T05:06:07+01:00", "2025-03-05T05:06:07+01:00"):
        assert value in shown
    for field, value in PERSONAL.items():
        assert f'"{field}"' in shown  # the field is there, by name
        for text in ("Ústí", "Krátká") if field == "addresses" else (str(value),):
            assert text not in shown, field
    assert '"active_yn":true' in shown

    status, shown = await admin(settings, "dead", "show", "req-person", "--show-personal-data")
    assert status == 0
    for text in (CANARY, "Nováčková", "+420 777 123 456", "Krátká 3"):
        assert text in shown


# --- 13: the zstd cap ------------------------------------------------------------------------


def _compressed(size: int) -> aio_pika.Message:
    """A message as the receiver packs a large webhook, claiming `size` bytes unpacked."""
    body = zstandard.ZstdCompressor(level=1).compress(b" " * size)
    return aio_pika.Message(
        body,
        content_type="application/json",
        content_encoding=ZSTD,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={
            schema.H_EVENT: "create",
            schema.H_PROJECT: "zstd-shop",
            schema.H_RECORDS: 1,
            schema.H_RECEIVED_AT: int(time.time() * 1000),
            schema.H_REQUEST_ID: "req-zstd",
        },
        message_id="req-zstd",
    )


def test_a_message_may_unpack_to_what_the_receiver_accepts_and_no_more() -> None:
    limit = 8 * 1024 * 1024  # MAX_BODY_BYTES of some deployment
    assert unpack(_compressed(limit), limit)[0].body == b" " * limit  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"would unpack to {limit + 1} bytes, more than"):
        unpack(_compressed(limit + 1), limit)  # type: ignore[arg-type]
    # The default is the default MAX_BODY_BYTES.
    default = Settings().max_body_bytes
    with pytest.raises(ValueError, match="more than"):
        unpack(_compressed(default + 1))  # type: ignore[arg-type]


def test_the_largest_bundle_the_receiver_makes_unpacks_under_any_body_limit() -> None:
    from common.message import BUNDLE_MAX_UNPACKED_BYTES, unpacked_limit
    from receiver.publisher import BUNDLE_BELOW_BYTES, BUNDLE_MAX_BYTES, BUNDLE_MAX_WEBHOOKS

    # The publisher adds webhooks smaller than BUNDLE_BELOW_BYTES while the bundle's bodies are
    # under BUNDLE_MAX_BYTES; a shop name as long as the body around it doubles each.
    bundle: list[Webhook] = []
    size = 0
    while len(bundle) < BUNDLE_MAX_WEBHOOKS and size < BUNDLE_MAX_BYTES:
        body = b"x" * (BUNDLE_BELOW_BYTES - 1)
        bundle.append(Webhook("create", "s" * len(body), 2**62, 2**62, uuid.uuid4().hex, body))
        size += len(body)
    message = pack(bundle)
    assert message.content_encoding == ZSTD
    assert unpacked_limit(1024) == BUNDLE_MAX_UNPACKED_BYTES  # the smallest MAX_BODY_BYTES
    assert unpack(message, 1024) == bundle  # type: ignore[arg-type]
    # Many small webhooks: the framing of each, not the bodies, is what adds up.
    many = [Webhook("update", "s" * 200, 1, 1, uuid.uuid4().hex, b"{}") for _ in range(256)]
    assert len(msgspec.msgpack.encode(many)) < BUNDLE_MAX_UNPACKED_BYTES


async def test_the_worker_dead_letters_a_message_that_would_unpack_too_large(
    settings: Settings, worker: Worker
) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE)
        await exchange.publish(
            _compressed(settings.max_body_bytes + 1), routing_key="customers.create"
        )
    await wait_until(lambda: _dead_at_least(settings, 1))
    status, out = await admin(settings, "dead", "list")
    assert status == 0
    assert f"would unpack to {settings.max_body_bytes + 1} bytes, more than" in out


# --- 4: the deployment -----------------------------------------------------------------------


def compose_config() -> dict[str, Any]:
    """docker-compose.yml as Compose reads it (anchors merged, variables interpolated), with
    WEBHOOK_TOKEN set and none of the optional passwords."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("no docker-compose")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith("_PASSWORD") and not k.startswith("COMPOSE_")
    }
    env["WEBHOOK_TOKEN"] = "x"
    text = subprocess.run(
        [compose, "-f", "docker-compose.yml", "--profile", "observability", "config"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    # docker-compose (v1) prints YAML; the Python it runs on reads YAML.
    interpreter = Path(compose).read_text(errors="replace").splitlines()[0].removeprefix("#!")
    to_json = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    as_json = subprocess.run(
        [*interpreter.split(), "-c", to_json],
        input=text, capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    config: dict[str, Any] = json.loads(as_json)
    return config


def _host_ips(service: dict[str, Any]) -> list[str]:
    ips = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ips.append(port.get("host_ip", "0.0.0.0"))  # noqa: S104 - what no host_ip means
        else:  # HOST_IP:HOST_PORT:PORT, HOST_PORT:PORT or PORT
            parts = str(port).split(":")
            ips.append(parts[0] if len(parts) == 3 else "0.0.0.0")  # noqa: S104
    return ips


def test_the_observability_profile_is_closed() -> None:
    services = compose_config()["services"]
    grafana, prometheus = services["grafana"], services["prometheus"]
    for service in (grafana, prometheus):
        assert service["ports"]
        assert set(_host_ips(service)) == {"127.0.0.1"}, service["ports"]

    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env
    assert not env["GF_SECURITY_ADMIN_PASSWORD"]  # no default password
    # ... and Grafana does not start without one of the operator's own.
    [shell, script] = grafana["entrypoint"]
    [mount] = [v for v in grafana["volumes"] if v.split(":")[1] == script]
    for password in ("", "admin"):
        ran = subprocess.run(
            [shell, mount.split(":")[0]],
            env={"PATH": os.environ["PATH"], "GF_SECURITY_ADMIN_PASSWORD": password},
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert ran.returncode != 0
        assert "GRAFANA_ADMIN_PASSWORD" in ran.stderr

    # Grafana reaches Prometheus, and nothing that holds data.
    networks = set(grafana["networks"])
    assert networks & set(prometheus["networks"])
    for name in ("postgres", "rabbitmq", "receiver", "worker", "sync"):
        assert not networks & set(services[name].get("networks", {"default": None})), name


def test_the_services_log_in_without_administrator_rights() -> None:
    services = compose_config()["services"]
    postgres, rabbitmq = services["postgres"]["environment"], services["rabbitmq"]
    superuser = postgres["POSTGRES_USER"]
    for name in ("receiver", "worker", "sync"):
        env = services[name]["environment"]
        database = urlsplit(env["DATABASE_URL"])
        assert database.username == "upgates_app"
        assert database.username != superuser
        assert database.password == postgres["UPGATES_DB_PASSWORD"]
        amqp = urlsplit(env["AMQP_URL"])
        assert amqp.username == rabbitmq["environment"]["RABBITMQ_DEFAULT_USER"]
        assert amqp.password == rabbitmq["environment"]["RABBITMQ_DEFAULT_PASS"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in services["postgres"]["volumes"]}
    assert mounts["/docker-entrypoint-initdb.d/10-app-role.sh"] == ROOT / APP_ROLE_SH
    assert mounts["/etc/upgates/app-role.sql"] == ROOT / APP_ROLE_SQL
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in rabbitmq["volumes"]}
    conf = mounts["/etc/rabbitmq/conf.d/20-upgates.conf"]
    assert "default_user_tags.administrator = false" in conf.read_text().splitlines()


APP_ROLE_SH = "deploy/postgres/app-role.sh"
APP_ROLE_SQL = "deploy/postgres/app-role.sql"


async def _run_app_role_script(database: str, role: str, password: str) -> None:
    """deploy/postgres/app-role.sh as the postgres image runs it, against the local server."""
    admin_url = urlsplit(PG_ADMIN)
    proc = await asyncio.create_subprocess_exec(
        "sh", str(ROOT / APP_ROLE_SH),
        env={
            "PATH": os.environ["PATH"],
            "PGHOST": admin_url.hostname or "127.0.0.1",
            "PGPORT": str(admin_url.port or 5432),
            "POSTGRES_USER": admin_url.username or "postgres",
            "POSTGRES_DB": database,
            "UPGATES_DB_USER": role,
            "UPGATES_DB_PASSWORD": password,
            "APP_ROLE_SQL": str(ROOT / APP_ROLE_SQL),
        },
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()


@pytest.fixture
async def scratch() -> AsyncIterator[tuple[str, str]]:
    """A database and a role name of this test's own: (database, role); both dropped after."""
    database, role = f"test_{uuid.uuid4().hex[:12]}", f"upgates_app_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_ADMIN)
    await conn.execute(f'CREATE DATABASE "{database}"')
    await conn.close()
    yield database, role
    conn = await asyncpg.connect(PG_ADMIN)
    await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
    await conn.close()


@pytest.mark.parametrize("before", ["new-volume", "tables-of-the-superuser"])
async def test_the_app_role_migrates_and_writes_but_is_no_superuser(
    scratch: tuple[str, str], before: str
) -> None:
    database, role = scratch
    base = PG_ADMIN.rsplit("/", 1)[0]
    if before == "tables-of-the-superuser":  # a deployment whose services used the superuser
        conn = await asyncpg.connect(f"{base}/{database}")
        await migrate(conn)
        await conn.close()
    await _run_app_role_script(database, role, "pw-1")
    await _run_app_role_script(database, role, "pw-2")  # again: an upgrade, a new password

    server = urlsplit(PG_ADMIN)
    conn = await asyncpg.connect(
        f"postgresql://{role}:pw-2@{server.hostname}:{server.port or 5432}/{database}"
    )
    try:
        assert await conn.fetchval("SELECT current_user") == role
        await migrate(conn)  # every migration, or none left: either way as this role
        migrations = len(list((ROOT / "worker" / "migrations").glob("*.sql")))
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == migrations
        # What a later migration does: alter a table, which only its owner may.
        await conn.execute("ALTER TABLE customers SET (fillfactor = 60)")
        await conn.execute(
            "INSERT INTO customers (project_name, customer_id, email, version_at, version_rank,"
            " version_fp) VALUES ('s', 1, 'a@example.cz', now(), 0, '\\x00')"
        )
        await conn.execute("UPDATE customers SET email = NULL WHERE customer_id = 1")
        await conn.execute(
            "INSERT INTO rejected_records (project_name, event, reason, record, received_at,"
            " request_id, position) VALUES ('s', 'create', 'r', '{}', now(), 'q', 0)"
        )
        await conn.execute("DELETE FROM rejected_records")
        # A worker copies each batch into a temporary table first.
        await conn.execute("CREATE TEMPORARY TABLE batch (LIKE customers)")
        await conn.copy_records_to_table("batch", records=[], columns=["customer_id"])

        flags = await conn.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls"
            " FROM pg_roles WHERE rolname = current_user"
        )
        assert not any(flags.values()), dict(flags)
        for statement in (
            "CREATE ROLE intruder",
            "CREATE DATABASE intruder",
            "ALTER SYSTEM SET work_mem = '1GB'",
            "COPY (SELECT 1) TO PROGRAM 'true'",
            "SELECT pg_read_file('PG_VERSION')",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_the_rabbitmq_user_of_the_services_is_no_administrator(tmp_path: Path) -> None:
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.skip(f"no RabbitMQ server in {RABBIT_BIN}")
    base = tmp_path / "rabbit"
    base.mkdir()
    node = PrivateRabbit(base)
    # The node as docker-compose.yml starts it: our conf.d file, the default user from the env.
    with (base / "rabbitmq.conf").open("a") as conf:
        conf.write((ROOT / "deploy/rabbitmq/20-upgates.conf").read_text())
    node.env.update(RABBITMQ_DEFAULT_USER="upgates-test", RABBITMQ_DEFAULT_PASS="pw-test")
    await asyncio.to_thread(node.start)
    try:
        users = await node.ctl("list_users", "--formatter", "json")
        [user] = [u for u in json.loads(users) if u["user"] == "upgates-test"]
        assert user["tags"] == []
        # ... and it can do the services' work.
        url = f"amqp://upgates-test:pw-test@127.0.0.1:{node.port}/"
        connection = await aio_pika.connect(url)
        async with connection:
            topology = await declare_topology(await connection.channel(), Settings(amqp_url=url))
            assert topology.dead_queue.name == DEAD_QUEUE
    finally:
        await asyncio.to_thread(node.stop)
