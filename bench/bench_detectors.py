"""Face detectors compared on real photographs: recall, false detections and time per image.

Usage::

    python bench/bench_detectors.py [--smoke] [--json out.json] [--seconds S]

The photographs are the people of ``listener/demo_images`` (three of Barack Obama, one of Joe
Biden, one of Eileen Collins; sources in its ``SOURCES.md``), each as shipped and as five
changed copies (mirrored, half size, darkened to 45 %, turned 20 degrees each way): 30 faces.
A face counts as found when a detection's box contains the face's centre (annotated below
for each photograph as shipped, moved with each change). Any other detection, on those
copies or on the same six copies of the five photographs without a face (brick, cat, coffee,
galaxies, rocket), is a false detection. Time: milliseconds per image, single-threaded
(``cv2.setNumThreads(1)``; dlib runs on one thread), averaged over every bundled photograph
as shipped, for ``--seconds`` per detector.

Detectors (all with weights from PyPI packages, nothing downloaded at run time):

- ``opencv haar 1024``: OpenCV's ``haarcascade_frontalface_default.xml`` on the equalized
  gray copy at 1024 px, scaleFactor 1.1, minNeighbors 5, minSize 30 (the local analysis's
  detector before dlib's);
- ``dlib hog 512`` / ``dlib hog 1024``: dlib's HOG frontal detector (``dlib-bin``) on the
  gray copy at 512 / 1024 px, no upsampling (the local analysis's ``face_max_side``);
- ``dlib hog 512 x2``: the same at 512 px, upsampled once (``face_upsample=1``);
- ``dlib cnn 512``: dlib's MMOD CNN detector (``mmod_human_face_detector.dat`` from
  ``face-recognition-models``) at 512 px.

Prints one line per detector; ``--json`` writes them. ``--smoke`` runs only ``dlib hog 512``
on two photographs for a second (the CI smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

DEMO = Path(__file__).resolve().parents[1] / "listener" / "demo_images"
#: Face centre (x, y), pixels of the photograph as shipped: read off its face box.
CENTRES = {
    "astronaut.png": (222, 126),
    "biden_1.jpg": (214, 139),
    "obama_1.jpg": (350, 198),
    "obama_2.jpg": (198, 285),
    "obama_3.jpg": (276, 151),
}
NO_FACE = ["brick.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "rocket.jpg"]
Box = tuple[float, float, float, float]
Pixels = np.ndarray


def load(name: str) -> Pixels:
    return np.asarray(Image.open(DEMO / name).convert("RGB"))


def variants(rgb: Pixels, centre: tuple[float, float]) -> list[tuple[str, Pixels, Any]]:
    """(label, pixels, the face centre in them) for the photograph and its five changes."""
    height, width = rgb.shape[:2]
    cx, cy = centre
    out: list[tuple[str, Pixels, Any]] = [
        ("as shipped", rgb, (cx, cy)),
        ("mirrored", np.ascontiguousarray(rgb[:, ::-1]), (width - 1 - cx, cy)),
        (
            "half size",
            cv2.resize(rgb, (width // 2, height // 2), interpolation=cv2.INTER_AREA),
            (cx / 2, cy / 2),
        ),
        ("darkened", (rgb * 0.45).astype(np.uint8), (cx, cy)),
    ]
    for angle in (-20, 20):
        matrix = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
        turned = cv2.warpAffine(rgb, matrix, (width, height), borderMode=cv2.BORDER_REFLECT)
        out.append((f"turned {angle}", turned, (cx, cy)))
    return out


def fit(pixels: Pixels, side: int) -> tuple[Pixels, float]:
    height, width = pixels.shape[:2]
    factor = min(1.0, side / max(height, width))
    if factor == 1.0:
        return pixels, 1.0
    size = (round(width * factor), round(height * factor))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), factor


def haar(side: int) -> Callable[[Pixels], list[Box]]:
    cascade = cv2.CascadeClassifier(
        cv2.data.haarcascades + "haarcascade_frontalface_default.xml"  # type: ignore[attr-defined]
    )

    def detect(rgb: Pixels) -> list[Box]:
        gray, f = fit(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), side)
        found = cascade.detectMultiScale(
            cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5, minSize=(30, 30)
        )
        return [(x / f, y / f, w / f, h / f) for x, y, w, h in found]

    return detect


def hog(side: int, upsample: int = 0) -> Callable[[Pixels], list[Box]]:
    import dlib

    detector = dlib.get_frontal_face_detector()

    def detect(rgb: Pixels) -> list[Box]:
        gray, f = fit(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), side)
        return [
            (r.left() / f, r.top() / f, r.width() / f, r.height() / f)
            for r in detector(gray, upsample)
        ]

    return detect


def cnn(side: int) -> Callable[[Pixels], list[Box]]:
    import dlib

    from listener.analysis.providers.local_faces import models_folder

    path = models_folder() / "mmod_human_face_detector.dat"
    detector = dlib.cnn_face_detection_model_v1(str(path))

    def detect(rgb: Pixels) -> list[Box]:
        small, f = fit(rgb, side)
        return [
            (d.rect.left() / f, d.rect.top() / f, d.rect.width() / f, d.rect.height() / f)
            for d in detector(small, 0)
        ]

    return detect


DETECTORS: dict[str, Callable[[], Callable[[Pixels], list[Box]]]] = {
    "opencv haar 1024": lambda: haar(1024),
    "dlib hog 512": lambda: hog(512),
    "dlib hog 1024": lambda: hog(1024),
    "dlib hog 512 x2": lambda: hog(512, 1),
    "dlib cnn 512": lambda: cnn(512),
}


def contains(box: Box, point: tuple[float, float]) -> bool:
    x, y, w, h = box
    return x <= point[0] <= x + w and y <= point[1] <= y + h


def measure(
    name: str, people: dict[str, Pixels], empty: dict[str, Pixels], seconds: float
) -> dict[str, Any]:
    detect = DETECTORS[name]()
    found = faces = false = 0
    missed = []
    for photo, rgb in people.items():
        for label, pixels, centre in variants(rgb, CENTRES[photo]):
            faces += 1
            boxes = detect(pixels)
            hit = [b for b in boxes if contains(b, centre)]
            found += bool(hit)
            false += len(boxes) - len(hit)
            if not hit:
                missed.append(f"{photo} {label}")
    for rgb in empty.values():
        for _, pixels, _ in variants(rgb, (0, 0)):
            false += len(detect(pixels))
    timed = [*people.values(), *empty.values()]
    detect(timed[0])
    runs = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or runs == 0:
        for pixels in timed:
            detect(pixels)
            runs += 1
    ms = (time.perf_counter() - started) / runs * 1000
    return {
        "detector": name,
        "faces": faces,
        "found": found,
        "recall": found / faces,
        "false_detections": false,
        "ms_per_image": ms,
        "missed": missed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="dlib hog 512 on two photos, 1 s")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per detector (s)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    names = list(DETECTORS)
    people = {name: load(name) for name in CENTRES}
    empty = {name: load(name) for name in NO_FACE}
    if args.smoke:
        names = ["dlib hog 512"]
        people = {k: people[k] for k in ("astronaut.png", "obama_1.jpg")}
        empty = {"coffee.png": empty["coffee.png"]}
        args.seconds = 1.0
    figures = []
    print(f"{'detector':18} {'found':>9} {'recall':>7} {'false':>6} {'ms/image':>9}  missed")
    for name in names:
        m = measure(name, people, empty, args.seconds)
        figures.append(m)
        print(
            f"{name:18} {m['found']:>4} / {m['faces']:<2} {m['recall']:>7.0%} "
            f"{m['false_detections']:>6} {m['ms_per_image']:>9.1f}  {', '.join(m['missed'])}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"detectors": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
