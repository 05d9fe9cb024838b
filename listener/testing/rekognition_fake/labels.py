"""``DetectLabels``: deterministic labels from the faces and colour statistics.

See "Labels" in the package docstring for the rules.
"""

from __future__ import annotations

import cv2
import numpy as np

from listener.testing.rekognition_fake.faces import Analysis
from listener.testing.rekognition_fake.images import downscale, gray_quality
from listener.testing.rekognition_fake.protocol import Json, int_param, validation
from listener.testing.rekognition_fake.worker import ImageWorker

LABEL_MODEL_VERSION = "3.0"


def _ramp(value: float, start: float, full: float) -> float:
    """Confidence 55-99 rising as ``value`` goes from ``start`` to ``full``."""
    fraction = (value - start) / (full - start)
    return 55.0 + 44.0 * min(1.0, max(0.0, fraction))


def image_labels(analysis: Analysis) -> list[Json]:
    """Deterministic labels from the faces and colour statistics (see the module docstring)."""
    small = downscale(analysis.image, 256)
    hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
    hue = hsv[..., 0].astype(np.int32)
    saturation = hsv[..., 1].astype(np.float32) / 255.0
    value = hsv[..., 2].astype(np.float32) / 255.0
    colourful = (saturation > 0.25) & (value > 0.2)
    blue = float(np.mean(colourful & (hue >= 90) & (hue < 130)))
    green = float(np.mean(colourful & (hue >= 35) & (hue < 85)))
    gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    edges = float(np.mean(cv2.Canny(gray, 100, 200) > 0))
    brightness = float(value.mean())

    found: list[tuple[str, float, list[str], str]] = []  # name, confidence, parents, category
    if analysis.faces:
        confidence = max(f.confidence for f in analysis.faces)
        found += [
            ("Person", confidence, [], "Person Description"),
            ("Face", confidence, ["Person"], "Person Description"),
            ("Head", confidence, ["Person"], "Person Description"),
        ]
        share = analysis.faces[0].area / (analysis.width * analysis.height)
        if share >= 0.02:
            parents = ["Face", "Head", "Person", "Photography"]
            found.append(("Portrait", _ramp(share, 0.02, 0.2), parents, "Hobbies and Interests"))
    if blue >= 0.15:
        found.append(("Sky", _ramp(blue, 0.15, 0.5), ["Nature", "Outdoors"], "Nature and Outdoors"))
    if green >= 0.15:
        found.append(("Vegetation", _ramp(green, 0.15, 0.5), ["Plant"], "Plants and Flowers"))
    colour_share = float(np.mean(colourful))
    if colour_share < 0.05:
        confidence = _ramp(0.05 - colour_share, 0.0, 0.05)
        found.append(("Monochrome", confidence, [], "Colors and Visual Composition"))
    if edges >= 0.08:
        found.append(("Texture", _ramp(edges, 0.08, 0.25), [], "Patterns and Shapes"))
    elif edges < 0.03:
        found.append(("Backgrounds", _ramp(0.03 - edges, 0.0, 0.03), [], "Patterns and Shapes"))
    if brightness < 0.25:
        confidence = _ramp(0.25 - brightness, 0.0, 0.2)
        found.append(("Night", confidence, ["Nature", "Outdoors"], "Nature and Outdoors"))
    if not found:
        found.append(("Art", 60.0, [], "Hobbies and Interests"))

    labels: dict[str, Json] = {}
    person_instances = [
        {"BoundingBox": f.bounding_box(), "Confidence": f.confidence, "DominantColors": []}
        for f in analysis.faces
    ]
    for name, confidence, parents, category in found:
        labels[name] = _label(name, confidence, parents, category)
        if name == "Person":
            labels[name]["Instances"] = person_instances
    for _name, confidence, parents, category in found:
        for parent in parents:
            if parent not in labels:
                labels[parent] = _label(parent, confidence, [], category)
            labels[parent]["Confidence"] = max(labels[parent]["Confidence"], confidence)
    return sorted(labels.values(), key=lambda label: (-label["Confidence"], label["Name"]))


def _label(name: str, confidence: float, parents: list[str], category: str) -> Json:
    return {
        "Name": name,
        "Confidence": confidence,
        "Instances": [],
        "Parents": [{"Name": p} for p in parents],
        "Aliases": [],
        "Categories": [{"Name": category}],
    }


async def detect_labels(worker: ImageWorker, params: Json) -> Json:
    """``DetectLabels``: ``GENERAL_LABELS`` and ``IMAGE_PROPERTIES`` (quality only)."""
    features = params.get("Features") or ["GENERAL_LABELS"]
    max_labels = int_param(params, "MaxLabels", 1000, 0, None)
    min_confidence = params.get("MinConfidence", 55.0)
    if not isinstance(min_confidence, int | float) or not 0 <= min_confidence <= 100:
        raise validation("minConfidence", min_confidence, "be between 0 and 100")
    analysis = await worker.analyze(params)
    answer: Json = {"Labels": [], "LabelModelVersion": LABEL_MODEL_VERSION}
    if "GENERAL_LABELS" in features:
        labels = await worker.run(image_labels, analysis)
        labels = [label for label in labels if label["Confidence"] >= min_confidence]
        answer["Labels"] = labels[:max_labels]
    if "IMAGE_PROPERTIES" in features:
        answer["ImageProperties"] = {
            "Quality": gray_quality(analysis.gray),
            "DominantColors": [],
        }
    return answer
