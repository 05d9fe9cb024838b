"""A chat completions request: validated as OpenAI validates it, and what its answer needs.

``parse_chat`` checks a ``POST /v1/chat/completions`` body (messages, content parts, images,
``response_format`` with Structured Outputs' strict-mode rules) and raises ``ApiError`` (400)
as the real API would; ``Chat`` keeps what the answer depends on. Sources: API reference,
"Create chat completion"; "Images and vision" and "Structured Outputs" guides.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
from dataclasses import dataclass
from typing import Any, cast

from PIL import Image, ImageStat

from listener.testing.openai_fake.errors import ApiError, invalid

# The size the fake assumes for an http(s) image, which it never fetches.
ASSUMED_URL_IMAGE_SIZE = (1024, 1024)
SUPPORTED_IMAGE_FORMATS = frozenset({"PNG", "JPEG", "GIF", "WEBP"})
MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
DETAILS = frozenset({"low", "high", "auto"})
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def image_tokens(width: int, height: int, detail: str) -> int:
    """Prompt tokens of one image for GPT-4o-class models (gpt-4o, gpt-4-turbo, gpt-4.5, o1).

    Source: OpenAI "Images and vision" guide, "Calculating costs": ``detail: low`` costs 85
    tokens. ``high`` images are scaled to fit within a 2048 x 2048 square (keeping the aspect
    ratio), then scaled so that the shortest side is 768 px; each 512 px tile of the result
    costs 170 tokens, plus 85. The guide's examples: 1024 x 1024 high = 765 and
    2048 x 4096 high = 1105. Images are only ever scaled down (a 128 x 64 image is one tile,
    as measured on the real API). ``auto`` is counted as ``high``, the worst case.
    """
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = round(w * scale), round(h * scale)
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = round(w * scale), round(h * scale)
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return 85 + 170 * tiles


@dataclass
class ImagePart:
    """One ``image_url`` part: what identifies it, its size and how it is billed."""

    key: bytes  # the decoded bytes of a data URL, or the URL itself
    width: int
    height: int
    detail: str
    luminance: tuple[float, float] | None  # (mean, stddev) of the pixels; None if not decoded


@dataclass
class Chat:
    """The parts of a valid chat request the fake's answer depends on."""

    model: str
    text_chars: int
    images: list[ImagePart]
    text: str
    response_format: dict[str, Any] | None
    max_tokens: int | None

    @property
    def prompt_tokens(self) -> int:
        """ceil(text characters / 4) plus each image's ``image_tokens``."""
        return math.ceil(self.text_chars / 4) + sum(
            image_tokens(image.width, image.height, image.detail) for image in self.images
        )

    @property
    def seed(self) -> bytes:
        """A digest of the images (of the text when there is none): answers derive from it."""
        digest = hashlib.sha256()
        if self.images:
            for image in self.images:
                digest.update(hashlib.sha256(image.key).digest())
        else:
            digest.update(self.text.encode())
        return digest.digest()


def _decode_image(url: str, param: str) -> tuple[bytes, int, int, tuple[float, float] | None]:
    """Key, width, height and luminance of an ``image_url``: data URLs are decoded.

    Raises:
        ApiError: 400 ``invalid_image`` (undecodable or unsupported data URL) or
            ``invalid_image_url`` (neither http(s) nor data).
    """
    if url.startswith(("https://", "http://")):
        width, height = ASSUMED_URL_IMAGE_SIZE
        return url.encode(), width, height, None
    if not url.startswith("data:"):
        raise invalid(
            "Invalid image URL: expected an http(s) URL or a base64 data URL.",
            param,
            "invalid_image_url",
        )
    header, sep, payload = url.partition(",")
    bad = invalid(
        "You uploaded an unsupported image. Please make sure your image is valid "
        "(PNG, JPEG, WEBP or non-animated GIF).",
        param,
        "invalid_image",
    )
    if not sep or not header.endswith(";base64"):
        raise bad
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format not in SUPPORTED_IMAGE_FORMATS:
                raise bad
            stat = ImageStat.Stat(image.convert("L"))
            return data, image.width, image.height, (stat.mean[0], stat.stddev[0])
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as exc:
        raise bad from exc


def _parse_content(content: Any, role: str, where: str, texts: list[str]) -> list[ImagePart]:
    """Collect a message's text into ``texts``; return its images. Raises ``ApiError``."""
    if content is None:
        if role in ("assistant", "function"):
            return []
        raise invalid(f"Invalid value for '{where}': expected a string or an array.", where)
    if isinstance(content, str):
        texts.append(content)
        return []
    if not isinstance(content, list):
        raise invalid(
            f"Invalid type for '{where}': expected a string or an array.", where, "invalid_type"
        )
    images = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid(f"Missing required parameter: '{at}.text'.", f"{at}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise invalid(
                    f"Invalid '{at}': image_url parts are only allowed for messages with "
                    "role 'user'.",
                    at,
                )
            spec = part.get("image_url")
            if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
                raise invalid(
                    f"Missing required parameter: '{at}.image_url.url'.",
                    f"{at}.image_url.url",
                    "missing_required_parameter",
                )
            detail = spec.get("detail", "auto")
            if detail not in DETAILS:
                raise invalid(
                    f"Invalid value: '{detail}'. Supported values are: 'low', 'high', and 'auto'.",
                    f"{at}.image_url.detail",
                )
            key, width, height, luminance = _decode_image(spec["url"], f"{at}.image_url.url")
            images.append(ImagePart(key, width, height, detail, luminance))
        else:
            raise invalid(f"Invalid value: '{kind}'. Supported values are: 'text', ...", at)
    return images


def _subschemas(schema: dict[str, Any]) -> list[Any]:
    """The schemas directly nested in ``schema``."""
    nested: list[Any] = []
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            nested += schema[key].values()
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            nested += schema[key]
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            nested.append(schema[key])
    return nested


def _check_strict(schema: Any, where: str) -> None:
    """Raise 400 if ``schema`` breaks the Structured Outputs strict-mode rules on objects.

    Source: "Structured Outputs" guide, "Supported schemas": ``additionalProperties: false``
    must always be set in objects, and all fields must be ``required``.
    """
    if not isinstance(schema, dict):
        return
    properties = schema.get("properties")
    if schema.get("type") == "object" or isinstance(properties, dict):
        if schema.get("additionalProperties") is not False:
            raise invalid(
                f"Invalid schema for response_format '{where}': In context=(), "
                "'additionalProperties' is required to be supplied and to be false.",
                "response_format",
                None,
            )
        required = schema.get("required", [])
        missing = [key for key in properties or {} if key not in required]
        if missing:
            raise invalid(
                f"Invalid schema for response_format '{where}': In context=(), 'required' is "
                "required to be supplied and to be an array including every key in "
                f"properties. Missing '{missing[0]}'.",
                "response_format",
                None,
            )
    for sub in _subschemas(schema):
        _check_strict(sub, where)


def _parse_response_format(value: Any) -> dict[str, Any] | None:
    """Validate ``response_format``; return it (None for plain text). Raises ``ApiError``."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind != "json_schema":
        raise invalid(
            f"Invalid value: '{kind}'. The fake supports 'text' and 'json_schema'.",
            "response_format.type",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid(
            "Missing required parameter: 'response_format.json_schema'.",
            "response_format.json_schema",
            "missing_required_parameter",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.match(name):
        raise invalid(
            "Invalid 'response_format.json_schema.name': expected 1-64 characters of "
            "a-z, A-Z, 0-9, '_' and '-'.",
            "response_format.json_schema.name",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise invalid(
            "Invalid type for 'response_format.json_schema.schema': expected an object.",
            "response_format.json_schema.schema",
            "invalid_type",
        )
    if spec.get("strict"):
        if schema.get("type") != "object":
            raise invalid(
                f"Invalid schema for response_format '{name}': schema must be a JSON Schema "
                "of 'type: \"object\"'.",
                "response_format",
                None,
            )
        _check_strict(schema, name)
    return cast(dict[str, Any], value)


def parse_chat(body: Any) -> Chat:
    """Validate a chat completions request body. Raises ``ApiError`` (400)."""
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter")
    messages = body.get("messages")
    if messages is None:
        raise invalid(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise invalid("Invalid type for 'messages': expected an array.", "messages", "invalid_type")
    if not messages:
        raise invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got "
            "an empty array instead.",
            "messages",
            "empty_array",
        )
    texts: list[str] = []
    images: list[ImagePart] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in MESSAGE_ROLES:
            raise invalid(
                f"Invalid value for 'messages[{i}].role': '{role}'.", f"messages[{i}].role"
            )
        images += _parse_content(message.get("content"), role, f"messages[{i}].content", texts)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise invalid("Invalid 'max_completion_tokens': expected an integer >= 1.", "max_tokens")
    return Chat(
        model=model,
        text_chars=sum(len(text) for text in texts),
        images=images,
        text="\n".join(texts),
        response_format=_parse_response_format(body.get("response_format")),
        max_tokens=max_tokens,
    )
