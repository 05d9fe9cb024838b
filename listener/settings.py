"""Settings, read once from ``LISTENER_*`` environment variables and ``.env``.

Every component receives only its own slice (``FetchSettings``, ``LocalSettings`` ...), so a
module never reads the environment itself. Secrets are ``SecretStr``: their ``repr`` and
``str`` are masked, so logging a settings object never prints a password.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MB = 1024 * 1024


class RateLimit(BaseModel):
    """Limits of one provider, shared by every task of one daemon.

    Attributes:
        rps: sustained requests per second (token refill rate); ``inf`` for no limit.
        burst: bucket capacity, the most requests allowed back to back.
        concurrency: the most calls in flight at once.
    """

    rps: float = math.inf
    burst: int = 1
    concurrency: int = 1000


def _default_rate_limits() -> dict[str, RateLimit]:
    return {
        "local": RateLimit(rps=math.inf, burst=1, concurrency=8),
        "noop": RateLimit(rps=math.inf, burst=1, concurrency=100_000),
    }


class FetchSettings(BaseModel):
    """How images are fetched from the URLs in users' rows.

    Attributes:
        max_bytes: the largest image accepted, in bytes, enforced while streaming.
        connect_timeout_s: TCP connect timeout, seconds.
        read_timeout_s: the longest wait for the next chunk of the body, seconds.
        total_timeout_s: the longest a whole fetch may take, seconds.
        max_redirects: redirects followed, each one checked like the first URL.
        allow_file_urls: accept ``file://`` URLs and absolute paths (off by default).
        allowed_hosts: host names, IP addresses or CIDR networks that may be fetched even
            though they resolve to loopback/private/link-local addresses (self-hosted storage).
        max_pixels: Pillow's decompression-bomb limit, in pixels.
    """

    max_bytes: int = 20 * MB
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0
    total_timeout_s: float = 60.0
    max_redirects: int = 5
    allow_file_urls: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)
    max_pixels: int = 64_000_000


class LocalSettings(BaseModel):
    """The offline ``local`` provider.

    Attributes:
        workers: processes in the analysis pool; ``None`` means one per CPU.
        analysis_max_side: images are downscaled to this longest side (pixels) before the
            blur, exposure and face measurements, so scores do not depend on resolution.
    """

    workers: int | None = None
    analysis_max_side: int = 1024


class Settings(BaseSettings):
    """All of listener's settings.

    Environment variables are ``LISTENER_`` plus the field name in capitals; nested fields use
    ``__`` (``LISTENER_FETCH__MAX_BYTES``); dicts and lists are JSON
    (``LISTENER_RATE_LIMITS='{"local": {"rps": 5, "burst": 5, "concurrency": 2}}'``).
    """

    model_config = SettingsConfigDict(
        env_prefix="LISTENER_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
    )

    database_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("LISTENER_DATABASE_URL", "DATABASE_URL", "database_url"),
    )
    listen_database_url: SecretStr | None = Field(
        default=None,
        description="DSN of the dedicated LISTEN connection; defaults to database_url. Set it "
        "when database_url goes through a transaction-mode pooler, which cannot LISTEN.",
    )
    pool_min_size: int = 2
    pool_max_size: int = 10

    worker_id: str | None = None
    concurrency: int = Field(default=10, ge=1)
    prefetch: int | None = Field(
        default=None,
        ge=0,
        description="Jobs claimed ahead of free slots so the next job starts without a "
        "database round trip; default: the concurrency.",
    )
    lease_s: float = Field(default=30.0, gt=0)
    poll_interval_s: float = Field(default=2.0, gt=0)
    probe_interval_s: float = Field(default=5.0, gt=0)
    reconnect_base_s: float = 0.25
    reconnect_cap_s: float = 10.0
    max_attempts: int = Field(default=5, ge=1)
    backoff_base_s: float = Field(default=5.0, ge=0)
    backoff_cap_s: float = Field(default=600.0, ge=0)
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    flush_interval_s: float = Field(default=0.002, gt=0)

    health_host: str = "0.0.0.0"
    health_port: int = 8080

    pipeline: Literal["local", "noop"] = "local"
    noop_delay_s: float = Field(default=0.0, ge=0)
    rate_limits: dict[str, RateLimit] = Field(default_factory=_default_rate_limits)

    fetch: FetchSettings = Field(default_factory=FetchSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)

    backfill_priority: int = 100
    backfill_chunk_size: int = Field(default=5000, ge=1)

    log_json: bool = False
    log_level: str = "INFO"

    @field_validator("rate_limits")
    @classmethod
    def _keep_defaults(cls, value: dict[str, RateLimit]) -> dict[str, RateLimit]:
        merged = _default_rate_limits()
        merged.update(value)
        return merged

    def dsn(self) -> str:
        """The database DSN.

        Raises:
            ValueError: neither ``LISTENER_DATABASE_URL`` nor ``DATABASE_URL`` is set.
        """
        if self.database_url is None:
            raise ValueError(
                "no database: set LISTENER_DATABASE_URL or DATABASE_URL "
                "(for example postgresql://user:password@localhost:5432/app)"
            )
        return self.database_url.get_secret_value()

    def listen_dsn(self) -> str:
        """The DSN of the dedicated LISTEN connection (``listen_database_url`` or ``dsn()``)."""
        if self.listen_database_url is not None:
            return self.listen_database_url.get_secret_value()
        return self.dsn()

    def prefetch_jobs(self) -> int:
        """Jobs claimed ahead of free slots: ``prefetch``, or ``concurrency`` when unset."""
        return self.concurrency if self.prefetch is None else self.prefetch

    def rate_limit(self, provider: str) -> RateLimit:
        """The limits of ``provider``; unlimited when none are configured."""
        return self.rate_limits.get(provider, RateLimit())
