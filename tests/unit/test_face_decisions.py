"""Faces as data: decisions, ExternalImageIds, and the memory store's ``"faces"`` effect."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from listener.analysis.effects import effect_kinds
from listener.analysis.faces import FaceMatch, IndexedFace, decide, external_image_id
from listener.analysis.providers.base import StepResult
from listener.queue.memory_store import MemoryJobStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def faces_effect() -> dict[str, Any]:
    return {
        "collection_id": "listener-o",
        "faces": [
            {
                "face_id": "f1",
                "bounding_box": {"Width": 0.2, "Height": 0.3, "Left": 0.1, "Top": 0.1},
                "confidence": 99.9,
                "decision": "assigned",
                "matched_face_id": "f0",
                "similarity": 97.5,
            }
        ],
    }


def test_decide_uses_only_known_faces_from_other_images() -> None:
    faces = [IndexedFace("n1", {"Width": 0.1}, 99.0), IndexedFace("n2", {"Width": 0.2}, 98.0)]
    matches = {
        # the best match is unknown (an orphan of a crashed run): ignored
        "n1": [FaceMatch("orphan", 99.9), FaceMatch("k1", 96.0), FaceMatch("k2", 85.0)],
        # a face of the same image never counts, even when known
        "n2": [FaceMatch("n1", 99.0), FaceMatch("k2", 85.0)],
    }
    out = decide(faces, matches, {"k1", "k2", "n1"}, auto=95.0, suggest=80.0)
    assert [(d["face_id"], d["decision"], d["matched_face_id"]) for d in out] == [
        ("n1", "assigned", "k1"),
        ("n2", "suggested", "k2"),
    ]
    assert out[0]["similarity"] == 96.0 and out[0]["bounding_box"] == {"Width": 0.1}
    assert decide(faces, {}, set(), 95.0, 80.0)[1]["decision"] == "new"


def test_external_image_id_tells_tables_apart_and_fits_rekognition() -> None:
    ids = {
        external_image_id("public.images", "1"),
        external_image_id("public.photos", "1"),
        external_image_id('public."images.1"', "1"),
        external_image_id("public.images", "1.1"),
        external_image_id("public.images", "x" * 400),
    }
    assert len(ids) == 5
    assert external_image_id("public.images", "42") == "public.images.42"
    assert all(re.fullmatch(r"[a-zA-Z0-9_.\-:]{1,255}", i) for i in ids)


async def test_memory_store_keeps_the_faces_effect_with_the_step() -> None:
    store = MemoryJobStore(FakeClock(), effects=effect_kinds())
    job_id = await store.enqueue("public.images", "1", "http://x/a.jpg", "o")
    assert job_id is not None
    (job,) = await store.claim(1, "w", 30.0, uuid.uuid4())
    effect = faces_effect()
    result = StepResult(
        "rekognition", "rekognition.faces", {"faces": []}, effects={"faces": effect}
    )
    assert await store.save_step(job, result)
    assert store.effects(job_id) == {"rekognition.faces": {"faces": effect}}
    assert await store.outputs(job_id) == {"rekognition.faces": {"faces": []}}


async def test_memory_store_writes_no_effect_without_the_lease() -> None:
    store = MemoryJobStore(FakeClock(), effects=effect_kinds())
    job_id = await store.enqueue("public.images", "1", "http://x/a.jpg", "o")
    assert job_id is not None
    (job,) = await store.claim(1, "w", 30.0, uuid.uuid4())
    assert await store.release([job]) == {job_id}
    result = StepResult("rekognition", "rekognition.faces", effects={"faces": faces_effect()})
    assert not await store.save_step(job, result)
    assert store.effects(job_id) == {} and await store.outputs(job_id) == {}


async def test_memory_store_refuses_unknown_effects() -> None:
    store = MemoryJobStore(FakeClock(), effects=effect_kinds())
    await store.enqueue("public.images", "1", "http://x/a.jpg", "o")
    (job,) = await store.claim(1, "w", 30.0, uuid.uuid4())
    with pytest.raises(ValueError, match="unknown step effects: labels"):
        await store.save_step(job, StepResult("p", "p.s", effects={"labels": {}}))
    assert await store.outputs(job.id) == {}
