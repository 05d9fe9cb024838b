"""Duplicate images are not paid twice: which steps may reuse a stored result, and how. Pure.

Before a paid step runs for a job, the dispatcher asks the dedup store
(``listener.analysis.dedup_store``) for a stored result of the
same step whose input had the same SHA-256 (``LISTENER_DEDUP=sha256``, the default) or, with
``phash``, also a perceptual hash within ``LISTENER_DEDUP_MAX_DISTANCE`` bits. A match is
stored as the job's result for that step through the same fenced ``save_step``, with cost 0,
no calls and no tokens, and a ``Reuse`` marker (origin job, kind, what the origin paid), so the
spend and the savings both stay exact.

What is never reused:

- steps of free providers (nothing to save: they run);
- ``rekognition.faces``: its result comes with per-row effects (each face indexed into the
  owner's collection and linked to this row and a person). A copied output would name face ids
  that belong to another row and leave this row with no face records, so the step always runs.

Scope (``LISTENER_DEDUP_SCOPE``): ``owner`` (default) reuses results of the same attached table
and owner (rows without an owner share one scope per table), ``table`` of the same table,
``global`` of any row. Results are derived from the bytes alone, so identical bytes give the
same analysis in any scope; the narrower default keeps one tenant's rows from carrying
results first produced (and paid) for another.

Known limits: two identical images analyzed at the same moment both pay (neither result is
stored yet when the other looks); results produced by the Batch API carry no digest, so they
are not reused (a job is still checked for reuse before it is handed to a batch); a change of
model or prompt does not invalidate stored results (set ``LISTENER_DEDUP=off`` while
re-analyzing after such a change).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from listener.analysis.effects import InputDigest, Reusable, Reuse
from listener.analysis.pipeline import Step
from listener.analysis.providers.base import StepResult

NEVER_REUSED = frozenset({"rekognition.faces"})
"""Steps whose results are never copied (their effects belong to one row)."""

PHASH_STEP = "local.analysis"
"""The step whose output holds the image's perceptual hash (``phash``, 16 hex digits)."""


@dataclass(frozen=True, slots=True)
class DedupPolicy:
    """The deduplication settings (``LISTENER_DEDUP``, ``_SCOPE``, ``_MAX_DISTANCE``).

    Attributes:
        mode: ``"sha256"`` (identical bytes) or ``"phash"`` (identical bytes, else a
            perceptual hash within ``max_distance`` bits); deduplication off is no policy.
        scope: ``"owner"``, ``"table"`` or ``"global"`` (see the module docstring).
        max_distance: bits, 0-3 (four 16-bit quarters of the hash are indexed: two hashes
            within 3 bits share one, which is how candidates are found).
    """

    mode: Literal["sha256", "phash"] = "sha256"
    scope: Literal["owner", "table", "global"] = "owner"
    max_distance: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance <= 3:
            raise ValueError(f"max_distance is 0 to 3 bits, not {self.max_distance}")

    @property
    def near(self) -> int | None:
        """The largest perceptual-hash distance to match, ``None`` for exact bytes only."""
        return self.max_distance if self.mode == "phash" else None


def sha256(data: bytes) -> bytes:
    """The SHA-256 digest of ``data`` (32 bytes; FIPS 180-4 through ``hashlib``)."""
    return hashlib.sha256(data).digest()


def phash_int(value: object) -> int | None:
    """A 64-bit perceptual hash given as 16 hex digits, as a signed integer (Postgres
    ``bigint``); ``None`` when ``value`` is not such a string."""
    if not isinstance(value, str) or len(value) != 16:
        return None
    try:
        unsigned = int(value, 16)
    except ValueError:
        return None
    return unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned


def digest_for(sha: bytes | None, outputs: Mapping[str, Mapping[str, Any]]) -> InputDigest | None:
    """The digest of a job's image: its SHA-256 and, once the local step's output holds one,
    its perceptual hash; ``None`` when the bytes were not fetched."""
    if sha is None:
        return None
    return InputDigest(sha, phash_int(outputs.get(PHASH_STEP, {}).get("phash")))


def reusable(step: Step, paid: bool) -> bool:
    """True when ``step`` may take a stored result instead of running: a paid step without
    per-row effects."""
    return paid and step.name not in NEVER_REUSED


def copy_of(step: Step, found: Reusable, digest: InputDigest) -> StepResult:
    """The job's result for ``step`` copied from ``found``: cost 0, no calls or tokens, and
    the reuse marker (origin job, kind, what the origin paid)."""
    return StepResult(
        provider=found.provider,
        step=step.name,
        output=dict(found.output),
        model=found.model,
        digest=digest,
        reused=Reuse(found.origin_job_id, found.kind, found.saved_usd),
    )
