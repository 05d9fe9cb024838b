"""AWS JSON 1.1 as botocore speaks it for Rekognition: errors, bodies, parameters, pages.

A request is ``POST /`` with ``X-Amz-Target: RekognitionService.<Operation>`` and a JSON body;
an error is ``{"__type": "<Code>", "Message": "..."}`` with the status ``RekognitionError``
carries. Constraints botocore leaves to the server (``pattern``, ``max``) are checked here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from typing import Any, TypeVar

from aiohttp import web

_T = TypeVar("_T")
Json = dict[str, Any]

TARGET_PREFIX = "RekognitionService."
CONTENT_TYPE = "application/x-amz-json-1.1"
MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_RESULTS = 1000
STATUS = {
    "InternalServerError": 500,
    "ServiceUnavailableException": 503,
    "MissingAuthenticationTokenException": 403,
}


class RekognitionError(Exception):
    """An error answer: ``code`` becomes ``__type``, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS.get(code, 400)


def json_response(status: int, body: Json, headers: dict[str, str] | None = None) -> web.Response:
    all_headers = {"Content-Type": CONTENT_TYPE, "x-amzn-RequestId": str(uuid.uuid4())}
    all_headers.update(headers or {})
    return web.Response(status=status, body=json.dumps(body).encode(), headers=all_headers)


def error_response(error: RekognitionError) -> web.Response:
    body = {"__type": error.code, "Message": error.message}
    return json_response(error.status, body, {"x-amzn-ErrorType": error.code})


def parse_body(body: bytes) -> Json:
    try:
        params = json.loads(body or b"{}")
    except ValueError:
        raise RekognitionError("SerializationException", "The body is not JSON") from None
    if not isinstance(params, dict):
        raise RekognitionError("SerializationException", "The body is not a JSON object")
    return params


def validation(member: str, value: Any, constraint: str) -> RekognitionError:
    return RekognitionError(
        "ValidationException",
        f"1 validation error detected: Value '{value}' at '{member}' failed to satisfy "
        f"constraint: Member must {constraint}",
    )


def check_pattern(member: str, value: Any, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise validation(member, value, f"satisfy regular expression pattern: {pattern.pattern}")
    return value


def int_param(
    params: Json, name: str, default: int | None, low: int, high: int | None
) -> int | None:
    value = params.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or value < low or (high is not None and value > high):
        raise validation(name[0].lower() + name[1:], value, f"be between {low} and {high}")
    return value


def paginate(items: list[_T], params: Json) -> tuple[list[_T], str | None]:
    """One page of ``items`` for ``MaxResults`` / ``NextToken`` (an offset, as text)."""
    limit = int_param(params, "MaxResults", DEFAULT_MAX_RESULTS, 0, 4096) or 0
    token = params.get("NextToken")
    try:
        start = int(token) if token is not None else 0
    except (TypeError, ValueError):
        raise RekognitionError(
            "InvalidPaginationTokenException", "Invalid pagination token"
        ) from None
    end = start + limit
    return items[start:end], (str(end) if end < len(items) else None)


def image_bytes(image: Any) -> bytes:
    """The raw bytes of a request's ``Image`` member (base64 in JSON)."""
    if not isinstance(image, dict) or not image:
        raise RekognitionError("InvalidParameterException", "Request has invalid parameters")
    if "S3Object" in image:
        raise RekognitionError(
            "InvalidS3ObjectException", "S3 objects are not supported by the fake"
        )
    encoded = image.get("Bytes")
    if not isinstance(encoded, str) or not encoded:
        raise RekognitionError("InvalidParameterException", "Request has invalid parameters")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise RekognitionError("InvalidParameterException", "Image.Bytes is not base64") from None
