"""One frozen settings object, read once from the environment by each entry point."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting is missing or has a value that cannot be used."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of both services; the README's configuration table lists the same."""

    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    database_url: str = "postgresql://postgres@localhost:5432/upgates"
    # Accepted tokens. Empty only when allow_no_token is set on purpose.
    webhook_tokens: tuple[str, ...] = ()
    # Optional tokens bound to one shop: (project_name, token). Such a token cannot write
    # another shop's customers (403).
    shop_tokens: tuple[tuple[str, str], ...] = ()
    allow_no_token: bool = False
    log_level: str = "INFO"
    log_format: str = "auto"  # auto: JSON lines unless stdout is a terminal

    # Receiver
    receiver_host: str = "0.0.0.0"  # noqa: S104 - a service in a container listens on all interfaces
    receiver_port: int = 8080
    # A full 5000-record payload is about 1 MB; 16 MiB leaves room for long fields.
    max_body_bytes: int = 16 * 1024 * 1024
    # Upgates gives up after 1 s and may count that as delivered: answer well before that.
    publish_timeout: float = 0.5
    # Past 1 s the sender has given up: reading on only holds a connection open.
    body_read_timeout: float = 1.0
    max_in_flight: int = 512
    # Processes serving the receiver's port together (SO_REUSEPORT): one saturates a core with
    # large bodies; more than the cores available buys nothing.
    receiver_processes: int = 1
    retry_after_seconds: int = 30  # Upgates itself retries after 5 minutes whatever this says
    # A connection must send its request headers within this (slowloris), and an idle
    # keep-alive connection is closed after keepalive_timeout.
    header_read_timeout: float = 5.0
    keepalive_timeout: float = 15.0
    # Body bytes all requests in flight may hold at once; beyond it a request gets a fast 503.
    max_body_bytes_in_flight: int = 256 * 1024 * 1024
    # /metrics of the receiver, on its own port so the Internet cannot read it; 0 disables.
    receiver_metrics_host: str = "127.0.0.1"
    receiver_metrics_port: int = 9101

    # Broker topology (both services must agree: they declare the same queue arguments)
    delivery_limit: int = 20
    queue_max_length: int = 0  # 0: no limit; else reject-publish beyond it (receiver answers 503)
    queue_max_bytes: int = 0

    # Worker
    # Messages a worker holds unacked. A full payload is half a batch, so 16 is eight batches
    # in hand; more only hoards: once the queue is empty, what each worker holds is what it
    # alone can do, while the others run dry. Small webhooks come many to a message, so 16
    # still fills a batch of them.
    prefetch: int = 16
    batch_max_records: int = 10_000
    batch_max_wait: float = 0.05
    retry_max_backoff: float = 10.0
    shutdown_grace: float = 20.0
    worker_host: str = "0.0.0.0"  # noqa: S104 - see receiver_host
    worker_port: int = 8081  # /healthz, /readyz, /metrics of a worker; 0 disables
    db_pool_size: int = 2
    # Worker processes of one `python -m worker`, sharing one health/metrics port.
    worker_processes: int = 1

    # Retention of personal data that could not be applied (applied hourly by the workers)
    rejected_retention_days: float = 30.0
    dead_letter_retention_days: float = 30.0
    retention_interval: float = 3600.0

    # The shops' REST API (upgates-admin webhooks / sync): (project_name, URL with credentials).
    upgates_api: tuple[tuple[str, str], ...] = ()
    # Where Upgates reaches the receiver, e.g. https://ingest.example.com (webhooks register).
    public_base_url: str = ""
    api_concurrency: int = 3  # Upgates refuses a 4th request at once (429)
    # Share of the hourly and daily quota left for the shop's other integrations.
    api_reserve: float = 0.2
    # A 429's Retry-After further away than this ends the run (it resumes next time).
    api_max_wait: float = 300.0
    # Incremental reads start this long before the last sync began: clock skew, whole seconds.
    sync_overlap: float = 300.0
    sync_host: str = "0.0.0.0"  # noqa: S104 - see receiver_host
    sync_port: int = 8082  # /healthz and /metrics of the sync service; 0 disables


# Environment variable -> field. Explicit, so the README table can be checked against it.
_ENV: dict[str, str] = {
    "AMQP_URL": "amqp_url",
    "DATABASE_URL": "database_url",
    "WEBHOOK_TOKEN": "webhook_tokens",
    "SHOP_TOKENS": "shop_tokens",
    "ALLOW_NO_TOKEN": "allow_no_token",
    "LOG_LEVEL": "log_level",
    "LOG_FORMAT": "log_format",
    "RECEIVER_HOST": "receiver_host",
    "RECEIVER_PORT": "receiver_port",
    "MAX_BODY_BYTES": "max_body_bytes",
    "PUBLISH_TIMEOUT": "publish_timeout",
    "BODY_READ_TIMEOUT": "body_read_timeout",
    "MAX_IN_FLIGHT": "max_in_flight",
    "RECEIVER_PROCESSES": "receiver_processes",
    "RETRY_AFTER_SECONDS": "retry_after_seconds",
    "DELIVERY_LIMIT": "delivery_limit",
    "QUEUE_MAX_LENGTH": "queue_max_length",
    "QUEUE_MAX_BYTES": "queue_max_bytes",
    "WORKER_PREFETCH": "prefetch",
    "BATCH_MAX_RECORDS": "batch_max_records",
    "BATCH_MAX_WAIT": "batch_max_wait",
    "RETRY_MAX_BACKOFF": "retry_max_backoff",
    "SHUTDOWN_GRACE": "shutdown_grace",
    "WORKER_HOST": "worker_host",
    "WORKER_PORT": "worker_port",
    "DB_POOL_SIZE": "db_pool_size",
    "REJECTED_RETENTION_DAYS": "rejected_retention_days",
    "DEAD_LETTER_RETENTION_DAYS": "dead_letter_retention_days",
    "RETENTION_INTERVAL": "retention_interval",
    "HEADER_READ_TIMEOUT": "header_read_timeout",
    "KEEPALIVE_TIMEOUT": "keepalive_timeout",
    "MAX_BODY_BYTES_IN_FLIGHT": "max_body_bytes_in_flight",
    "RECEIVER_METRICS_HOST": "receiver_metrics_host",
    "RECEIVER_METRICS_PORT": "receiver_metrics_port",
    "WORKER_PROCESSES": "worker_processes",
    "UPGATES_API": "upgates_api",
    "PUBLIC_BASE_URL": "public_base_url",
    "UPGATES_API_CONCURRENCY": "api_concurrency",
    "UPGATES_API_RESERVE": "api_reserve",
    "UPGATES_API_MAX_WAIT": "api_max_wait",
    "SYNC_OVERLAP": "sync_overlap",
    "SYNC_HOST": "sync_host",
    "SYNC_PORT": "sync_port",
}

ENV_VARS = tuple(_ENV)


def _parse(name: str, raw: str, default: object) -> object:
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise SettingsError(f"{name} must be true or false")
    if isinstance(default, tuple):
        # Several tokens, comma-separated, let an operator rotate without downtime.
        parts = tuple(part.strip() for part in raw.split(",") if part.strip())
        if name not in {"SHOP_TOKENS", "UPGATES_API"}:
            return parts
        pairs = []
        value = "URL" if name == "UPGATES_API" else "token"
        for part in parts:
            shop, sep, token = part.partition("=")
            if not sep or not shop.strip() or not token.strip():
                # Never echo the value: it holds secrets.
                raise SettingsError(f"{name} must be shop={value} pairs, comma-separated")
            pairs.append((shop.strip(), token.strip()))
        return tuple(pairs)
    try:
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number") from None
    return raw


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from the environment (or the given mapping) and check them."""
    environ = os.environ if environ is None else environ
    defaults = Settings()
    values: dict[str, object] = {}
    for name, field in _ENV.items():
        if name in environ:
            values[field] = _parse(name, environ[name], getattr(defaults, field))
    settings = Settings(**values)  # type: ignore[arg-type]  # built from the typed defaults above
    check_settings(settings)
    return settings


def check_settings(settings: Settings) -> None:
    """Refuse values that would break a promise, with a message naming the variable."""
    if settings.log_format not in {"auto", "json", "text"}:
        raise SettingsError("LOG_FORMAT must be auto, json or text")
    for field in fields(Settings):
        value = getattr(settings, field.name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise SettingsError(f"{field.name} must not be negative")
    if settings.max_body_bytes < 1024:
        raise SettingsError("MAX_BODY_BYTES must be at least 1024")
    if not 0 < settings.publish_timeout < 1:
        raise SettingsError("PUBLISH_TIMEOUT must be above 0 and below Upgates' 1 s timeout")
    if settings.receiver_processes < 1:
        raise SettingsError("RECEIVER_PROCESSES must be at least 1")
    if settings.prefetch < 1 or settings.batch_max_records < 1:
        raise SettingsError("WORKER_PREFETCH and BATCH_MAX_RECORDS must be at least 1")
    if settings.delivery_limit < 1:
        raise SettingsError("DELIVERY_LIMIT must be at least 1")
    for name, attribute in _ENV.items():
        if attribute in _POSITIVE and not getattr(settings, attribute) > 0:
            raise SettingsError(f"{name} must be above 0")
    for url in settings.amqp_url.split(","):
        if urlsplit(url.strip()).scheme not in {"amqp", "amqps"}:
            raise SettingsError("AMQP_URL must be amqp:// URLs, comma-separated for a cluster")
    if settings.receiver_metrics_port and settings.receiver_metrics_port == settings.receiver_port:
        raise SettingsError("RECEIVER_METRICS_PORT must differ from RECEIVER_PORT")
    if settings.db_pool_size < 2:
        # The retention run holds an advisory lock on one connection while it purges on another.
        raise SettingsError("DB_POOL_SIZE must be at least 2")
    if not 1 <= settings.api_concurrency <= 3:
        raise SettingsError("UPGATES_API_CONCURRENCY must be 1, 2 or 3 (Upgates allows 3 at once)")
    if not 0 <= settings.api_reserve < 1:
        raise SettingsError("UPGATES_API_RESERVE must be a share from 0 up to (not including) 1")
    shops = [shop for shop, _ in settings.upgates_api]
    if len(set(shops)) != len(shops):
        raise SettingsError("UPGATES_API names a shop twice")
    for shop, url in settings.upgates_api:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise SettingsError(f"UPGATES_API: the URL of shop {shop} is not an http(s) URL")
        if not parts.username or not parts.password:
            raise SettingsError(
                f"UPGATES_API: the URL of shop {shop} must carry login:key@ (HTTP Basic)"
            )
    if settings.public_base_url:
        parts = urlsplit(settings.public_base_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname or parts.query:
            raise SettingsError("PUBLIC_BASE_URL must be an absolute http(s) URL without a query")


# Settings where 0 would silently break the service (no timeout, a busy loop, no capacity).
_POSITIVE = {
    "retention_interval",
    "retry_max_backoff",
    "max_in_flight",
    "body_read_timeout",
    "header_read_timeout",
    "keepalive_timeout",
    "max_body_bytes_in_flight",
    "worker_processes",
    "api_max_wait",
    "rejected_retention_days",
    "dead_letter_retention_days",
}


def require_token(settings: Settings) -> None:
    """The receiver refuses to start open to anyone unless told so explicitly."""
    if not settings.webhook_tokens and not settings.shop_tokens and not settings.allow_no_token:
        raise SettingsError(
            "WEBHOOK_TOKEN is not set: refusing to accept webhooks from anyone. "
            "Set WEBHOOK_TOKEN (or SHOP_TOKENS), or ALLOW_NO_TOKEN=true for a closed test network."
        )
