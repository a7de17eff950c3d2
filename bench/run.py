"""The benchmark: real receiver and worker processes, local RabbitMQ and Postgres, Upgates traffic.

    python -m bench.run            # full run, a few minutes; results in bench/results/full.*
    python -m bench.run --quick    # smoke, ~20 s; bench/results/quick.*
    python -m bench.run --repeat 3 --save-reference   # also bench/reference/full.* (committed)

bench/results/ is ignored by git; bench/reference/ holds the one committed reference run.

Each run makes its own RabbitMQ vhost (rabbitmqctl) and Postgres database and removes them at the
end. Every scenario starts fresh processes (so a worker's peak memory is that scenario's) on an
empty table and an empty queue. The load generator only talks to 127.0.0.1, and is bounded both
in requests and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import asyncpg

from bench import procs, report
from bench.client import Connection, Sample, timed_post
from bench.data import EverydaySender, Payload, burst_payloads
from bench.floor import Floor, checkpoint, measure_floor
from bench.grown import grow
from common.brokers import Nodes
from worker.store import migrate

TOKEN = "bench-token-not-secret"
RESULTS = Path(__file__).resolve().parent / "results"  # ignored by git
REFERENCE = Path(__file__).resolve().parent / "reference"  # the committed reference run
REQUEST_TIMEOUT = 30.0  # past Upgates' 1 s, so slow answers are measured rather than cut
# A webhook not answered 200 is sent again, at most RETRIES times, RETRY_DELAY later: Upgates
# waits 5 minutes; sooner would only add to the overload that caused the 503.
RETRIES = 20
RETRY_DELAY = 1.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """One measured situation."""

    name: str
    kind: str  # "burst" or "everyday"
    design: str  # "pipeline" or "naive"
    concurrency: int
    workers: int
    grown: bool = False  # into a table already holding Options.grown_rows of other shops


@dataclass
class Options:
    """What to run and against what."""

    quick: bool
    out: Path
    amqp_url: str
    vhost: str | None
    pg_url: str
    receivers: int
    shops: int
    blocks: int
    everyday_seconds: float
    everyday_max_requests: int
    time_limit: float
    only: tuple[str, ...]
    env: dict[str, str]
    py_spy: bool
    keep_logs: bool
    worker_nice: int
    repeat: int
    grown_rows: int
    save_reference: bool = False


@dataclass
class Context:
    """What the run set up."""

    options: Options
    amqp_url: str
    dsn: str
    log_dir: Path
    payloads: list[Payload] = field(default_factory=list)


def scenarios(options: Options) -> list[Scenario]:
    """Every scenario of the issue, or those named by --only."""
    every = [
        Scenario("burst-16", "burst", "pipeline", 16, 2),
        Scenario("burst-64", "burst", "pipeline", 64, 2),
        Scenario("naive-burst-16", "burst", "naive", 16, 0),
        Scenario("naive-burst-64", "burst", "naive", 64, 0),
        Scenario("scale-1-worker", "burst", "pipeline", 16, 1),
        Scenario("scale-4-workers", "burst", "pipeline", 16, 4),
        Scenario("grown-16", "burst", "pipeline", 16, 2, grown=True),
        Scenario("everyday-64", "everyday", "pipeline", 64, 2),
        Scenario("naive-everyday-64", "everyday", "naive", 64, 0),
    ]
    if options.only:
        unknown = set(options.only) - {s.name for s in every}
        if unknown:
            raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
        every = [s for s in every if s.name in options.only]
    return every


# ---------------------------------------------------------------------------------------------
# Setting up and tearing down


async def _rabbitmqctl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {err.decode()[-300:]}")
    return out.decode()


def _with_vhost(url: str, vhost: str) -> str:
    """The URL (each node's, for a cluster's comma-separated list) with this vhost."""
    path = "/" + vhost.replace("/", "%2F")
    return ",".join(urlunsplit(urlsplit(u.strip())._replace(path=path)) for u in url.split(","))


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


async def migrated_database(pg_url: str, name: str) -> str:
    """A new database beside pg_url's, migrated; its DSN."""
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(pg_url, name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return dsn


async def setup(options: Options) -> Context:
    """A vhost and a database of our own, migrated."""
    run_id = uuid.uuid4().hex[:10]
    log_dir = Path(tempfile.mkdtemp(prefix=f"bench-{run_id}-"))
    if options.vhost is None:
        vhost = f"bench-{run_id}"
        user = urlsplit(options.amqp_url).username or "guest"
        await _rabbitmqctl("add_vhost", vhost)
        await _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        amqp_url = _with_vhost(options.amqp_url, vhost)
    else:
        amqp_url = _with_vhost(options.amqp_url, options.vhost)
    dsn = await migrated_database(options.pg_url, f"bench_{run_id}")
    return Context(options, amqp_url, dsn, log_dir)


async def teardown(ctx: Context) -> None:
    """Remove the database and the vhost (or, in a given vhost, the queues we declared)."""
    admin = await asyncpg.connect(ctx.options.pg_url)
    try:
        name = urlsplit(ctx.dsn).path.lstrip("/")
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    if ctx.options.vhost is None:
        await _rabbitmqctl("delete_vhost", urlsplit(ctx.amqp_url).path.lstrip("/"))
    if not ctx.options.keep_logs:
        shutil.rmtree(ctx.log_dir, ignore_errors=True)


async def reset(ctx: Context) -> None:
    """An empty table and an empty queue before each scenario."""
    conn = await asyncpg.connect(ctx.dsn)
    try:
        await conn.execute("TRUNCATE customers, rejected_records")
        await checkpoint(conn)
    finally:
        await conn.close()
    connection = await Nodes(ctx.amqp_url).connect()
    try:
        channel = await connection.channel()
        with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
            queue = await channel.declare_queue("upgates.customers", passive=True)
            await queue.purge()
    finally:
        await connection.close()


# ---------------------------------------------------------------------------------------------
# Driving the load


@dataclass
class Outcome:
    """What the senders saw, and what the table must end up holding."""

    samples: list[Sample] = field(default_factory=list)
    cpu_start: float = 0.0  # the load generator's CPU time when sending started
    rows: int = 0  # customers acknowledged at least once
    updated: int = 0  # customers with an acknowledged update


async def send_until_accepted(
    connection: Connection, path: str, body: bytes, records: int, deadline: float, out: Outcome
) -> bool:
    """Send one webhook, again after a 503 or a lost connection, as the sender would."""
    for _ in range(RETRIES):
        if time.monotonic() > deadline:
            return False
        sample = await timed_post(connection, path, body, records, REQUEST_TIMEOUT)
        out.samples.append(sample)
        if sample.status == 200:
            return True
        await asyncio.sleep(RETRY_DELAY)
    return False


async def drive_burst(
    port: int, payloads: list[Payload], concurrency: int, time_limit: float
) -> Outcome:
    """Send every payload until accepted, `concurrency` at a time; a refused one goes last."""
    out = Outcome(cpu_start=time.process_time())
    # (payload, attempts so far, not before)
    pending = collections.deque((p, 0, 0.0) for p in payloads)
    deadline = time.monotonic() + time_limit
    created: set[tuple[str, int]] = set()
    updated: set[tuple[str, int]] = set()
    size = {(p.shop, p.block): p.records for p in payloads}

    async def sender() -> None:
        connection = Connection(port, TOKEN)
        try:
            while pending and time.monotonic() < deadline:
                payload, attempts, not_before = pending.popleft()
                if not_before > time.monotonic():
                    await asyncio.sleep(not_before - time.monotonic())
                path = f"/webhooks/customers/{payload.event}"
                sample = await timed_post(
                    connection, path, payload.body, payload.records, REQUEST_TIMEOUT
                )
                out.samples.append(sample)
                if sample.status == 200:
                    seen = created if payload.event == "create" else updated
                    seen.add((payload.shop, payload.block))
                elif attempts + 1 < RETRIES:
                    pending.append((payload, attempts + 1, time.monotonic() + RETRY_DELAY))
        finally:
            connection.close()

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    out.rows = sum(size[key] for key in created | updated)
    out.updated = sum(size[key] for key in updated)
    return out


def everyday_streams(senders: int, seconds: float, max_requests: int) -> list[EverydaySender]:
    """One stream per sender, written ahead for up to 6,000 webhooks/s (past that, on the fly)."""
    streams = [EverydaySender(i, seed=7) for i in range(senders)]
    ahead = min(max_requests, int(6000 * seconds)) // senders + 1
    for stream in streams:
        stream.prepare(ahead)
    return streams


async def drive_everyday(
    port: int, streams: list[EverydaySender], seconds: float, max_requests: int
) -> Outcome:
    """Each stream sends its small webhooks back to back, for `seconds`."""
    out = Outcome(cpu_start=time.process_time())
    stop_at = time.monotonic() + seconds
    budget = [max_requests]
    created: set[tuple[str, int]] = set()
    updated: set[tuple[str, int]] = set()

    async def sender(stream: EverydaySender) -> None:
        connection = Connection(port, TOKEN)
        try:
            while time.monotonic() < stop_at and budget[0] > 0:
                budget[0] -= 1
                event, body, ids = stream.next_payload()
                path = f"/webhooks/customers/{event}"
                if not await send_until_accepted(
                    connection, path, body, len(ids), stop_at + REQUEST_TIMEOUT, out
                ):
                    break  # later webhooks of this shop may update what was not accepted
                seen = created if event == "create" else updated
                seen.update((stream.shop, cid) for cid in ids)
        finally:
            connection.close()

    await asyncio.gather(*(sender(s) for s in streams))
    out.rows = len(created)
    out.updated = len(updated)
    return out


# The load's own shops only (all named bench-...): a grown table's other shops would make
# every poll a scan of millions of rows. A range of the primary key, so an index scan.
VISIBLE = """SELECT count(*), count(updated_at) FROM customers
WHERE project_name >= 'bench-' AND project_name < 'bench.'"""


async def wait_visible(
    ctx: Context, out: Outcome, worker_ports: list[int], records: int, limit: float
) -> float:
    """Until every acknowledged row is in the table; the perf_counter time it was first seen.

    The workers' committed-records counter is polled, then the table is checked; without that
    counter the table itself is polled. Each poll costs a worker a /metrics page, so the counter
    is read every 0.2 s until the last 5% of the records, then every 20 ms: the end is seen as
    precisely, and the polling does not weigh on the workers it measures.
    """
    deadline = time.monotonic() + limit
    conn = await asyncpg.connect(ctx.dsn)
    try:
        async with aiohttp.ClientSession() as http:
            while worker_ports:
                committed = await procs.worker_records(http, worker_ports)
                if committed is None or committed >= records:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"workers committed {committed} of {records} records")
                await asyncio.sleep(0.02 if committed >= 0.95 * records else 0.2)
        while True:
            seen = time.perf_counter()
            rows, updated = await conn.fetchrow(VISIBLE)
            if rows >= out.rows and updated >= out.updated:
                return seen
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"table has {rows}/{out.rows} rows, {updated}/{out.updated} updated"
                )
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# One scenario


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def _env(ctx: Context) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env.update(
        AMQP_URL=ctx.amqp_url,
        DATABASE_URL=ctx.dsn,
        WEBHOOK_TOKEN=TOKEN,
        LOG_FORMAT="json",
        PYTHONPATH=str(procs.ROOT),
    )
    env.update(ctx.options.env)
    return env


def _py_spy(ctx: Context, scenario: Scenario, fleet: procs.Fleet) -> list[subprocess.Popen[bytes]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = ctx.options.out / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    started = []
    for service in fleet.services:
        index = fleet.of(service.role).index(service)
        target = out / f"{scenario.name}-{service.role}-{index}.speedscope.json"
        started.append(
            subprocess.Popen(
                [spy, "record", "--pid", str(service.pid), "--subprocesses", "--rate", "200",
                 "--nonblocking", "--format", "speedscope", "--output", str(target)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
    return started


async def run_scenario(ctx: Context, scenario: Scenario) -> dict[str, Any]:
    """Fresh processes, the load, the wait until every row is visible, the figures."""
    options = ctx.options
    await reset(ctx)
    if scenario.grown:
        took = await grow(ctx.dsn, options.grown_rows)
        print(f"bench: table grown to {options.grown_rows:,} rows in {took:.0f} s", flush=True)
    fleet = procs.Fleet(_env(ctx), ctx.log_dir / scenario.name)
    fleet.log_dir.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    metrics_port = procs.free_port()
    worker_ports = []
    if scenario.design == "pipeline":
        fleet.start(
            "receiver", "receiver", port, listeners=options.receivers,
            RECEIVER_HOST="127.0.0.1", RECEIVER_PORT=str(port),
            RECEIVER_PROCESSES=str(options.receivers), RECEIVER_METRICS_PORT=str(metrics_port),
        )  # fmt: skip
        for _ in range(scenario.workers):
            worker_port = procs.free_port()
            worker_ports.append(worker_port)
            fleet.start(
                "worker", "worker", worker_port, nice=options.worker_nice,
                WORKER_HOST="127.0.0.1", WORKER_PORT=str(worker_port),
            )  # fmt: skip
    else:
        fleet.start("naive", "bench.naive", port, RECEIVER_PORT=str(port))
    spies: list[subprocess.Popen[bytes]] = []
    try:
        await fleet.wait_ready()
        if options.py_spy:
            spies = _py_spy(ctx, scenario, fleet)
            await asyncio.sleep(0.5)
        if scenario.kind == "everyday":
            streams = everyday_streams(
                scenario.concurrency, options.everyday_seconds, options.everyday_max_requests
            )
        load_before = os.getloadavg()[0]
        machine_before = procs.machine_busy()
        database = urlsplit(ctx.dsn).path.lstrip("/")
        servers_before = procs.server_cpu(database)
        if scenario.kind == "burst":
            out = await drive_burst(port, ctx.payloads, scenario.concurrency, options.time_limit)
        else:
            out = await drive_everyday(
                port, streams, options.everyday_seconds, options.everyday_max_requests
            )
        ok = [s for s in out.samples if s.status == 200]
        records = sum(s.records for s in ok)
        done = await wait_visible(ctx, out, worker_ports, records, options.time_limit)
        machine_after = procs.machine_busy()
        cpu = {
            "receiver": round(fleet.cpu("receiver") + fleet.cpu("naive"), 2),
            "workers": round(fleet.cpu("worker"), 2),
            "load_generator": round(time.process_time() - out.cpu_start, 2),
        }
        servers_after = procs.server_cpu(database)
        for name, before in servers_before.items():
            cpu[name] = round(procs.cpu_used(before, servers_after[name]), 2)
        peak_rss = fleet.peak_rss("worker")
        server_side: dict[str, float] = {}
        if scenario.design == "pipeline":
            async with aiohttp.ClientSession() as http:
                server_side = await procs.receiver_means(http, metrics_port)
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
        await fleet.stop()

    first = min(s.started for s in out.samples)
    last = max(s.started + s.latency for s in out.samples)
    latencies = sorted(s.latency for s in out.samples)
    statuses: dict[str, int] = {}
    for sample in out.samples:
        statuses[str(sample.status)] = statuses.get(str(sample.status), 0) + 1
    send_seconds = last - first
    e2e_seconds = done - first
    busy = machine_after[0] - machine_before[0]
    total = machine_after[1] - machine_before[1]
    return {
        "name": scenario.name,
        "kind": scenario.kind,
        "design": scenario.design,
        "concurrency": scenario.concurrency,
        "workers": scenario.workers,
        "receivers": options.receivers if scenario.design == "pipeline" else 1,
        "requests": len(out.samples),
        "accepted": len(ok),
        "statuses": statuses,
        "records": records,
        "latency_ms": {
            "p50": round(_percentile(latencies, 0.50) * 1000, 1),
            "p99": round(_percentile(latencies, 0.99) * 1000, 1),
            "max": round(latencies[-1] * 1000, 1),
        },
        "answers_over_1s": sum(1 for v in latencies if v >= 1.0),
        "receiver_mean": server_side,
        "webhooks_per_s": round(len(ok) / send_seconds, 1) if send_seconds else 0.0,
        "acked_records_per_s": round(records / send_seconds, 1) if send_seconds else 0.0,
        "e2e_seconds": round(e2e_seconds, 3),
        "e2e_records_per_s": round(records / e2e_seconds, 1) if e2e_seconds else 0.0,
        "worker_peak_rss_mb": round(peak_rss, 1) if scenario.workers else None,
        "grown_rows": options.grown_rows if scenario.grown else 0,
        "cpu_seconds": cpu,
        "machine_cpu_busy": round(busy / total, 3) if total else None,
        "load_average_before": round(load_before, 2),
    }


# ---------------------------------------------------------------------------------------------
# The run


async def rabbitmq_version(url: str) -> str:
    """The broker's version, as it announces itself."""
    connection = await Nodes(url).connect()
    try:
        assert connection.transport is not None
        properties = connection.transport.connection.server_properties
        version = properties.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        await connection.close()


def host() -> dict[str, Any]:
    """CPU, memory, Python, package versions and the checkout."""
    memory = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    packages = {}
    for name in ("aiohttp", "aio-pika", "asyncpg", "msgspec", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "ram_gib": round(int(memory) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": packages,
        "git": git,
        # On, the kernel weighs each session as one: `nice` orders only the processes of the
        # bench's own session (receivers, workers, load generator), and each Postgres backend,
        # a session of its own, weighs as much as all of them (bench/README.md).
        "sched_autogroup": autogroup.exists() and autogroup.read_text().strip() == "1",
    }


async def machine(ctx: Context) -> dict[str, Any]:
    """What the figures were measured on."""
    conn = await asyncpg.connect(ctx.dsn)
    try:
        postgres = await conn.fetchval("SHOW server_version")
        pg_settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("synchronous_commit", "fsync", "shared_buffers", "wal_level")
        }
    finally:
        await conn.close()
    described = host()
    described.update(
        postgres=postgres,
        postgres_settings=pg_settings,
        rabbitmq=await rabbitmq_version(ctx.amqp_url),
        load_average_at_start=[round(v, 2) for v in os.getloadavg()],
        note="receiver, workers, Postgres, RabbitMQ and the load generator share these cores",
    )
    return described


async def run(options: Options) -> dict[str, Any]:
    """Set up, measure every scenario, write the results, clean up."""
    started = time.time()
    # SIGTERM (a CI timeout) ends the run like Ctrl-C: processes stopped, vhost and database gone.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    ctx = await setup(options)
    try:
        print(f"bench: logs in {ctx.log_dir}", flush=True)
        described = await machine(ctx)
        ctx.payloads = burst_payloads(options.shops, options.blocks)
        # A floor is measured right before each burst, and once after the last: each burst is
        # compared with the faster of the two measured around it. These machines change speed
        # from one minute to the next; a floor measured minutes away would compare two machines.
        floors: list[Floor] = []
        results = []
        # --repeat N: N rounds of every scenario, rather than each scenario N times in a row, so
        # that a slow minute lands on one run of several scenarios, not on all runs of one.
        for round_number in range(1, options.repeat + 1):
            for scenario in scenarios(options):
                if scenario.kind == "burst":
                    floors.append(await measure_floor(ctx.dsn, ctx.payloads))
                    print(f"bench: floor {floors[-1].records_per_s:,.0f} records/s", flush=True)
                result = await run_scenario(ctx, scenario)
                result["round"] = round_number
                if scenario.kind == "burst":
                    result["floor_index"] = len(floors) - 1
                results.append(result)
                print(f"bench: {report.one_line(result)}", flush=True)
        if floors:
            floors.append(await measure_floor(ctx.dsn, ctx.payloads))
            print(f"bench: floor {floors[-1].records_per_s:,.0f} records/s", flush=True)
    finally:
        await teardown(ctx)
    for result in results:
        if result["kind"] == "burst":
            index = result.pop("floor_index")
            # The faster of the two is the stricter reference.
            around = max(floors[index].records_per_s, floors[index + 1].records_per_s)
            result["floor_records_per_s"] = round(around, 1)
            result["floor_ratio"] = round(result["e2e_records_per_s"] / around, 3)
    floor = max(floors, key=lambda f: f.records_per_s) if floors else Floor(0, 0.0)
    body_bytes = sum(len(p.body) for p in ctx.payloads)
    document = {
        "mode": "quick" if options.quick else "full",
        "command": " ".join(["python", "-m", "bench.run", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": described,
        "config": {
            "shops": options.shops,
            "payloads_per_burst": len(ctx.payloads),
            "records_per_payload": ctx.payloads[0].records if ctx.payloads else 0,
            "burst_records": sum(p.records for p in ctx.payloads),
            "mean_payload_bytes": round(body_bytes / max(1, len(ctx.payloads))),
            "receivers": options.receivers,
            "worker_nice": options.worker_nice,
            "everyday_seconds": options.everyday_seconds,
            "repeat": options.repeat,
            "env": options.env,
        },
        "floor": {
            "records": floor.records,
            "seconds": round(floor.seconds, 3),
            "records_per_s": round(floor.records_per_s, 1),
            "measurements": [asdict(f) | {"records_per_s": f.records_per_s} for f in floors],
        },
        "scenarios": results,
        "summary": report.summary(results),
    }
    # The targets are set for bursts of 200 full payloads (the default); a smaller burst, such
    # as a quick run's 4, judges nothing.
    judged = len(ctx.payloads) >= report.TARGET_BURST_PAYLOADS
    document["targets"] = report.targets(document["summary"]) if judged else []
    stem = "quick" if options.quick else "full"
    report.write(document, options.out, stem)
    print(f"bench: results in {options.out}/{stem}.{{json,md,png}}", flush=True)
    if options.save_reference and options.out.resolve() != REFERENCE:
        REFERENCE.mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".md", ".png"):
            shutil.copyfile(options.out / f"{stem}{suffix}", REFERENCE / f"{stem}{suffix}")
        print(f"bench: reference updated in {REFERENCE}/{stem}.{{json,md,png}}", flush=True)
    for target in document["targets"]:
        print(f"bench: {report.target_line(target)}")
    return document


def parse(argv: Sequence[str] | None = None) -> Options:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: small bursts, ~20 s")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="where results are written (bench/results/)"
    )
    parser.add_argument(
        "--save-reference",
        action="store_true",
        help="also copy this run's full.{json,md,png} to bench/reference/, the committed "
        "reference (a full run of every scenario at the default load only)",
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        help="RabbitMQ (its vhost part is replaced)",
    )
    parser.add_argument(
        "--vhost",
        default=None,
        help="use this existing vhost instead of creating one with rabbitmqctl",
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="Postgres DSN allowed to CREATE DATABASE (a bench_* database is made and dropped)",
    )
    parser.add_argument(
        "--receivers",
        type=int,
        default=2,
        help="RECEIVER_PROCESSES: receiver processes on one port (the compose file's 2)",
    )
    parser.add_argument("--shops", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=None, help="5000-record payloads per shop")
    parser.add_argument("--everyday-seconds", type=float, default=None)
    parser.add_argument(
        "--grown-rows",
        type=int,
        default=None,
        help="rows of other shops in the table before grown-16's burst (default 10,000,000)",
    )
    parser.add_argument("--time-limit", type=float, default=300.0, help="per scenario, seconds")
    parser.add_argument("--only", nargs="*", default=(), help="run only these scenarios")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every scenario this many times (in rounds); the report shows each one's "
        "median and range",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="VAR=VALUE", help="service environment"
    )
    parser.add_argument("--py-spy", action="store_true", help="profile every process (py-spy)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the services' logs")
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=10,
        help="run workers at this nice level: answers first on one shared machine, as the "
        "compose file's cpu_shares",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    # The reference is what the README shows: every scenario, at the default load and settings.
    changed = (
        args.quick, args.only, args.shops, args.blocks, args.everyday_seconds, args.set,
        args.grown_rows,
    )  # fmt: skip
    if args.save_reference and (any(changed) or (args.receivers, args.worker_nice) != (2, 10)):
        parser.error(
            "--save-reference takes a full run of every scenario at the default load and "
            "settings (no --quick, --only, --shops, --blocks, --everyday-seconds, --set, "
            "--receivers or --worker-nice)"
        )
    env = dict(item.split("=", 1) for item in args.set)
    return Options(
        quick=args.quick,
        out=args.out,
        amqp_url=args.amqp_url,
        vhost=args.vhost,
        pg_url=args.pg_url,
        receivers=args.receivers,
        # Full: 4 shops x 25 blocks x (create + update) = a 200-payload, 1M-record burst.
        shops=args.shops or (2 if args.quick else 4),
        blocks=args.blocks or (1 if args.quick else 25),
        everyday_seconds=args.everyday_seconds or (1.5 if args.quick else 15.0),
        everyday_max_requests=200_000,
        time_limit=args.time_limit,
        only=tuple(args.only),
        env=env,
        py_spy=args.py_spy,
        keep_logs=args.keep_logs,
        worker_nice=args.worker_nice,
        repeat=args.repeat,
        grown_rows=args.grown_rows or (20_000 if args.quick else 10_000_000),
        save_reference=args.save_reference,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark."""
    options = parse(argv)
    try:
        import uvloop  # a cheaper load generator when available
    except ImportError:
        asyncio.run(run(options))
    else:
        uvloop.run(run(options))


if __name__ == "__main__":
    main()
