"""The job as the worker sees it, and the outcomes a run can have. Pure data, no I/O.

The queue core knows nothing of what it analyzes: a job names a source row and a URL, a
step's result is any object with the fields of ``StepRecord`` (the analysis side's
``StepResult`` has them), and its side effects are opaque payloads named by kinds the
analysis side defines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

JOB_STATUSES = ("pending", "processing", "complete", "failed", "cancelled", "batched")
"""Every status a job can have, in lifecycle order."""


class Digest(Protocol):
    """What a step's input was, as the results table keeps it, so that a later job with the
    same input may reuse the result (the analysis side defines it and finds such results).

    Attributes:
        exact: a cryptographic digest of the input bytes (32 bytes).
        near: a 64-bit similarity hash of the input as a signed integer, when known.
    """

    @property
    def exact(self) -> bytes: ...
    @property
    def near(self) -> int | None: ...


class Copy(Protocol):
    """Marks a step result copied from another job's instead of paid for again.

    Attributes:
        origin_job_id: the job whose paid result was copied (the original, never a copy).
        kind: how the input matched, a name the analysis side defines (stored as text).
        saved_usd: what the original cost, USD: what this copy did not pay.
    """

    @property
    def origin_job_id(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def saved_usd(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Leftover:
    """A record an effect left outside the database (in an external service's container),
    which must be removed there once its source row is deleted.

    Attributes:
        container: where it lives at the external service.
        ref_id: its id there.
    """

    container: str
    ref_id: str


class EffectKind(Protocol):
    """One kind of step effect, named by its key in ``StepRecord.effects``.

    The analysis side defines the kinds and the wiring hands them to the store; the core
    only checks that a record names known kinds and passes the payloads on, uninterpreted.
    """

    def check(self, payload: Any) -> None:
        """Refuse a malformed payload.

        Raises:
            ValueError: what is wrong with it.
        """
        ...

    def leftovers(self, payload: Any) -> Sequence[Leftover]:
        """The external records the effect leaves behind (see ``Leftover``)."""
        ...


def check_effects(record: StepRecord, kinds: Mapping[str, EffectKind]) -> None:
    """Refuse a step whose effects are not among ``kinds``, or malformed.

    Raises:
        ValueError: ``record.effects`` has a key outside ``kinds``, or a kind refuses its
            payload.
    """
    unknown = set(record.effects) - set(kinds)
    if unknown:
        raise ValueError(f"unknown step effects: {', '.join(sorted(unknown))}")
    for name, payload in record.effects.items():
        kinds[name].check(payload)


class StepRecord(Protocol):
    """What the store keeps of one finished step (one row of ``listener.results``).

    Attributes:
        provider: who ran it, e.g. ``"local"``.
        step: the step's name, unique within a job, e.g. ``"local.analysis"``.
        output: JSON-serializable output.
        model: the model or algorithm version, if any.
        duration_s: wall time, seconds.
        input_tokens, output_tokens: tokens billed, if token-priced.
        calls: billable calls made.
        cost_usd: what the step cost, USD.
        effects: side effects of the step as opaque, named payloads (``{}`` for none),
            written by the store in the same fenced transaction that records the step: a
            lost lease writes neither. Each key names an ``EffectKind`` the store was given
            (the analysis side's, ``listener.analysis.effects``); a store raises
            ``ValueError`` for any other. The Postgres store hands each payload to the
            kind's writer inside that transaction (``listener.queue.pg_store.EffectWriter``),
            which may add to the output stored; the memory store only keeps the payloads
            (``MemoryJobStore.effects``).
        digest: what the step's input was (``None``: not known), stored with the result so
            that a later job with the same input may reuse it (the analysis side's
            ``DedupStore``).
        reused: set when the result is a copy of another job's (cost 0, no calls, no
            tokens); only ``save_step`` stores such a record.
    """

    @property
    def provider(self) -> str: ...
    @property
    def step(self) -> str: ...
    @property
    def output(self) -> Mapping[str, Any]: ...
    @property
    def model(self) -> str | None: ...
    @property
    def duration_s(self) -> float: ...
    @property
    def input_tokens(self) -> int | None: ...
    @property
    def output_tokens(self) -> int | None: ...
    @property
    def calls(self) -> int: ...
    @property
    def cost_usd(self) -> float: ...
    @property
    def effects(self) -> Mapping[str, Any]: ...
    @property
    def digest(self) -> Digest | None: ...
    @property
    def reused(self) -> Copy | None: ...


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed job: one row of ``listener.jobs`` that this worker holds a lease on.

    Attributes:
        id: ``listener.jobs.id``.
        source_table: the attached table, schema-qualified and quoted (``public.photos``).
        source_id: the source row's id, as text.
        image_url: the URL to analyze; ``None`` when the row's URL column is NULL.
        owner_id: the row's owner, as text, when the table was attached with an owner column.
        priority: lower runs first (0 fresh uploads, 100 backfill).
        attempts: attempts so far, this one included (1 on the first run).
        max_attempts: attempts allowed before the job is failed for good.
        lease_token: the claim's token; every write about the job is fenced by it.
        batch_mode: ``True``: its steps that a provider's batch API can run go through it;
            ``False``: never;
            ``None``: batched when it is low priority and automatic batching is on.
        done_steps: steps whose results are already stored (an earlier run, a batch): the
            run resumes after them. Read from the store at claim time, never guessed from
            ``attempts``.
        claims: how many times the job has been claimed, this claim included (never given
            back, unlike ``attempts``): above 1, an earlier run may have left external side
            effects behind.
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
    done_steps: tuple[str, ...] = ()
    claims: int = 1


@dataclass(frozen=True, slots=True)
class Completed:
    """The job ran to the end; ``results`` (not stored yet) are stored with its completion."""

    job: Job
    results: Sequence[StepRecord] = ()


@dataclass(frozen=True, slots=True)
class Retry:
    """The attempt failed and the job runs again after ``delay_s`` seconds (attempt used)."""

    job: Job
    error: str
    delay_s: float


@dataclass(frozen=True, slots=True)
class Snoozed:
    """The job could not run now for a reason not its own (budget spent, provider paused or
    rate limited): it runs again after ``delay_s`` seconds and the attempt is given back.

    ``held_by`` names the operator pause (a provider, ``"*"``) or ``"budget"`` that holds the
    job, if any: ``JobStore.resume`` wakes such jobs before their delay ends.
    """

    job: Job
    error: str
    delay_s: float
    held_by: str | None = None


@dataclass(frozen=True, slots=True)
class Discarded:
    """The job failed for good (dead letter): a permanent error or its attempts are used up."""

    job: Job
    error: str


@dataclass(frozen=True, slots=True)
class Parked:
    """The job's next step waits for a provider batch; the attempt is given back."""

    job: Job
    step: str


Failure = Retry | Snoozed | Discarded
"""What the retry policy decides for a failed attempt."""

Outcome = Completed | Retry | Snoozed | Discarded | Parked
"""What one run of a job ends with."""
