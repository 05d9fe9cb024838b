"""What the analysis side stores with a step besides its output: effects, digests, copies.

The queue core stores a step's side effects as opaque, named payloads (``StepRecord.effects``)
and only checks their names against the kinds it was given; this module defines those kinds
and interprets them:

- ``"faces"`` (the Rekognition faces step, ``FacesEffect``): ``{"collection_id": str,
  "faces": [{"face_id": str, "bounding_box": {"Width", "Height", "Left", "Top": ratios},
  "confidence": percent, "decision": "assigned" | "suggested" | "new", "matched_face_id":
  str | None, "similarity": percent | None}, ...]}``. In Postgres
  (``listener.analysis.face_store.PgFacesEffect``, the writer ``listener.app`` registers
  with ``PgJobStore``), inside the step's fenced transaction, each face is inserted into
  ``listener.faces`` (source row and owner taken from the job), ``"assigned"`` faces join
  the matched face's person (created then; ``listener.assign_face``), ``"suggested"`` ones
  are recorded in ``listener.face_suggestions``, and each entry of ``output["faces"]`` with
  the same ``face_id`` gets its ``person_id`` (``None``: unassigned) before the output is
  stored. The memory store only keeps the payload (``MemoryJobStore.effects``).

A step's ``digest`` (``InputDigest``: the image's SHA-256 and perceptual hash) and a copy's
``reused`` marker (``Reuse``: kind ``"sha256"`` or ``"phash"``) are stored with the result;
both refuse malformed values when built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from listener.queue.outcomes import EffectKind, Leftover

FACES = "faces"
"""The effect of the faces step (``FacesEffect``)."""

REUSE_KINDS = ("sha256", "phash")
"""How a stored result can match another job's input (``Reuse.kind``)."""


@dataclass(frozen=True, slots=True)
class InputDigest:
    """What a step's input was, so a later job with the same input can reuse its result.

    Attributes:
        sha256: the SHA-256 of the input bytes (32 bytes).
        phash: a 64-bit perceptual hash of the input as a signed integer, when known
            (``listener.analysis.dedup.phash_int``), for near-duplicate matches.

    Raises:
        ValueError: ``sha256`` is not 32 bytes.
    """

    sha256: bytes
    phash: int | None = None

    def __post_init__(self) -> None:
        if len(self.sha256) != 32:
            raise ValueError(f"a SHA-256 digest has 32 bytes, not {len(self.sha256)}")

    @property
    def exact(self) -> bytes:
        """The digest as the store keeps it (``listener.queue.outcomes.Digest``)."""
        return self.sha256

    @property
    def near(self) -> int | None:
        """The similarity hash as the store keeps it."""
        return self.phash


@dataclass(frozen=True, slots=True)
class Reuse:
    """A step result copied from another job's instead of paid for again.

    Attributes:
        origin_job_id: the job whose paid result was copied (the original, never a copy).
        kind: ``"sha256"`` (identical input bytes) or ``"phash"`` (a near duplicate).
        saved_usd: what the original cost, USD: what this copy did not pay.

    Raises:
        ValueError: ``kind`` is not one of ``REUSE_KINDS``.
    """

    origin_job_id: int
    kind: str
    saved_usd: float

    def __post_init__(self) -> None:
        if self.kind not in REUSE_KINDS:
            raise ValueError(f"unknown reuse kind: {self.kind!r}")


@dataclass(frozen=True, slots=True)
class Reusable:
    """A stored result another job may copy (``DedupStore.find_reusable``).

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


class FacesEffect:
    """The ``"faces"`` effect as any store sees it: checked, and the faces it leaves in their
    collection once its job is gone (``Leftover(collection_id, face_id)``)."""

    def check(self, payload: Any) -> None:
        """Raises: ValueError: the payload is not a mapping whose ``faces`` is a list."""
        if not isinstance(payload, Mapping):
            raise ValueError("the faces effect is a mapping")
        if not isinstance(payload.get("faces", []), list):
            raise ValueError("the faces effect's faces are a list")

    def leftovers(self, payload: Any) -> Sequence[Leftover]:
        """Each recorded face, in its collection."""
        return [Leftover(payload["collection_id"], f["face_id"]) for f in payload.get("faces", [])]


def effect_kinds() -> dict[str, EffectKind]:
    """The effect kinds, for a store that only keeps payloads (``MemoryJobStore``)."""
    return {FACES: FacesEffect()}
