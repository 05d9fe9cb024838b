"""Offline faces on real photographs of real people: one person matches across photographs,
two people do not, at the thresholds the faces step uses (95 % auto-assign, 80 % suggest).

The people are in ``listener/demo_images`` (sources and licences in its ``SOURCES.md``): three
different photographs of Barack Obama, one of Joe Biden, one of Eileen Collins. Each is also
used mirrored, at half size, darkened and turned by 20 degrees each way, the changes a user's
own photographs show. The rates are printed (``pytest -s``) and recorded in
``docs/explanations/offline-faces.md``.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from listener.analysis.providers.local import analyze_bytes, faces_bytes
from listener.analysis.providers.local_faces import (
    distance_for_similarity,
    similarity_from_distance,
)

DEMO = Path(__file__).resolve().parents[2] / "listener" / "demo_images"
PEOPLE = {
    "obama_1.jpg": "obama",
    "obama_2.jpg": "obama",
    "obama_3.jpg": "obama",
    "biden_1.jpg": "biden",
    "astronaut.png": "collins",
}
NO_FACE = ["brick.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "rocket.jpg"]
LIMITS = {"max_side": 512, "max_pixels": 64_000_000}


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def variants(name: str) -> dict[str, bytes]:
    """The photograph as shipped, and as a user's copy of it may differ."""
    rgb = np.asarray(Image.open(DEMO / name).convert("RGB"))
    height, width = rgb.shape[:2]
    turned = {
        f"turned {angle}": cv2.warpAffine(
            rgb,
            cv2.getRotationMatrix2D((width / 2, height / 3), angle, 1.0),
            (width, height),
            borderMode=cv2.BORDER_REFLECT,
        )
        for angle in (-20, 20)
    }
    return {
        "as shipped": (DEMO / name).read_bytes(),
        "mirrored": jpeg(np.ascontiguousarray(rgb[:, ::-1])),
        "half size": jpeg(cv2.resize(rgb, (width // 2, height // 2), interpolation=cv2.INTER_AREA)),
        "darkened": jpeg((rgb * 0.45).astype(np.uint8)),
        **{label: jpeg(pixels) for label, pixels in turned.items()},
    }


@pytest.fixture(scope="module")
def embeddings() -> dict[tuple[str, str], np.ndarray]:
    """(photo, variant) -> the one face's embedding.

    Every photograph as shipped has its face found. A changed copy may lose it only when the
    face falls under the detector's smallest size (about 80 px of the 512 px copy): at half
    size, the faces of obama_3 (36 px), biden_1 and the astronaut (43 px) are not found. The
    most confident face is the person's; the detector (dlib's default threshold) also finds a
    weak second "face" on the astronaut's suit in some copies, and it stays a weak one (under
    70 %).
    """
    found: dict[tuple[str, str], np.ndarray] = {}
    missed = []
    extra = []
    for name in PEOPLE:
        for label, data in variants(name).items():
            faces = faces_bytes(data, **LIMITS)["faces"]
            if not faces:
                missed.append((name, label))
                continue
            extra += [(name, label, f["confidence"]) for f in faces[1:]]
            assert len(faces[0]["embedding"]) == 128
            found[name, label] = np.asarray(faces[0]["embedding"])
    print(
        f"\nfaces found in {len(found)} of {len(found) + len(missed)} copies; missed {missed}; "
        f"weak extra detections {extra}"
    )
    assert missed and all(label == "half size" for _, label in missed), missed
    assert all(name == "astronaut.png" and confidence < 70.0 for name, _, confidence in extra)
    return found


def pairs(
    embeddings: dict[tuple[str, str], np.ndarray], same: bool
) -> list[tuple[float, str, str]]:
    """Similarities of pairs of two different photographs (any variants): of one person when
    ``same``, else of two people."""
    out = []
    for (a, va), (b, vb) in itertools.combinations(embeddings, 2):
        if a == b or (PEOPLE[a] == PEOPLE[b]) != same:
            continue
        distance = float(np.linalg.norm(embeddings[a, va] - embeddings[b, vb]))
        out.append((similarity_from_distance(distance), f"{a} {va}", f"{b} {vb}"))
    return sorted(out)


def test_one_person_matches_across_photographs(
    embeddings: dict[tuple[str, str], np.ndarray],
) -> None:
    same = pairs(embeddings, same=True)
    shipped = [p for p in same if p[1].endswith("as shipped") and p[2].endswith("as shipped")]
    assigned = sum(1 for s, _, _ in same if s >= 95.0)
    matched = sum(1 for s, _, _ in same if s >= 80.0)
    print(
        f"\none person, two photographs: {len(same)} pairs, auto-assigned (>= 95) "
        f"{assigned} ({assigned / len(same):.0%}), matched (>= 80) {matched} "
        f"({matched / len(same):.0%}); lowest {same[0]}"
    )
    # The photographs as shipped are all auto-assigned to one person.
    assert len(shipped) == 3
    assert all(s >= 95.0 for s, _, _ in shipped), shipped
    # Every pair, the changed copies included, at least reaches a suggestion.
    assert matched == len(same), same[:5]


def test_two_people_never_match(embeddings: dict[tuple[str, str], np.ndarray]) -> None:
    different = pairs(embeddings, same=False)
    suggested = sum(1 for s, _, _ in different if s >= 80.0)
    print(
        f"\ntwo people: {len(different)} pairs, matched (>= 80) {suggested}; "
        f"highest {different[-1]}"
    )
    assert suggested == 0, different[-5:]


def test_the_analysis_finds_the_faces_and_only_them() -> None:
    for name in PEOPLE:
        assert (
            analyze_bytes((DEMO / name).read_bytes(), max_side=1024, max_pixels=64_000_000)[
                "faces"
            ]["count"]
            == 1
        ), name
    for name in NO_FACE:
        assert (
            analyze_bytes((DEMO / name).read_bytes(), max_side=1024, max_pixels=64_000_000)[
                "faces"
            ]["count"]
            == 0
        ), name


def test_a_face_box_is_where_the_face_is() -> None:
    # Eileen Collins's face in astronaut.png (512x512) spans about x 180-265, y 85-170.
    (face,) = faces_bytes((DEMO / "astronaut.png").read_bytes(), **LIMITS)["faces"]
    box = face["bounding_box"]
    centre = ((box["Left"] + box["Width"] / 2) * 512, (box["Top"] + box["Height"] / 2) * 512)
    assert 200 < centre[0] < 245 and 105 < centre[1] < 150, box
    assert 50.0 <= face["confidence"] <= 100.0


def test_similarity_and_distance_are_inverse_and_monotonic() -> None:
    distances = [i / 100 for i in range(0, 121)]
    similarities = [similarity_from_distance(d) for d in distances]
    assert similarities == sorted(similarities, reverse=True)
    assert similarity_from_distance(0.5) == pytest.approx(95.0)
    assert similarity_from_distance(0.6) == pytest.approx(80.0)
    assert similarity_from_distance(1.5) == 0.0
    for similarity in (99.0, 95.0, 90.0, 80.0, 50.0, 1.0):
        assert similarity_from_distance(distance_for_similarity(similarity)) == pytest.approx(
            similarity
        )


def test_an_image_without_faces_embeds_nothing_and_a_bad_one_fails_alone() -> None:
    from listener.errors import InvalidImage

    assert faces_bytes((DEMO / "coffee.png").read_bytes(), **LIMITS)["faces"] == []
    with pytest.raises(InvalidImage):
        faces_bytes(b"<html>not an image</html>", **LIMITS)


def test_the_models_load_without_setuptools() -> None:
    """face-recognition-models' ``__init__`` imports ``pkg_resources`` (setuptools), which the
    container image does not carry: the models are found without importing it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pkg_resources'] = None\n"
        "from listener.analysis.providers.local_faces import recognition_models\n"
        "recognition_models()\n"
        "assert 'face_recognition_models' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
