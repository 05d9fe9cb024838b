"""The job as the worker sees it, and the outcomes a run can have. Pure data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

from listener.providers.base import StepResult

JOB_STATUSES = ("pending", "processing", "complete", "failed", "cancelled", "batched")
"""Every status a job can have, in lifecycle order."""


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed job: one row of ``listener.jobs`` that this worker holds a lease on.

    Attributes:
        id: ``listener.jobs.id``.
        source_table: the attached table, schema-qualified and quoted (``public.images``).
        source_id: the source row's id, as text.
        image_url: the URL to analyze; ``None`` when the row's URL column is NULL.
        owner_id: the row's owner, as text, when the table was attached with an owner column.
        priority: lower runs first (0 fresh uploads, 100 backfill).
        attempts: attempts so far, this one included (1 on the first run).
        max_attempts: attempts allowed before the job is failed for good.
        lease_token: the claim's token; completions and heartbeats are fenced by it.
        batch_mode: ``True``: its OpenAI steps go through the Batch API; ``False``: never;
            ``None``: batched when it is low priority and automatic batching is on.
    """

    id: int
    source_table: str
    source_id: str
    image_url: str | None
    owner_id: str | None
    priority: int
    attempts: int
    max_attempts: int
    lease_token: UUID
    batch_mode: bool | None = None


@dataclass(frozen=True, slots=True)
class Completed:
    """The job ran to the end; ``results`` are stored with its completion."""

    job: Job
    results: list[StepResult] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Failed:
    """The attempt failed.

    Attributes:
        job: the job.
        error: the reason, stored in ``last_error``.
        retry_in_s: seconds until the job may run again; ``None`` fails it for good
            (dead letter).
        counts_attempt: ``False`` when the job was deferred (budget, paused provider): the
            attempt is given back.
    """

    job: Job
    error: str
    retry_in_s: float | None
    counts_attempt: bool = True


@dataclass(frozen=True, slots=True)
class Batched:
    """The job's next step waits for a provider batch; the attempt is given back."""

    job: Job
    step: str


Outcome = Completed | Failed | Batched
