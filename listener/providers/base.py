"""The ``Provider`` protocol every analysis backend implements, and the shapes it trades in.

A provider receives one ``ImageInput`` (the fetched bytes plus the job's identity) and returns
one ``StepResult`` per analysis step it performed. It raises the errors of ``listener.errors``:
``RetryableError`` subclasses for failures that may pass, ``PermanentError`` subclasses for
failures that will not. Rate limiting, concurrency limits, retries and persistence are the
dispatcher's job, not the provider's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


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
    """

    job_id: int
    source_table: str
    source_id: str
    owner_id: str | None
    url: str
    data: bytes
    content_type: str


@dataclass(frozen=True, slots=True)
class StepResult:
    """The output of one analysis step, stored as one row of ``listener.results``.

    Attributes:
        provider: the provider's name, e.g. ``"local"``.
        step: the step's name, unique within a job, e.g. ``"local.analysis"``.
        output: JSON-serializable analysis output.
        model: the model or algorithm version that produced it, if any.
        duration_s: wall time of the step, in seconds.
    """

    provider: str
    step: str
    output: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    duration_s: float = 0.0


@runtime_checkable
class Provider(Protocol):
    """An analysis backend: ``name`` and ``needs_image`` may be plain class attributes."""

    @property
    def name(self) -> str:
        """A short stable name used in settings, rate limits, metrics and results."""
        ...

    @property
    def needs_image(self) -> bool:
        """``False`` when the provider does not look at the bytes (the fetch is skipped)."""
        ...

    async def start(self) -> None:
        """Acquire resources (process pools, HTTP clients). Called once before any analyze."""

    async def close(self) -> None:
        """Release what ``start`` acquired. Called once at shutdown."""

    async def analyze(self, image: ImageInput) -> list[StepResult]:
        """Analyze one image.

        Returns:
            One ``StepResult`` per step performed, possibly empty.

        Raises:
            listener.errors.RetryableError: a failure that may pass on retry.
            listener.errors.PermanentError: a failure that will not.
        """
        ...
