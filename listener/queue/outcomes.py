"""The job as the worker sees it, and the outcomes a run can have. Pure data, no I/O.

The queue core knows nothing of images: a job names a source row and a URL, and a step's
result is any object with the fields of ``StepRecord`` (the analysis side's ``StepResult``
has them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

JOB_STATUSES = ("pending", "processing", "complete", "failed", "cancelled", "batched")
"""Every status a job can have, in lifecycle order."""

KNOWN_EFFECTS = frozenset({"faces"})
"""The step effects the stores know (see ``StepRecord.effects``)."""

REUSE_KINDS = ("sha256", "phash")
"""How a stored result can match another job's input (``Reuse.kind``)."""


@dataclass(frozen=True, slots=True)
class InputDigest:
    """What a step's input was, so a later job with the same input can reuse its result.

    Attributes:
        sha256: the SHA-256 of the input bytes (32 bytes).
        phash: a 64-bit perceptual hash of the input as a signed integer, when known
            (``listener.analysis.dedup.phash_int``), for near-duplicate matches.
    """

    sha256: bytes
    phash: int | None = None


@dataclass(frozen=True, slots=True)
class Reuse:
    """A step result copied from another job's instead of paid for again.

    Attributes:
        origin_job_id: the job whose paid result was copied (the original, never a copy).
        kind: ``"sha256"`` (identical input bytes) or ``"phash"`` (a near duplicate).
        saved_usd: what the original cost, USD: what this copy did not pay.
    """

    origin_job_id: int
    kind: str
    saved_usd: float


@dataclass(frozen=True, slots=True)
class Reusable:
    """A stored result another job may copy (``JobStore.find_reusable``).

    Attributes:
        provider, output, model: the stored result's.
        origin_job_id: the job that paid for it (for a copy: its origin).
        saved_usd: what that job paid for it, USD.
        kind: ``"sha256"`` or ``"phash"``, how it matched.
        distance: Hamming distance of the perceptual hashes (0 for ``"sha256"``).
    """

    provider: str
    output: Mapping[str, Any]
    model: str | None
    origin_job_id: int
    saved_usd: float
    kind: str
    distance: int = 0


def check_effects(record: StepRecord) -> None:
    """Refuse a step whose effects a store does not know, or a malformed reuse or digest.

    Raises:
        ValueError: ``record.effects`` has a key outside ``KNOWN_EFFECTS``;
            ``record.reused.kind`` is not one of ``REUSE_KINDS``; ``record.digest.sha256`` is
            not 32 bytes.
    """
    unknown = set(record.effects) - KNOWN_EFFECTS
    if unknown:
        raise ValueError(f"unknown step effects: {', '.join(sorted(unknown))}")
    if record.reused is not None and record.reused.kind not in REUSE_KINDS:
        raise ValueError(f"unknown reuse kind: {record.reused.kind!r}")
    if record.digest is not None and len(record.digest.sha256) != 32:
        raise ValueError(f"a SHA-256 digest has 32 bytes, not {len(record.digest.sha256)}")


class StepRecord(Protocol):
    """What the store keeps of one finished step (one row of ``listener.results``).

    Attributes:
        provider: who ran it, e.g. ``"openai"``.
        step: the step's name, unique within a job, e.g. ``"openai.tier1"``.
        output: JSON-serializable output.
        model: the model or algorithm version, if any.
        duration_s: wall time, seconds.
        input_tokens, output_tokens: tokens billed, if token-priced.
        calls: billable calls made.
        cost_usd: what the step cost, USD.
        effects: database side effects of the step, as data, written by the store in the
            same fenced transaction that records the step (``{}`` for none): a lost lease
            writes neither. Keys name the effect (``KNOWN_EFFECTS``); a store raises
            ``ValueError`` for any other. The one known:

            ``"faces"`` (the Rekognition faces step): ``{"collection_id": str, "faces":
            [{"face_id": str, "bounding_box": {"Width", "Height", "Left", "Top": ratios},
            "confidence": percent, "decision": "assigned" | "suggested" | "new",
            "matched_face_id": str | None, "similarity": percent | None}, ...]}``. The
            Postgres store inserts each face into ``listener.faces`` (source row and owner
            taken from the job), assigns ``"assigned"`` faces to the matched face's person
            (creating it; ``listener.assign_face``), records ``"suggested"`` ones in
            ``listener.face_suggestions``, and sets ``person_id`` (``None``: unassigned) on
            each entry of ``output["faces"]`` with the same ``face_id`` before storing the
            output. The memory store only keeps the effect (``MemoryJobStore.effects``).
        digest: what the step's input was (``None``: not known), stored with the result so
            that a later job with the same input may reuse it (``JobStore.find_reusable``).
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
    def digest(self) -> InputDigest | None: ...
    @property
    def reused(self) -> Reuse | None: ...


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
        lease_token: the claim's token; every write about the job is fenced by it.
        batch_mode: ``True``: its OpenAI steps go through the Batch API; ``False``: never;
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
class BatchJob:
    """A job taken into a provider batch (``JobStore.take_for_batch``): what its request needs.

    It holds no lease: every later write about it is fenced by ``(id, batch id, status
    'batched')`` instead.

    Attributes:
        id, source_table, source_id, image_url, owner_id: as in ``Job``.
        outputs: the job's stored step outputs by step name (earlier tiers), which the
            request's prompt builds on.
    """

    id: int
    source_table: str
    source_id: str
    image_url: str | None
    owner_id: str | None
    outputs: Mapping[str, Mapping[str, Any]]


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
    job, if any: ``JobStore.wake_held`` wakes such jobs before their delay ends.
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
