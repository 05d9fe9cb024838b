"""The fake's answers: deterministic content for a chat request, as a ``chat.completion``.

Values are a function of the images (or, with no image, of the text): the same image gets the
same answer whatever the prompt says. With ``response_format: json_schema`` the content is a
JSON object that validates against the schema (``SchemaFaker``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from typing import Any, cast

from listener.testing.openai_fake.chat import Chat
from listener.testing.openai_fake.errors import invalid


class SchemaFaker:
    """Deterministic JSON values that validate against a (strict-mode) JSON Schema.

    Understood: what pydantic models generate for Structured Outputs: ``type`` (one or a
    list), ``properties``, ``items``, ``enum``, ``anyOf`` (one branch picked), ``$ref`` to
    local JSON pointers (``#/$defs/X``, ``#``), ``minimum`` / ``maximum``, ``minItems`` /
    ``maxItems``. Other keywords (``format``, ``pattern``, string lengths) are ignored.

    Every choice is a hash of the seed (the images) and the value's path, so the same image
    gets the same answer. Strings read "<field> of image <8 hex digits>"; arrays have 1-3
    items (within minItems/maxItems); integers without bounds fall in 0..100, numbers in 0..1.
    An integer or number whose field name contains "quality" and that has both bounds is
    derived from the first decoded image instead: score = (contrast + exposure) / 2 where
    contrast = min(1, luminance stddev / 64) and exposure = 1 - |mean - 128| / 128, mapped
    linearly onto [minimum, maximum]; flat or badly exposed images score low.
    Recursive schemas end at ``max_depth``: optional values become null, arrays minItems.
    """

    def __init__(
        self,
        root: dict[str, Any],
        seed: bytes,
        quality: float | None,
        max_depth: int = 8,
    ) -> None:
        self.root = root
        self.seed = seed
        self.short = seed.hex()[:8]
        self.quality = quality
        self.max_depth = max_depth

    def _hash(self, path: str) -> int:
        return int.from_bytes(hashlib.sha256(self.seed + path.encode()).digest()[:8], "big")

    def _resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#"):
            raise invalid(f"Only local $ref are supported, got '{ref}'.", "response_format", None)
        node: Any = self.root
        for token in [t for t in ref[1:].split("/") if t]:
            token = token.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or token not in node:
                raise invalid(f"Unresolvable $ref '{ref}'.", "response_format", None)
            node = node[token]
        return cast(dict[str, Any], node)

    def value(
        self, schema: dict[str, Any], path: str = "$", name: str = "value", depth: int = 0
    ) -> Any:
        """A value for ``schema`` at ``path`` (``name``: the nearest property name)."""
        if depth > 8 * self.max_depth:
            raise invalid("The schema nests too deeply to answer.", "response_format", None)
        deep = depth >= self.max_depth
        if "$ref" in schema:
            merged = {**self._resolve(schema["$ref"]), **schema}
            del merged["$ref"]
            return self.value(merged, path, name, depth + 1)
        if "enum" in schema:
            return schema["enum"][self._hash(path) % len(schema["enum"])]
        if "anyOf" in schema:
            branches = schema["anyOf"]
            nulls = [b for b in branches if b.get("type") == "null"]
            chosen = nulls[0] if deep and nulls else branches[self._hash(path) % len(branches)]
            return self.value(chosen, path, name, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = (
                "null" if deep and "null" in kind else kind[self._hash(path + "|type") % len(kind)]
            )
        if kind is None:
            kind = (
                "object" if "properties" in schema else "array" if "items" in schema else "string"
            )
        h = self._hash(path)
        if kind == "object":
            properties = schema.get("properties", {})
            return {
                key: self.value(sub, f"{path}.{key}", key, depth + 1)
                for key, sub in properties.items()
            }
        if kind == "array":
            low = int(schema.get("minItems", 0))
            high = int(schema.get("maxItems", max(low, 3)))
            count = low if deep else min(max(1 + h % 3, low), high)
            items = schema.get("items", {})
            return [self.value(items, f"{path}[{i}]", name, depth + 1) for i in range(count)]
        if kind in ("integer", "number"):
            return self._number(schema, h, name, integer=kind == "integer")
        if kind == "boolean":
            return h % 2 == 0
        if kind == "null":
            return None
        return f"{name} of image {self.short}"

    def _number(self, schema: dict[str, Any], h: int, name: str, *, integer: bool) -> float:
        """A number within ``minimum``..``maximum`` (0..100 or 0..1 without bounds)."""
        given = "minimum" in schema and "maximum" in schema
        low = float(schema.get("minimum", 0.0))
        high = float(schema.get("maximum", low + (100 if integer else 1)))
        if given and "quality" in name.lower() and self.quality is not None:
            fraction = self.quality
        else:
            fraction = (h % 9999 + 1) / 10000  # never exactly a bound
        if integer:
            first, last = math.ceil(low), math.floor(high)
            if given and "quality" in name.lower() and self.quality is not None:
                return first + round((last - first) * fraction)
            return first + h % (last - first + 1)
        return round(low + (high - low) * fraction, 3)


def _quality_score(chat: Chat) -> float | None:
    """A plausible 0..1 image quality from the first decoded image (see ``SchemaFaker``)."""
    for image in chat.images:
        if image.luminance is not None:
            mean, stddev = image.luminance
            contrast = min(1.0, stddev / 64)
            exposure = 1 - abs(mean - 128) / 128
            return (contrast + exposure) / 2
    return None


def _content(chat: Chat) -> str:
    """The full answer to ``chat``, before any truncation."""
    seed = chat.seed
    short = seed.hex()[:8]
    if chat.response_format is None:
        if chat.images:
            return f"The image {short} shows a plausible test scene."
        return f"This is a fake answer ({short}) to a {chat.text_chars}-character prompt."
    schema = chat.response_format["json_schema"].get("schema", {})
    faker = SchemaFaker(schema, seed, _quality_score(chat))
    return json.dumps(faker.value(schema), separators=(",", ":"))


def finish(chat: Chat, override: str | None) -> tuple[str | None, str]:
    """The message content and finish_reason, after ``max_tokens`` and any override."""
    content = _content(chat)
    if override == "content_filter":
        return None, override
    if override == "length":
        return content[: max(1, len(content) // 2)], override
    if chat.max_tokens is not None and math.ceil(len(content) / 4) > chat.max_tokens:
        return content[: chat.max_tokens * 4], "length"
    return content, override or "stop"


def chat_completion(
    chat: Chat,
    content: str | None,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A ``chat.completion`` object, as ``POST /v1/chat/completions`` answers and as the
    ``response.body`` of a batch output line."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_fake0000",
    }
