"""Settings, read once from ``LISTENER_*`` environment variables and ``.env``.

Every component receives only its own slice (``FetchSettings``, ``LocalSettings`` ...), so a
module never reads the environment itself. Secrets are ``SecretStr``: their ``repr`` and
``str`` are masked, so logging a settings object never prints a password.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    PositiveFloat,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from listener.redact import check_dsn

MB = 1024 * 1024

_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
"""A DNS host name, lowercased, without the trailing dot (labels of letters, digits, ``-``,
``_``; an IPv4 address matches too)."""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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

    @property
    def fleet_wide(self) -> bool:
        """True when the limit is finite, so daemons must share it through Postgres."""
        return not math.isinf(self.rps)


def _default_rate_limits() -> dict[str, RateLimit]:
    return {
        "local": RateLimit(rps=math.inf, burst=1, concurrency=8),
        "noop": RateLimit(rps=math.inf, burst=1, concurrency=100_000),
        # Conservative defaults for a new account; raise them to your tier's limits.
        "openai": RateLimit(rps=5.0, burst=1, concurrency=16),
        # Rekognition's default quota for the image APIs is 5 TPS in most regions.
        "rekognition": RateLimit(rps=5.0, burst=1, concurrency=16),
    }


def _default_step_timeouts() -> dict[str, float | None]:
    # Generous bounds that only a hang reaches: a local analysis takes about a second but may
    # wait for a free worker process; an OpenAI step covers the SDK's own retries of 60 s
    # requests; Rekognition calls are 30 s each. ``noop`` only sleeps ``noop_delay_s``.
    return {"local": 120.0, "openai": 180.0, "rekognition": 90.0, "noop": None}


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
        max_decode_bytes: the memory one decoded image may take, in bytes: an image whose
            width x height x bytes per pixel (RGB and RGBA 4, 16-bit RGBA PNG 8, gray 1) is
            over it is refused before decoding. A local analysis then holds at most this plus
            three 8-bit planes of width x height bytes (``listener.analysis.providers.local``).
    """

    max_bytes: int = 20 * MB
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0
    total_timeout_s: float = 60.0
    max_redirects: int = 5
    allow_file_urls: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)
    max_pixels: int = 64_000_000
    max_decode_bytes: int = Field(default=256 * MB, gt=0)


class LocalSettings(BaseModel):
    """The offline ``local`` provider.

    Attributes:
        workers: processes in the analysis pool; ``None`` means one per CPU.
        analysis_max_side: images are downscaled to this longest side (pixels) before the
            blur, exposure and contrast measurements, so scores do not depend on resolution.
        face_max_side: faces are detected (and, in the faces step, embedded) on a copy
            downscaled to this longest side (pixels). dlib's HOG detector finds faces of about
            80x80 pixels and larger in that copy: at 512, faces a sixth of the photo's longest
            side. Raising it helps only for photos larger than it; ``face_upsample`` helps
            for any.
        face_upsample: times the detector doubles that copy before it looks (0-2): each
            doubling finds faces half as small, at about four times the detection time.
        collection_prefix: the local faces step's collections are ``<prefix>-<owner>``;
            distinct from Rekognition's so the two never mix.
        auto_assign_similarity: the faces step: a face matching one of the owner's faces at or
            above this similarity (percent, ``local_faces.similarity_from_distance``) joins that
            face's person.
        suggest_similarity: at or above this (and below auto-assign), a suggestion is recorded
            for review; below it the face is a new, unassigned face.
        max_faces: faces embedded per image, the most confident first.
    """

    workers: int | None = None
    analysis_max_side: int = 1024
    face_max_side: int = Field(default=512, ge=80, le=4096)
    face_upsample: int = Field(default=0, ge=0, le=2)
    collection_prefix: str = "listener-local"
    auto_assign_similarity: float = Field(default=95.0, ge=0, le=100)
    suggest_similarity: float = Field(default=80.0, ge=0, le=100)
    max_faces: int = Field(default=10, ge=1, le=100)


DEFAULT_ANGLES = [
    "front",
    "rear",
    "side",
    "three-quarter",
    "interior",
    "engine bay",
    "undercarriage",
    "detail",
    "document",
    "other",
]


class OpenAISettings(BaseModel):
    """The OpenAI vision provider.

    Attributes:
        api_key: the API key (``LISTENER_OPENAI__API_KEY``; ``OPENAI_API_KEY`` also works).
        base_url: the API's base URL; point it at a compatible server or a local fake.
        tier1_model, tier2_model, tier3_model: the model of each tier.
        detail: image detail, ``low`` (85 tokens an image) or ``high`` (tiles of 512 px).
        image_transport: ``url`` sends the image URL (OpenAI fetches it; the URL must be
            public); ``inline`` sends the bytes as a base64 data URL.
        angles: the vocabulary of tier 1's ``angle``.
        subject: what the photos show, used in the prompts.
        timeout_s: per-request timeout, seconds.
        max_output_tokens: the answer's token limit per call.
        tokens_per_minute: the account's TPM limit, shared by the fleet; ``None`` for none.
        quota_pause_s: how long the provider pauses after ``insufficient_quota``, seconds.
    """

    api_key: SecretStr | None = None
    base_url: str = "https://api.openai.com/v1"
    tier1_model: str = "gpt-4o-mini"
    tier2_model: str = "gpt-4o-mini"
    tier3_model: str = "gpt-4o"
    detail: Literal["low", "high"] = "low"
    image_transport: Literal["url", "inline"] = "url"
    angles: list[str] = Field(default_factory=lambda: list(DEFAULT_ANGLES))
    subject: str = "vehicles"
    timeout_s: float = 60.0
    max_output_tokens: int = 800
    tokens_per_minute: int | None = None
    quota_pause_s: float = 900.0


class RekognitionSettings(BaseModel):
    """The AWS Rekognition provider. Credentials and region come from the standard AWS chain.

    Attributes:
        region: AWS region; ``None`` uses the chain's (``AWS_REGION``, config files).
        endpoint_url: a different endpoint (a local fake, a VPC endpoint).
        max_labels: labels asked of DetectLabels.
        min_confidence: the lowest label confidence kept, percent.
        collection_prefix: collection ids are ``<prefix>-<owner>``.
        auto_assign_similarity: a face matching a known face at or above this similarity
            (percent) joins that face's person automatically.
        suggest_similarity: at or above this (and below auto-assign), a suggestion is
            recorded for review; below it the face is a new, unassigned face.
        max_faces: faces indexed per image.
        timeout_s: connect and read timeout, seconds.
    """

    region: str | None = None
    endpoint_url: str | None = None
    max_labels: int = 20
    min_confidence: float = 70.0
    collection_prefix: str = "listener"
    auto_assign_similarity: float = 95.0
    suggest_similarity: float = 80.0
    max_faces: int = 10
    timeout_s: float = 30.0


class BatchSettings(BaseModel):
    """OpenAI's Batch API for bulk work, at half the realtime price.

    Attributes:
        auto: send the OpenAI steps of low-priority jobs (``priority >= min_priority``, i.e.
            backfills) to batches; ``listener backfill --batch`` marks jobs for it anyway.
        min_priority: the priority from which jobs are batched automatically.
        min_requests: a batch is submitted once this many steps wait...
        max_wait_s: ...or once the oldest has waited this long, seconds.
        poll_interval_s: seconds between checks of open batches.
        max_requests: requests per batch (the API's limit is 50,000).
        max_bytes: bytes per input file (the API's limit is 200 MB).
        abandon_after_s: a batch still being prepared (images fetched, file uploaded) with no
            heartbeat for this long, seconds, was left by a daemon that died: its jobs are
            handed back to wait for another batch. The preparing daemon beats every third of
            it, whatever a fetch or the upload takes. A daemon's claim to create a recorded
            batch at OpenAI lapses after it too (keep it above ``LISTENER_OPENAI__TIMEOUT_S``).
        fetch_concurrency: images fetched at once while a batch is prepared.
        sweep_interval_s: seconds between sweeps of OpenAI's recent batches (and the first
            at start), which adopt a batch listener made but did not record and cancel one
            it has no open batch for.
        prune_after_days: batches that never reached OpenAI (``empty``, ``abandoned``) are
            deleted this many days after they were closed; unset: kept.
    """

    auto: bool = True
    min_priority: int = 100
    min_requests: int = 20
    max_wait_s: float = 300.0
    poll_interval_s: float = 60.0
    max_requests: int = 50_000
    max_bytes: int = 200 * MB
    abandon_after_s: float = 120.0
    fetch_concurrency: int = Field(default=8, ge=1)
    sweep_interval_s: float = Field(default=600.0, gt=0)
    prune_after_days: float | None = Field(default=7.0, gt=0)


class TierSettings(BaseModel):
    """Which providers run at each tier of the ``tiered`` pipeline, and the gates between.

    Attributes:
        tier1: providers of tier 1 (``local``, ``rekognition``, ``openai``): angle,
            category, quality, labels.
        tier2: providers of tier 2 (``openai``): parts; runs only when the tier-1 quality
            exceeds ``tier2_min_quality``.
        tier3: providers of tier 3 (``openai``): expert assessment; runs only when the
            image's shorter side is at least ``tier3_min_side`` pixels.
        tier2_min_quality: the gate of tier 2, on OpenAI's tier-1 quality, else the local
            score (0-10).
        tier3_min_side: the gate of tier 3: the image's shorter side, pixels.
        faces: index faces and match them to the owner's people (per owner collections), in
            both the ``tiered`` and the ``local`` pipelines.
        faces_provider: who does it in the ``tiered`` pipeline: ``local`` (offline, dlib
            embeddings in Postgres) or ``rekognition`` (AWS). The ``local`` pipeline always
            uses ``local``.
    """

    tier1: list[str] = Field(default_factory=lambda: ["local"])
    tier2: list[str] = Field(default_factory=list)
    tier3: list[str] = Field(default_factory=list)
    tier2_min_quality: float = 6.0
    tier3_min_side: int = 1024
    faces: bool = False
    faces_provider: Literal["local", "rekognition"] = "rekognition"


class Price(BaseModel):
    """Price of one provider/model: per call, and per million input and output tokens (USD).

    Attributes:
        per_call_usd: USD per call.
        per_million_input_usd: USD per million input tokens.
        per_million_output_usd: USD per million output tokens.
    """

    per_call_usd: float = 0.0
    per_million_input_usd: float = 0.0
    per_million_output_usd: float = 0.0


def _default_prices() -> dict[str, Price]:
    # Sources: https://openai.com/api/pricing (standard tier, text tokens; image inputs are
    # billed as input tokens) and https://aws.amazon.com/rekognition/pricing/ (Image API,
    # group 1 and 2 APIs, first 1M images a month).
    return {
        "openai:gpt-4o-mini": Price(per_million_input_usd=0.15, per_million_output_usd=0.60),
        "openai:gpt-4o": Price(per_million_input_usd=2.50, per_million_output_usd=10.0),
        "openai:gpt-4.1-mini": Price(per_million_input_usd=0.40, per_million_output_usd=1.60),
        "rekognition": Price(per_call_usd=0.001),
    }


def _read_pipeline_file(path: Path) -> TierSettings:
    """The ``[tiers]`` table of the TOML file ``path`` (or the whole file).

    Raises:
        ValueError: the file cannot be read, is not TOML or its tiers do not validate; one
            line, naming LISTENER_PIPELINE_FILE and each problem.
    """
    where = f"LISTENER_PIPELINE_FILE={str(path)!r}"
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise ValueError(f"{where}: cannot read it ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{where}: not TOML ({error})") from None
    try:
        return TierSettings.model_validate(data.get("tiers", data))
    except ValidationError as error:
        problems = "; ".join(
            f"tiers.{'.'.join(str(p) for p in e['loc'])}={e['input']!r}: {e['msg']}"
            for e in error.errors(include_url=False)
        )
        raise ValueError(f"{where}: {problems}") from None


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
        description="The database (a DSN); LISTENER_DATABASE_URL wins over DATABASE_URL. A "
        "password with an unescaped /, ? or # is refused with a message that quotes no part "
        "of the URL (percent-encode them: %2F, %3F, %23).",
        validation_alias=AliasChoices("LISTENER_DATABASE_URL", "DATABASE_URL", "database_url"),
    )
    listen_database_url: SecretStr | None = Field(
        default=None,
        description="DSN of the dedicated LISTEN connection; defaults to database_url. Set it "
        "to a direct connection when database_url goes through a transaction-mode pooler, "
        "which cannot LISTEN (the daemon refuses to LISTEN through one).",
    )
    pooler: Literal["auto", "transaction", "none"] = Field(
        default="auto",
        description="What sits on database_url: 'transaction' (a transaction-mode pooler: "
        "PgBouncer pool_mode=transaction, Supabase on port 6543): no named prepared "
        "statements, LISTEN only on listen_database_url; 'none' (direct, or a session-mode "
        "pooler); 'auto' decides from port 6543, else by a probe (listener.db.connect).",
    )
    pool_min_size: int = Field(default=2, description="Fewest connections the pool keeps.")
    pool_max_size: int = Field(default=10, description="Most connections the pool opens.")

    worker_id: str | None = Field(
        default=None,
        description="This daemon's name in listener.jobs.worker_id and its logs; default: "
        "host:pid.",
    )
    concurrency: int = Field(default=10, ge=1, description="Jobs running at once per daemon.")
    prefetch: int | None = Field(
        default=None,
        ge=0,
        description="Jobs claimed ahead of free slots so the next job starts without a "
        "database round trip; default: the concurrency. While jobs finish faster than that "
        "per 50 ms, the buffer grows to what finishes in 50 ms (at most 1,000 jobs), so a "
        "backlog of quick jobs drains in fewer, larger claims; 0 turns both off.",
    )
    lease_s: float = Field(
        default=30.0,
        gt=0,
        description="Lease of a claimed job, seconds; renewed every third of it. A job whose "
        "lease expired goes back to pending.",
    )
    poll_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="Claim at least this often, seconds (jittered by 25% either way), when no "
        "NOTIFY comes; pauses are read at most once per interval.",
    )
    probe_interval_s: float = Field(
        default=5.0, gt=0, description="Seconds between liveness probes of the LISTEN connection."
    )
    reconnect_base_s: float = Field(
        default=0.25,
        description="First reconnect delay's upper bound of the LISTEN connection, seconds "
        "(full jitter, doubling).",
    )
    reconnect_cap_s: float = Field(
        default=10.0, description="Largest reconnect delay of the LISTEN connection, seconds."
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        description="Attempts before a job is failed; it holds for every job, enqueued by "
        "the triggers or by listener backfill alike (filled in at a job's first claim).",
    )
    backoff_base_s: float = Field(
        default=5.0,
        ge=0,
        description="First retry's upper bound, seconds (full-jitter exponential backoff, "
        "doubling; never sooner than a Retry-After).",
    )
    backoff_cap_s: float = Field(default=600.0, ge=0, description="Largest retry delay, seconds.")
    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0,
        description="Seconds running jobs get to finish on SIGTERM; the rest are handed back "
        "as pending.",
    )
    status_writeback_interval_s: float = Field(
        default=0.5,
        gt=0,
        description="Seconds between writes of job statuses to the status columns of tables "
        "attached with --status-column (also written at once after a wake-up).",
    )
    status_writeback_batch: int = Field(
        default=200,
        ge=1,
        description="Status rows written per short transaction (app rows stay locked for the "
        "length of one).",
    )
    status_writeback_lock_timeout_ms: int = Field(
        default=250,
        ge=1,
        description="Longest wait of the status write-back for a lock; keep it below the "
        "server's deadlock_timeout (1 s by default), so the write-back gives up first.",
    )
    deletes_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between clean-ups of rows the app deleted (their jobs, results "
        "and faces; also at once after the delete trigger's NOTIFY).",
    )
    deletes_batch: int = Field(
        default=100,
        ge=1,
        description="Deleted rows cleaned up per round trip.",
    )
    counts_rollup_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="Seconds between folds of the job counters' deltas into the counts "
        "(listener.roll_up_job_counts); readers add the deltas not folded yet, so this "
        "bounds how many they add up, not how exact they are.",
    )
    malloc_trim_interval_s: float = Field(
        default=60.0,
        ge=0,
        description="Seconds between returns of the C heap's free memory to the system "
        "(glibc's malloc_trim; nothing elsewhere), so freed memory does not keep the RSS "
        "growing under a steady load; 0: never.",
    )
    status_cache_s: float = Field(
        default=1.0,
        ge=1.0,
        description="Seconds the health server serves one computed /status document (and "
        "the status page) to every client, so page refreshes cannot load the database.",
    )

    webhook_url: SecretStr | None = Field(
        default=None,
        description="POST every terminal job event (complete, failed, cancelled) here, "
        "signed with webhook_secret (see Events and webhooks). A SecretStr: its query "
        "string may hold a token, so it is never logged whole.",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key of the X-Listener-Signature header; required with "
        "webhook_url.",
    )
    webhook_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds one webhook POST may take (connect, send, answer).",
    )
    webhook_interval_s: float = Field(
        default=0.5, gt=0, description="Seconds between looks for events due for delivery."
    )
    webhook_concurrency: int = Field(
        default=16,
        ge=1,
        description="Events claimed and POSTed at once by one daemon (one round, one "
        "connection each). A round waits for its slowest answer: at most this many events per "
        "answer time of the receiver (16 at 200 ms: 80 events/s).",
    )
    webhook_backoff_base_s: float = Field(
        default=1.0,
        ge=0,
        description="First redelivery's upper bound, seconds (full jitter, doubling).",
    )
    webhook_backoff_cap_s: float = Field(
        default=600.0, ge=0, description="Largest redelivery delay bound, seconds."
    )

    health_host: str = Field(
        default="127.0.0.1",
        description="Address the health server binds. The default keeps it on this machine; "
        "the container image sets 0.0.0.0 (set LISTENER_HEALTH_TOKEN then).",
    )
    health_port: int = Field(
        default=8080, description="Port of the health server (listener run --health-port)."
    )
    health_token: SecretStr | None = Field(
        default=None,
        description="Bearer token required by /, /status and /metrics (/healthz and /readyz "
        "stay open); unset or empty: no token.",
    )
    health_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names, besides localhost and IP addresses, by which clients may "
        "reach /, /status and /metrics when no token is set (a JSON list such as "
        '["listener", "listener.internal"], without ports). Any other Host header gets 403, '
        "so a web page cannot read the server by rebinding its own DNS name to this "
        "address. Unused when a token is set.",
    )
    health_max_connections: int = Field(
        default=64,
        ge=1,
        description="Connections the health server serves at once; beyond it a new "
        "connection evicts the oldest idle one, or is closed at once.",
    )
    health_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a health connection may take to complete a request, or stay "
        "idle between requests, before the server closes it.",
    )

    pipeline: Literal["local", "noop", "tiered"] = Field(
        default="local",
        description="local: offline analysis; noop: no analysis (benchmarks); tiered: the "
        "tiers below (LISTENER_TIERS__*, or LISTENER_PIPELINE_FILE).",
    )
    pipeline_file: Path | None = Field(
        default=None, description="A TOML file with a [tiers] table (see TierSettings)."
    )
    tiers: TierSettings = Field(default_factory=TierSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    rekognition: RekognitionSettings = Field(default_factory=RekognitionSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    prices: dict[str, Price] = Field(
        default_factory=_default_prices,
        description="Price per provider ('rekognition') or provider and model "
        "('openai:gpt-4o'), merged over the defaults (the providers' published list prices), "
        'e.g. {"openai:gpt-4o": {"per_million_input_usd": 2.5}}.',
    )
    budget_usd_per_day: float | None = Field(
        default=None,
        ge=0,
        description="Daily cap on paid providers, USD: once today's spend (UTC) reaches it "
        "their jobs wait until 00:00 UTC; unset: no cap.",
    )
    dedup: Literal["off", "sha256", "phash"] = Field(
        default="sha256",
        description="Before a paid step runs, reuse a stored result of the same step for an "
        "image with the same bytes (sha256), or also a near duplicate by perceptual hash "
        "(phash: needs the local step before the paid ones); off: every image is paid for.",
    )
    dedup_scope: Literal["owner", "table", "global"] = Field(
        default="owner",
        description="Whose results may be reused: the same attached table and owner (rows "
        "without an owner share one scope per table), the same table, or any.",
    )
    dedup_max_distance: int = Field(
        default=3,
        ge=0,
        le=3,
        description="Near-duplicate mode: the largest Hamming distance, in bits of the 64-bit "
        "perceptual hash, at which an image counts as a duplicate.",
    )
    noop_delay_s: float = Field(
        default=0.0, ge=0, description="Seconds the noop provider sleeps per job."
    )
    noop_failure_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of the noop provider's calls, 0 to 1, that fail as retryable "
        "(ProviderUnavailable), deterministically per job and claim: for soak tests and "
        "benchmarks of retries, never for production.",
    )
    rate_limits: dict[str, RateLimit] = Field(
        default_factory=_default_rate_limits,
        description="Per provider: rps, burst, concurrency, merged over the defaults. A "
        "finite rps is shared by every daemon on the database.",
    )
    step_timeouts: dict[str, PositiveFloat | None] = Field(
        default_factory=_default_step_timeouts,
        description="Seconds a step's provider call may take, per provider, merged over the "
        "defaults; null for no timeout. A step that runs past it fails as retryable.",
    )

    fetch: FetchSettings = Field(default_factory=FetchSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)

    backfill_priority: int = Field(
        default=100,
        description="Priority of backfilled and re-analyzed jobs (lower runs first; fresh "
        "uploads are 0).",
    )
    backfill_chunk_size: int = Field(default=5000, ge=1, description="Rows per backfill statement.")

    prune_after_days: float | None = Field(
        default=None,
        gt=0,
        description="Prune finished jobs of deleted rows this many days after they finished, "
        "as listener prune does, every prune_interval_s; unset: never.",
    )
    prune_interval_s: float = Field(
        default=3600.0, gt=0, description="Seconds between prunes (with prune_after_days)."
    )
    prune_batch: int = Field(default=500, ge=1, description="Jobs pruned per statement.")

    log_json: bool = Field(
        default=False, description="Log one flat JSON object per line (the image sets it)."
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR, CRITICAL.")
    strict_settings: bool = Field(
        default=False,
        description="Refuse to start (every command exits with status 2) when a LISTENER_* "
        "variable, in the environment or in .env, names no setting; off, each such name is "
        "a warning at start naming the closest setting (listener.cli.settings_check).",
    )
    otel: bool | None = Field(
        default=None,
        description="1 turns OpenTelemetry traces on, 0 off; unset, the standard OTEL_* "
        "variables decide. Needs pip install 'listener[otel]'.",
    )

    @field_validator("health_token", "webhook_url", "webhook_secret", mode="before")
    @classmethod
    def _blank_token_is_none(cls, value: object) -> object:
        # An empty LISTENER_HEALTH_TOKEN= in a .env must not become a token that "Bearer "
        # matches. No check here may raise: pydantic's error would echo the value.
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, SecretStr) and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("health_allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        # Lowercase, without the root's trailing dot: the form the health server compares
        # Host headers in. A port, scheme, path or wildcard would never match: say so now.
        names: list[str] = []
        for entry in value:
            name = entry.strip().lower().removesuffix(".")
            if not (_HOST_NAME.fullmatch(name) or _is_ip(name.strip("[]"))):
                raise ValueError(
                    f"LISTENER_HEALTH_ALLOWED_HOSTS: {entry!r} is not a host name (give names "
                    'such as "listener" or "listener.internal": no scheme, port, path or '
                    "wildcard; IP addresses are always allowed)"
                )
            names.append(name)
        return names

    def webhook_secret_value(self) -> str | None:
        """The webhook secret in clear, or None when none is set."""
        return self.webhook_secret.get_secret_value() if self.webhook_secret is not None else None

    def health_token_value(self) -> str | None:
        """The health token in clear, or None when none is set."""
        return self.health_token.get_secret_value() if self.health_token is not None else None

    @field_validator("prices")
    @classmethod
    def _keep_default_prices(cls, value: dict[str, Price]) -> dict[str, Price]:
        merged = _default_prices()
        merged.update(value)
        return merged

    @model_validator(mode="after")
    def _load_pipeline_file(self) -> Settings:
        if self.pipeline_file is not None:
            self.tiers = _read_pipeline_file(self.pipeline_file)
        if not self.openai.api_key and os.environ.get("OPENAI_API_KEY"):
            self.openai.api_key = SecretStr(os.environ["OPENAI_API_KEY"])
        return self

    @field_validator("rate_limits")
    @classmethod
    def _keep_defaults(cls, value: dict[str, RateLimit]) -> dict[str, RateLimit]:
        merged = _default_rate_limits()
        merged.update(value)
        return merged

    @field_validator("step_timeouts")
    @classmethod
    def _keep_default_timeouts(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        merged = _default_step_timeouts()
        merged.update(value)
        return merged

    def dsn(self) -> str:
        """The database DSN.

        Raises:
            ValueError: neither ``LISTENER_DATABASE_URL`` nor ``DATABASE_URL`` is set, or it
                does not parse (``listener.redact.check_dsn``: an unescaped ``/``, ``?`` or
                ``#`` in the password); the message never quotes the URL.
        """
        if self.database_url is None:
            raise ValueError(
                "no database: set LISTENER_DATABASE_URL or DATABASE_URL "
                "(for example postgresql://user:password@localhost:5432/app)"
            )
        return check_dsn(self.database_url.get_secret_value())

    def listen_dsn(self) -> str:
        """The DSN of the dedicated LISTEN connection (``listen_database_url`` or ``dsn()``).

        Raises:
            ValueError: as ``dsn()``.
        """
        if self.listen_database_url is not None:
            return check_dsn(self.listen_database_url.get_secret_value())
        return self.dsn()

    def prefetch_jobs(self) -> int:
        """Jobs claimed ahead of free slots: ``prefetch``, or ``concurrency`` when unset."""
        return self.concurrency if self.prefetch is None else self.prefetch

    def rate_limit(self, provider: str) -> RateLimit:
        """The limits of ``provider``; unlimited when none are configured."""
        return self.rate_limits.get(provider, RateLimit())

    def step_timeout(self, provider: str) -> float | None:
        """Seconds one step of ``provider`` may take; ``None`` (no timeout) when not set."""
        return self.step_timeouts.get(provider)
