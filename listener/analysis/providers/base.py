"""The ``Provider`` protocol every analysis backend implements, and the shapes it trades in.

A provider performs one or more *kinds* of step (``local``: ``analysis``; ``openai``:
``tier1``, ``tier2``, ``tier3``; ``rekognition``: ``labels``, ``faces``). For each step it
receives one ``ImageInput`` (the fetched bytes plus the job's identity) and a ``StepContext``
(the outputs of the job's earlier steps) and returns one ``StepResult``, or ``None`` when it
has nothing to record. It raises the errors of ``listener.errors``: ``RetryableError`` for
failures that may pass, ``PermanentError`` for failures that will not, ``Deferred`` when the
provider itself cannot be used for now. Rate limits, concurrency, retries, costs and
persistence are the dispatcher's job, not the provider's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from listener.analysis.effects import InputDigest, Reuse


@dataclass(frozen=True, slots=True)
class BatchOffer:
    """A provider's batch API, as the price table sees it.

    Attributes:
        provider: the provider's name (``Provider.name``).
        discount: the share of the realtime price a batch request costs (0.5: half).
        source: where the provider says so.
    """

    provider: str
    discount: float
    source: str


BATCH_BACKENDS: Mapping[str, BatchOffer] = {
    "openai": BatchOffer("openai", 0.5, "https://openai.com/api/pricing (Batch API)"),
}
"""Every provider with a batch backend (``BatchBackend``), by name, and at what discount. The
provider class reads its ``batch_discount`` from here, and the cost estimate its batch prices;
a provider not named here has no batch price (its steps always run per image).
``tests/unit/test_tiers_and_costs.py`` checks that the providers implementing ``BatchBackend``
are exactly these."""


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One image to analyze.

    Attributes:
        job_id: ``listener.jobs.id``.
        source_table: the attached table the row lives in, schema-qualified and quoted.
        source_id: the row's id, as text.
        owner_id: the row's owner (for example a user or vehicle id), or ``None``.
        url: the URL the bytes were fetched from.
        data: the image bytes (at most ``fetch_max_bytes``).
        content_type: the image format sniffed from the bytes by Pillow, e.g. ``"JPEG"``.
        width: width in pixels (0 when the bytes were not fetched).
        height: height in pixels (0 when the bytes were not fetched).
    """

    job_id: int
    source_table: str
    source_id: str
    owner_id: str | None
    url: str
    data: bytes
    content_type: str
    width: int = 0
    height: int = 0


@dataclass(frozen=True, slots=True)
class RateHints:
    """What a provider's answer said about its rate limits (e.g. ``x-ratelimit-*`` headers).

    Attributes:
        remaining_requests, remaining_tokens: what is left in the current window.
        reset_requests_s, reset_tokens_s: seconds until the window refills.
    """

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True, slots=True)
class StepResult:
    """The output of one analysis step, stored as one row of ``listener.results``.

    Attributes:
        provider: the provider's name, e.g. ``"local"``.
        step: the step's name, unique within a job, e.g. ``"local.analysis"``.
        output: JSON-serializable analysis output.
        model: the model or algorithm version that produced it, if any.
        duration_s: wall time of the step, in seconds.
        input_tokens, output_tokens: tokens billed, for token-priced providers.
        calls: billable API calls the step made (per-call-priced providers).
        cost_usd: what the step cost, filled in by the dispatcher from the price table.
        hints: rate-limit information from the provider's answer.
        effects: database side effects of the step, as data (``{"faces": ...}``), written by
            the job store in the same fenced transaction that stores the step; a provider
            never writes them itself.
        digest: the SHA-256 (and perceptual hash) of the image the step analyzed, set by the
            dispatcher, stored with the result for deduplication (``listener.analysis.dedup``).
        reused: set by the dispatcher when the result is a copy of another job's (``$0``).
    """

    provider: str
    step: str
    output: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    duration_s: float = 0.0
    input_tokens: int | None = None
    output_tokens: int | None = None
    calls: int = 0
    cost_usd: float = 0.0
    hints: RateHints | None = None
    effects: Mapping[str, Any] = field(default_factory=dict)
    digest: InputDigest | None = None
    reused: Reuse | None = None


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a step knows about the job besides the image.

    Attributes:
        step: the step's full name, ``provider.kind``.
        previous: outputs of the job's steps that already ran, by step name.
        claims: how many times the job has been claimed, this claim included
            (``listener.queue.outcomes.Job.claims``): above 1, an earlier run of this step
            may have left external side effects behind (faces indexed, never recorded) that
            the step cleans up before doing it again.
        lease_token: the claim's lease token (``Job.lease_token``), to fence what a step
            records before an external side effect (``FaceIntents.record``); ``None`` where
            no job store holds the job (a direct call).
    """

    step: str
    previous: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    claims: int = 1
    lease_token: UUID | None = None


@runtime_checkable
class Provider(Protocol):
    """An analysis backend: ``name`` and ``needs_image`` may be plain class attributes."""

    @property
    def name(self) -> str:
        """A short stable name used in settings, rate limits, prices, metrics and results."""
        ...

    @property
    def needs_image(self) -> bool:
        """``False`` when the provider does not look at the bytes (the fetch is skipped)."""
        ...

    async def start(self) -> None:
        """Acquire resources (process pools, HTTP clients). Called once before any run."""

    async def close(self) -> None:
        """Release what ``start`` acquired. Called once at shutdown."""

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        """Tokens a ``kind`` step on ``image`` is expected to use (0 if not token-priced)."""
        ...

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult | None:
        """Perform one step of kind ``kind`` on ``image``.

        Returns:
            The step's result, or ``None`` when there is nothing to record.

        Raises:
            listener.errors.RetryableError: a failure that may pass on retry.
            listener.errors.PermanentError: a failure that will not.
            listener.errors.Deferred: the provider cannot be used for now.
        """
        ...


@dataclass(frozen=True, slots=True)
class ProviderBatch:
    """A batch as the provider lists it (``BatchBackend.list_batches``).

    Attributes:
        id: the provider's batch id.
        status: the provider's status (``validating``, ``in_progress``, ``completed``...).
        created_at: when the provider created it, epoch seconds (the provider's clock).
        metadata: the metadata it was created with (``BatchBackend.create_batch``).
        input_file_id: its input file.
    """

    id: str
    status: str
    created_at: float
    metadata: Mapping[str, str]
    input_file_id: str | None = None


@runtime_checkable
class BatchBackend(Protocol):
    """A provider that can also run steps in bulk through a batch API (OpenAI's Batch API:
    https://platform.openai.com/docs/guides/batch), at the price table's price times
    ``batch_discount``. Generic code asks ``isinstance(provider, BatchBackend)``, never for a
    provider's name."""

    @property
    def name(self) -> str:
        """As ``Provider.name``."""
        ...

    @property
    def batch_discount(self) -> float:
        """The share of the realtime price a batch request costs (0.5: half)."""
        ...

    async def request_body(
        self, kind: str, image: ImageInput, previous: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """The body of one batch request for a ``kind`` step on ``image``."""
        ...

    def parse_body(self, kind: str, body: Mapping[str, Any]) -> StepResult:
        """The step result of one answered batch request.

        Raises:
            listener.errors.ListenerError: the answer cannot be used.
        """
        ...

    async def upload_batch_file(self, data: bytes, name: str) -> str:
        """Upload a JSONL file of requests named ``name``; returns its file id."""
        ...

    async def create_batch(
        self, input_file_id: str, metadata: Mapping[str, str]
    ) -> tuple[str, str]:
        """Create a batch over an uploaded file, carrying ``metadata`` (at most 16 pairs,
        keys up to 64 and values up to 512 characters); (batch id, status)."""
        ...

    def list_batches(self, since: float) -> AsyncIterator[ProviderBatch]:
        """The provider's batches, newest first, down to the first created before ``since``
        (epoch seconds), which ends the listing; a page at a time."""
        ...

    async def retrieve_batch(self, batch_id: str) -> dict[str, Any]:
        """A batch's state: ``status``, ``completed``, ``failed``, ``output_file_id``,
        ``error_file_id``, ``error``."""
        ...

    async def cancel_batch(self, batch_id: str) -> str:
        """Cancel a batch; returns its new status."""
        ...

    async def file_content(self, file_id: str) -> bytes:
        """The bytes of an output or error file."""
        ...


@runtime_checkable
class EffectUndo(Protocol):
    """A provider whose step effects exist outside the database too (Rekognition's indexed
    faces) and can be undone when the job store refuses the step (its lease was lost: the job
    was cancelled, its row deleted, or another worker took it), so nothing the store never
    recorded is left behind. Generic code asks ``isinstance(provider, EffectUndo)``."""

    async def undo(self, effects: Mapping[str, Any]) -> None:
        """Undo a refused step's ``effects`` (``StepResult.effects``) at the provider.

        Raises:
            listener.errors.ListenerError: the provider could not be reached; the caller
                logs it (what is left is swept when the job's row is deleted or the job runs
                again).
        """
        ...
