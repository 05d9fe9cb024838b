"""What a step costs, and OpenAI's image token count. Pure.

Image tokens follow OpenAI's published rule for GPT-4o-class vision models
(https://platform.openai.com/docs/guides/images-vision, "Calculating costs"): ``low`` detail
is a flat 85 tokens; ``high`` detail first scales the image to fit in 2048 x 2048, then its
shorter side to 768 px, and costs 85 + 170 tokens per 512 px tile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from listener.settings import Price


def image_tokens(width: int, height: int, detail: str) -> int:
    """Input tokens of one image of ``width`` x ``height`` pixels at ``detail``."""
    if detail == "low" or width <= 0 or height <= 0:
        return 85
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return 85 + 170 * tiles


def text_tokens(text: str) -> int:
    """A rough token count of ``text``: one token per four characters (OpenAI's rule of thumb)."""
    return math.ceil(len(text) / 4)


def price_for(prices: Mapping[str, Price], provider: str, model: str | None) -> Price:
    """The price of ``provider:model``, else of ``provider``, else free."""
    if model is not None and f"{provider}:{model}" in prices:
        return prices[f"{provider}:{model}"]
    return prices.get(provider, Price())


def cost_usd(
    price: Price, *, calls: int = 0, input_tokens: int = 0, output_tokens: int = 0
) -> float:
    """USD for ``calls`` calls and the given token counts at ``price``."""
    return (
        calls * price.per_call_usd
        + input_tokens * price.per_million_input_usd / 1e6
        + output_tokens * price.per_million_output_usd / 1e6
    )
