"""The results as JSON, a markdown table and a PNG chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

LABELS = {
    "burst-16": "burst, 16 concurrent",
    "burst-64": "burst, 64 concurrent",
    "naive-burst-16": "burst, 16 concurrent",
    "naive-burst-64": "burst, 64 concurrent",
    "scale-1-worker": "burst, 16 concurrent",
    "scale-4-workers": "burst, 16 concurrent",
    "grown-16": "burst, 16 concurrent, grown table",
    "everyday-64": "everyday, 64 senders",
    "naive-everyday-64": "everyday, 64 senders",
}


def one_line(result: dict[str, Any]) -> str:
    """A progress line."""
    latency = result["latency_ms"]
    return (
        f"{result['name']}: {result['accepted']} webhooks, p50 {latency['p50']} ms, "
        f"p99 {latency['p99']} ms, max {latency['max']} ms, "
        f">=1s {result['answers_over_1s']}, {result['webhooks_per_s']:,.0f} webhooks/s, "
        f"e2e {result['e2e_records_per_s']:,.0f} records/s"
    )


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per scenario, over its runs (--repeat): medians and ranges, worst cases.

    The target figures are judged on the medians; the answers at or over 1 s and the answers
    other than 200 are the sums over every run, and the peak memory the largest.
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        runs.setdefault(result["name"], []).append(result)
    entries = []
    for name, of in runs.items():
        first = of[0]
        entry: dict[str, Any] = {
            "name": name,
            "kind": first["kind"],
            "design": first["design"],
            "workers": first["workers"],
            "runs": len(of),
            "accepted": _spread([r["accepted"] for r in of]),
            "not_200": sum(r["requests"] - r["accepted"] for r in of),
            "answers_over_1s": sum(r["answers_over_1s"] for r in of),
            "p50_ms": _spread([r["latency_ms"]["p50"] for r in of]),
            "p99_ms": _spread([r["latency_ms"]["p99"] for r in of]),
            "max_ms": max(r["latency_ms"]["max"] for r in of),
            "webhooks_per_s": _spread([r["webhooks_per_s"] for r in of]),
            "e2e_records_per_s": _spread([r["e2e_records_per_s"] for r in of]),
            "worker_peak_rss_mb": max((r["worker_peak_rss_mb"] or 0) for r in of) or None,
            "grown_rows": first.get("grown_rows", 0),
        }
        if all("floor_ratio" in r for r in of):
            entry["floor_ratio"] = _spread([r["floor_ratio"] for r in of])
        if first["kind"] == "everyday":
            entry["keep_up"] = _spread(
                [r["e2e_records_per_s"] / r["acked_records_per_s"] for r in of]
            )
        entries.append(entry)
    return entries


# The issue's targets (2 cores, everything on them), judged as summary() reports: on the medians,
# with the answers at or over 1 s summed over every run.
TARGET_BURST_PAYLOADS = 200  # of 5000 records: the bursts the targets are set for
RATIO_MIN = 0.5  # bursts end to end, 2 workers, x the keyed COPY floor
P99_MAX_MS = {"burst-16": 150.0, "burst-64": 300.0}
EVERYDAY_MIN_PER_S = 3000.0
EVERYDAY_P99_BELOW_MS = 100.0
KEEP_UP_MIN = 0.9
GROWN_MIN = 0.8  # a burst into the grown table, x the same burst into a fresh table


def targets(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target the run's scenarios can judge: what is asked, what the run did, and whether
    that meets it (None: only reported)."""
    by_name = {r["name"]: r for r in entries}
    found: list[dict[str, Any]] = []

    def add(target: str, asked: str, measured: str, met: bool | None) -> None:
        found.append({"target": target, "asked": asked, "measured": measured, "met": met})

    bursts = [by_name[n] for n in ("burst-16", "burst-64") if "floor_ratio" in by_name.get(n, {})]
    if bursts:
        add(
            "bursts end to end, 2 workers",
            f"{RATIO_MIN} x floor",
            # Three decimals: a median of 0.497 is short of 0.5, which 0.50 would hide.
            ", ".join(
                f"{shown(r['floor_ratio'], '.3f')} at {r['name'].removeprefix('burst-')}"
                for r in bursts
            ),
            all(r["floor_ratio"]["median"] >= RATIO_MIN for r in bursts),
        )
    for name, limit in P99_MAX_MS.items():
        if name in by_name:
            p99 = by_name[name]["p99_ms"]
            add(
                f"ack p99, {name.removeprefix('burst-')} in flight",
                f"{limit:.0f} ms",
                f"{shown(p99, '.1f')} ms",
                p99["median"] <= limit,
            )
    grown, fresh = by_name.get("grown-16"), by_name.get("burst-16")
    if grown is not None and fresh is not None:
        ratio = grown["e2e_records_per_s"]["median"] / fresh["e2e_records_per_s"]["median"]
        add(
            f"burst into a table of {grown['grown_rows']:,} rows",
            f"{GROWN_MIN} x the fresh table's rate",
            f"{ratio:.2f} x ({shown(grown['e2e_records_per_s'])} against "
            f"{shown(fresh['e2e_records_per_s'])} records/s)",
            ratio >= GROWN_MIN,
        )
    pipeline = [r for r in entries if r["design"] == "pipeline"]
    if pipeline:
        late = sum(r["answers_over_1s"] for r in pipeline)
        add("answers at or over 1 s (pipeline)", "none", str(late), late == 0)
    everyday = by_name.get("everyday-64")
    if everyday is not None:
        rate, p99 = everyday["webhooks_per_s"], everyday["p99_ms"]
        add(
            "everyday traffic",
            f"{EVERYDAY_MIN_PER_S:,.0f} webhooks/s, p99 under {EVERYDAY_P99_BELOW_MS:.0f} ms",
            f"{shown(rate)} webhooks/s, p99 {shown(p99, '.1f')} ms",
            rate["median"] >= EVERYDAY_MIN_PER_S and p99["median"] < EVERYDAY_P99_BELOW_MS,
        )
        add(
            "workers keep up (everyday)",
            f"{KEEP_UP_MIN} x acknowledged",
            f"{shown(everyday['keep_up'], '.2f')} x",
            everyday["keep_up"]["median"] >= KEEP_UP_MIN,
        )
    memory = [r["worker_peak_rss_mb"] for r in pipeline if r["worker_peak_rss_mb"]]
    if memory:
        add(
            "worker peak memory",
            "bounded: follows the prefetch",
            f"{max(memory):.0f} MiB at most",
            None,
        )
    scaled = _scaling(by_name)
    if len(scaled) > 1:
        add(
            f"scaling, {' / '.join(str(n) for n, _ in scaled)} workers",
            "reported",
            " / ".join(f"{r['floor_ratio']['median']:.2f}" for _, r in scaled) + " x floor",
            None,
        )
    return found


def _scaling(by_name: dict[str, dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(workers, entry) of the bursts at 16 in flight with 1, 2 and 4 workers that ran."""
    return [
        (n, by_name[name])
        for n, name in ((1, "scale-1-worker"), (2, "burst-16"), (4, "scale-4-workers"))
        if "floor_ratio" in by_name.get(name, {})
    ]


VERDICT = {True: "met", False: "not met", None: "reported"}


def target_line(target: dict[str, Any]) -> str:
    """A target's progress line."""
    if target["met"] is None:
        return f"{target['target']}: {target['measured']} (reported)"
    return (
        f"{target['target']}: {target['measured']} (asked {target['asked']}): "
        + VERDICT[target["met"]]
    )


def shown(spread: dict[str, float], form: str = ",.0f") -> str:
    """The median, and the range when there were several runs."""
    median = format(spread["median"], form)
    if spread["min"] == spread["max"]:
        return median
    return f"{median} ({format(spread['min'], form)}-{format(spread['max'], form)})"


def markdown(document: dict[str, Any]) -> str:
    """The table the README shows."""
    floor = document["floor"]
    repeat = document["config"].get("repeat", 1)
    lines = [
        "| scenario | design | workers | webhooks | not 200 | ack p50 / p99 / max (ms) "
        "| answers >= 1 s | webhooks/s | end-to-end records/s | x floor | worker peak RSS (MiB) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in document["summary"]:
        ratio = shown(r["floor_ratio"], ".2f") if "floor_ratio" in r else "-"
        rss = f"{r['worker_peak_rss_mb']:.0f}" if r["worker_peak_rss_mb"] else "-"
        e2e = shown(r["e2e_records_per_s"])
        if r["kind"] == "everyday":
            e2e = f"{e2e}, {r['keep_up']['median']:.2f} x acked"
        lines.append(
            f"| {LABELS.get(r['name'], r['name'])} | {r['design']} | {r['workers'] or '-'} "
            f"| {_n(r['accepted']['median'])} | {r['not_200']} "
            f"| {r['p50_ms']['median']:.0f} / {shown(r['p99_ms'], '.0f')} / {r['max_ms']:.0f} "
            f"| {r['answers_over_1s']} | {shown(r['webhooks_per_s'])} "
            f"| {e2e} | {ratio} | {rss} |"
        )
    if repeat > 1:
        lines += [
            "",
            f"Each scenario ran {repeat} times ({repeat} rounds of all of them): the median, and "
            "in brackets the lowest and highest; `not 200` and `answers >= 1 s` are summed over "
            "the runs, the max latency and the peak memory are the highest of them.",
        ]
    judged = document.get("targets") or []
    if judged:
        lines += [
            "",
            "Against the targets (judged on the medians; answers at or over 1 s summed over "
            "every run):",
            "",
            "| target | asked | this run | |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {t['target']} | {t['asked']} | {t['measured']} "
            f"| {'**not met**' if t['met'] is False else VERDICT[t['met']]} |"
            for t in judged
        ]
    m = document["machine"]
    config = document["config"]
    lines += [
        "",
        "x floor: end-to-end records/s over the keyed COPY floor (the same rows COPY'd by one "
        "connection into a table with the same primary key) measured right before and right "
        "after that burst, the faster of the two. Floor measurements in this run: "
        + ", ".join(_n(m["records_per_s"]) for m in floor["measurements"])
        + f" records/s ({_n(floor['records'])} records each).",
        f"Bursts: {config['payloads_per_burst']} payloads of {config['records_per_payload']} "
        f"records ({config['mean_payload_bytes'] / 1e6:.1f} MB each) from {config['shops']} shops, "
        f"creates then updates of the same customers; receivers: {config['receivers']}. "
        "Answers other than 200 (503: the broker did not confirm within PUBLISH_TIMEOUT) are "
        "sent again 1 s later and count in the latencies.",
        f"Machine: {m['cores']} x {m['cpu_model']}, {m['ram_gib']} GiB RAM, Python {m['python']}, "
        f"PostgreSQL {m['postgres']}, RabbitMQ {m['rabbitmq']}; all processes on these cores "
        f"(load average at start {m['load_average_at_start'][0]}). `{document['command']}`, "
        f"{document['started']}, {m['git']}.",
    ]
    return "\n".join(lines) + "\n"


def chart(document: dict[str, Any], path: Path) -> None:
    """Throughput against the floor, ack latency, and worker scaling."""
    import matplotlib  # only needed when writing the chart

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = document["summary"]  # medians, with the range of the runs as error bars
    by_name = {r["name"]: r for r in entries}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))

    def medians(of: list[dict[str, Any]], key: str) -> tuple[list[float], list[list[float]]]:
        values = [r[key]["median"] for r in of]
        below = [r[key]["median"] - r[key]["min"] for r in of]
        above = [r[key]["max"] - r[key]["median"] for r in of]
        return values, [below, above]

    def color(r: dict[str, Any]) -> str:
        return "tab:blue" if r["design"] == "pipeline" else "tab:gray"

    bursts = [r for r in entries if "floor_ratio" in r and not r["name"].startswith("scale-")]
    values, errors = medians(bursts, "floor_ratio")
    axes[0].bar([r["name"] for r in bursts], values, yerr=errors, color=[color(r) for r in bursts])
    axes[0].axhline(1.0, color="tab:red", linestyle="--", label="keyed COPY floor")
    axes[0].axhline(0.5, color="tab:red", linestyle=":", label="0.5 x floor")
    axes[0].bar([0], [0], color="tab:blue", label="pipeline (queue)")
    axes[0].bar([0], [0], color="tab:gray", label="naive (upsert, then answer)")
    axes[0].set_title("Bursts: end-to-end records/s, x keyed COPY floor")
    axes[0].set_ylim(0, 1.1)
    axes[0].legend(fontsize=8)
    axes[0].tick_params(axis="x", labelrotation=20, labelsize=8)

    values, errors = medians(entries, "p99_ms")
    axes[1].bar(
        [r["name"] for r in entries],
        [max(v, 0.1) for v in values],
        yerr=errors,
        color=[color(r) for r in entries],
    )
    axes[1].axhline(1000, color="tab:red", linestyle="--", label="Upgates' 1 s timeout")
    axes[1].set_yscale("log")
    axes[1].set_title("Ack latency p99 (ms, log)")
    axes[1].legend(fontsize=8)
    axes[1].tick_params(axis="x", labelrotation=35, labelsize=7)

    scaled = _scaling(by_name)
    values, errors = medians([r for _, r in scaled], "floor_ratio")
    axes[2].errorbar([n for n, _ in scaled], values, yerr=errors, marker="o", label="pipeline")
    axes[2].axhline(1.0, color="tab:red", linestyle="--", label="keyed COPY floor")
    axes[2].axhline(0.5, color="tab:red", linestyle=":", label="0.5 x floor")
    axes[2].set_ylim(0, 1.1)
    axes[2].set_xticks([1, 2, 4])
    axes[2].set_xlabel("workers")
    axes[2].set_title("Scaling: burst records/s, x floor (16 concurrent)")
    axes[2].legend(fontsize=8)

    m = document["machine"]
    fig.suptitle(
        f"upgates-ingest, {m['cores']} cores ({m['cpu_model']}), Python {m['python']}, "
        f"PostgreSQL {m['postgres']}, RabbitMQ {m['rabbitmq']} - {document['started']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(document: dict[str, Any], out: Path, stem: str) -> None:
    """<out>/<stem>.json, .md and .png (by default bench/results/, which git ignores)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(document))
    chart(document, out / f"{stem}.png")
