"""A fake Amazon Rekognition: a real aiohttp server that the real ``aioboto3`` client talks to.

moto does not implement Rekognition face collections, so tests use this instead::

    async with FakeRekognition(tps_limit=5) as fake:
        session = aioboto3.Session(aws_access_key_id="testing",
                                   aws_secret_access_key="testing", region_name="us-east-1")
        async with session.client("rekognition", endpoint_url=fake.endpoint_url) as client:
            await client.create_collection(CollectionId="people")
            fake.faults.append("ThrottlingException")    # the next request fails with it

botocore quirks met on the way: ``Config(retries={"max_attempts": 1})`` means one *retry*
(two attempts; botocore's legacy meaning), so a single injected ``ThrottlingException`` or 5xx
is retried and the call succeeds; ``{"total_max_attempts": 1}`` is one attempt in all. botocore
validates only ``required``, types, enums and ``min``: ``max`` and ``pattern`` (a 6 MB image, a
CollectionId with a space) reach the server. aiohttp warns (``ResourceWarning: Sending a large
body directly with raw bytes``) for request bodies over 1 MiB, i.e. images over ~750 kB once
base64-encoded; under ``filterwarnings = error`` that warning fails the call. Timestamps
(``CreationTimestamp``) travel as epoch seconds and come back as ``datetime``.

As a process: ``python -m listener.testing.rekognition_fake --port 0 [--tps N]`` prints
``READY http://127.0.0.1:PORT`` (flushed) and serves until SIGTERM or SIGINT. Point boto3 /
aioboto3 (``client("rekognition", endpoint_url=...)``) or listener
(``LISTENER_REKOGNITION__ENDPOINT_URL``) at that URL, with any AWS credentials and region.

Protocol (AWS JSON 1.1, as botocore speaks it for Rekognition): ``POST /`` with
``X-Amz-Target: RekognitionService.<Operation>``, ``Content-Type: application/x-amz-json-1.1``
and a JSON body, blobs (``Image.Bytes``) in base64. Answers are JSON of the same content type.
An error is HTTP 400 (500 for ``InternalServerError``, 503 for ``ServiceUnavailableException``,
403 for a missing ``Authorization`` header) with ``{"__type": "<Code>", "Message": "..."}``:
botocore's JSON parser takes ``__type`` (after any ``#``) as ``Error.Code`` and ``Message`` (or
``message``) as ``Error.Message``, so ``ClientError.response["Error"]["Code"]`` is the exception
name, and ``client.exceptions.<Name>`` matches for names in the service model. SigV4 signatures
are not checked, but an ``Authorization`` header is required.

Operations: CreateCollection, ListCollections, DeleteCollection, IndexFaces, ListFaces,
DeleteFaces, SearchFaces, DetectLabels (what listener calls, and DeleteCollection for tests of a
collection deleted outside listener; any other is ``UnknownOperationException``). Shapes follow
botocore's service model (``rekognition`` 2016-06-27). Behaviour taken from the API reference
and https://docs.aws.amazon.com/rekognition/latest/dg/limits.html:

- ``Image.Bytes``: at most 5 MiB raw (else ``ImageTooLargeException``; botocore does not check
  a blob's ``max``), JPEG or PNG by magic bytes (else ``InvalidImageFormatException``), at
  least 80 px on each side (else ``InvalidParameterException``). ``Image.S3Object`` ->
  ``InvalidS3ObjectException`` (not supported here). No ``Image`` is caught by botocore's
  parameter validation before any request; an empty ``Image`` -> ``InvalidParameterException``.
- ``FaceMatchThreshold`` defaults to 80; ``SearchFaces`` never returns the searched face;
  matches are sorted by similarity, highest first, at most ``MaxFaces`` (default 4096, the
  service's maximum). An unknown ``FaceId`` -> ``InvalidParameterException``.
- ``IndexFaces``: faces failing ``QualityFilter`` (default ``AUTO``; ``NONE`` disables it) go
  to ``UnindexedFaces`` with ``SMALL_BOUNDING_BOX`` (side < 40 px, scaled up for images larger
  than 1920x1080), ``LOW_SHARPNESS`` or ``LOW_BRIGHTNESS``; of the rest the largest
  ``MaxFaces`` are indexed and the others get ``EXCEEDS_MAX_FACES``. A ``FaceDetail`` has
  the DEFAULT members listener reads (BoundingBox, Pose, Quality, Confidence), whatever
  ``DetectionAttributes`` asks for.
- Constraints botocore leaves to the server (``pattern`` and ``max``) -> ``ValidationException``.
- ``CollectionArn`` has the service's ``aws:rekognition:...`` form (no ``arn:`` prefix).

Inspectable state and knobs: ``faults`` (exception names raised by the next requests, FIFO,
one per request), ``latency_s`` (added to every admitted request), ``calls`` ((operation,
``time.monotonic()``) of every request, throttled or not), ``violations`` and
``collections`` (id -> ``Collection``).

TPS limit: every operation counts against one sliding window. With ``tps_limit`` = r, a
request is admitted when fewer than ``c = max(1, floor(r))`` requests were admitted in the last
``c / r`` seconds (1 s for integral r); otherwise it counts as a violation and gets
``ThrottlingException``. Throttled requests do not occupy the window. A client-side token bucket
of rate r and burst b can put about b + r - 1 requests into one 1 s window, so only burst 1
(with a little margin in the rate for arrival jitter) stays clear of violations.

Faces: OpenCV's frontal Haar cascade (``haarcascade_frontalface_default.xml``, scaleFactor 1.1,
minNeighbors 5, minSize 24 px) on the grayscale image downscaled to at most 1024 px and
equalized with CLAHE (clip 2, 8x8 tiles). Global ``equalizeHist`` missed the face in 14 of 80
test photos (the background's histogram reshapes the face's tones), CLAHE in none. Each face's
signature is its square box grown by 25% per side, resampled (anti-aliased) to 48x48 and blurred
(sigma 1). Two signatures are compared by normalized cross-correlation (``TM_CCOEFF_NORMED``):
the central 32x32 of one, taken at 9 scales 0.88-1.12, slid over the other's 48x48, best of both
directions. This absorbs the cascade's box jitter (position, and size within +-12%), brightness
and pixel noise. The correlation c becomes a similarity by a piecewise-linear map, calibrated on
the test photos below: (c, similarity) = (0, 0), (0.80, 70), (0.905, 89), (0.96, 97), (1, 100);
negative c gives 0.

Test faces (``face_photo``): a 167x167 px tile cut from ``listener/demo_images/astronaut.png``
(scikit-image's astronaut, public domain; the cascade finds the face at x 177, y 67, 93 px)
around the face, pasted on a seeded gradient-plus-noise background.

- ``"a"``: the tile.
- ``"b"``: the tile mirrored left-right. The only frontal face in the shipped images is the
  astronaut's; her mirror image has the hair parting and the asymmetries on the other side,
  which this signature sees as another face (the cascade detects it as well).
- ``"a_borderline"``: ``"a"`` with a translucent grey veil (70% opacity) over the lower 38% of
  the tile (mouth and chin): a partial occlusion. Pixel noise was tried first: sigma 25-55
  barely moves the blurred signature (c >= 0.97), and spatially correlated noise stops the
  cascade from finding the face at all.

Measured over 40 photos per kind (640x480, scale 0.7-1.3, brightness 0.9-1.1, random
positions and backgrounds), each compared with 40 photos of ``"a"`` (1600 pairs), as
similarity (correlation): ``"a"`` 98.4-100.0, median 99.5 (0.979-1.000); ``"a_borderline"``
86.7-91.2, median 89.3 (0.892-0.920); ``"b"`` 52.3-61.8, median 59.1 (0.598-0.707). Also
checked: photos of 200x200 up to 2400x1800 (tile scale up to 3), tiles at the corners, blur
up to sigma 4, brightness 0.25-0.5: same bands. No face in 40 ``no_face_photo`` seeds. The
integration test checks these bands on fixed photos.

Labels (``DetectLabels``) are derived from colour statistics, deterministically: "Person",
"Face", "Head" (and "Portrait" when the largest face covers 2% of the image) when faces are
found; "Sky" (blue pixels), "Vegetation" (green), "Monochrome" (little saturation), "Texture"
(many Canny edges), "Backgrounds" (few edges), "Night" (dark), "Art" when nothing else fits;
parents are listed as labels too. ``ImageProperties.Quality`` is measured on the grayscale:
Brightness = mean / 255 * 100, Contrast = min(100, std / 127.5 * 100), Sharpness =
100 * log(1 + var(Laplacian)) / log(1 + 3000) capped at 100 (astronaut.png: 84; blurred
with sigma 2: 31). A face's Quality uses the same formulas on its box resampled to 64x64.
``DominantColors`` is always empty and ``Settings`` filters are ignored.

Modules: ``server`` (``FakeRekognition``: the request's checks, knobs, records),
``protocol`` (AWS JSON 1.1: errors, bodies, parameters, pages), ``images`` (decoding, quality),
``faces`` (detection, signatures, similarity), ``face_collections`` (the collection and face
operations), ``labels`` (``DetectLabels``), ``worker`` (the image thread), ``photos`` (test
photos), ``process`` (``python -m``).
"""

from __future__ import annotations

from listener.testing.rekognition_fake.face_collections import (
    FACE_MODEL_VERSION,
    Collection,
    StoredFace,
)
from listener.testing.rekognition_fake.faces import (
    DETECT_MAX_SIDE,
    Analysis,
    DetectedFace,
    FaceAnalyzer,
    Signature,
    face_correlation,
    face_similarity,
    similarity_from_correlation,
)
from listener.testing.rekognition_fake.images import (
    MAX_IMAGE_BYTES,
    MIN_IMAGE_SIDE,
    Image,
    decode_image_bytes,
    gray_quality,
)
from listener.testing.rekognition_fake.labels import LABEL_MODEL_VERSION, image_labels
from listener.testing.rekognition_fake.photos import (
    TILE_SIDE,
    face_photo,
    face_tile,
    no_face_photo,
)
from listener.testing.rekognition_fake.process import main
from listener.testing.rekognition_fake.protocol import Json, RekognitionError
from listener.testing.rekognition_fake.server import FakeRekognition

__all__ = [
    "DETECT_MAX_SIDE",
    "FACE_MODEL_VERSION",
    "LABEL_MODEL_VERSION",
    "MAX_IMAGE_BYTES",
    "MIN_IMAGE_SIDE",
    "TILE_SIDE",
    "Analysis",
    "Collection",
    "DetectedFace",
    "FaceAnalyzer",
    "FakeRekognition",
    "Image",
    "Json",
    "RekognitionError",
    "Signature",
    "StoredFace",
    "decode_image_bytes",
    "face_correlation",
    "face_photo",
    "face_similarity",
    "face_tile",
    "gray_quality",
    "image_labels",
    "main",
    "no_face_photo",
    "similarity_from_correlation",
]
