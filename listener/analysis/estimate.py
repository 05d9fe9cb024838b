"""Cost and time estimate of analysing N images, before spending anything. Pure.

For each step of the plan: how many images reach it (tier 2 only above the quality gate,
tier 3 only for large images), the calls and tokens that takes, what it costs at realtime and
at batch prices (the discount of the provider's batch backend, ``BATCH_BACKENDS``; a provider
without one costs the same either way), and how long it takes at the configured rate limits.

Inputs come from two places. A *sample* of the images (their sizes, read from the image
headers) gives OpenAI's image tokens (``listener.analysis.costs.image_tokens``) and the share of
images
over the tier-3 size gate. *History* (the averages of results already recorded, per step)
gives output tokens, calls per image and the share of images that pass the tier-2 quality
gate; without history, the priors below are used and the estimate says so. History also
gives the share of each step's results that deduplication copied instead of paying for: the
expected saving (``dedup_usd``) if the new images repeat as often. Identical bytes cannot be
known before the images are fetched, so it is a projection, not a count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from listener.analysis.costs import cost_usd, image_tokens, price_for, text_tokens
from listener.analysis.dedup import NEVER_REUSED
from listener.analysis.pipeline import Plan
from listener.analysis.providers.base import BATCH_BACKENDS
from listener.settings import Price, Settings

MESSAGE_OVERHEAD_TOKENS = 60
"""Tokens of the request around the prompt: roles, the JSON schema's name and fields."""

PRIOR_OUTPUT_TOKENS = {"tier1": 60, "tier2": 220, "tier3": 260}
"""Output tokens per call assumed without history (a one-line answer, a parts list, a review)."""

PRIOR_FACES_PER_IMAGE = 1.0
"""Faces per image assumed without history (IndexFaces + one SearchFaces per face)."""


@dataclass(frozen=True, slots=True)
class StepHistory:
    """Averages of a step's recorded results.

    Attributes:
        results: how many results the averages are over.
        input_tokens, output_tokens, calls: per result.
        pass_rate: share of jobs with a tier-1 result that also have this step's result
            (the gate's pass rate; 1.0 for tier-1 steps).
        reuse_rate: share of the results that were copies of a duplicate image's result
            (deduplication, ``listener.analysis.dedup``); the averages above are over the others.
    """

    results: int
    input_tokens: float
    output_tokens: float
    calls: float
    pass_rate: float
    reuse_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class StepEstimate:
    """What one step will take for the images of a backfill, before deduplication.

    ``dedup_usd`` is the part of ``realtime_usd`` that deduplication is expected to save if
    the images repeat as often as in the step's history (``StepHistory.reuse_rate``); 0
    without history or with deduplication off.
    """

    step: str
    provider: str
    tier: int
    images: int
    calls: int
    input_tokens: int
    output_tokens: int
    realtime_usd: float
    batch_usd: float
    basis: str
    dedup_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class Estimate:
    """The whole estimate: per step, totals (before deduplication; ``dedup_usd`` is the
    expected saving at realtime prices), and the time at the rate limits (seconds)."""

    images: int
    steps: list[StepEstimate]
    realtime_usd: float
    batch_usd: float
    seconds: float
    bottleneck: str | None
    dedup_usd: float = 0.0


def estimate(
    plan: Plan,
    images: int,
    sizes: Sequence[tuple[int, int]],
    history: Mapping[str, StepHistory],
    settings: Settings,
    prompts: Mapping[str, str],
    *,
    dedup: bool = False,
) -> Estimate:
    """Estimate ``images`` images through ``plan``.

    Args:
        plan: the steps and gates.
        images: how many images.
        sizes: (width, height) of a sample of them; empty: unknown (no tier-3 gate applied,
            1024 x 1024 for image tokens).
        history: per step name, averages of recorded results.
        settings: prices, OpenAI detail and models, rate limits.
        prompts: the prompt of each OpenAI kind (``tier1``...), for its tokens.
        dedup: deduplication is on: each step's expected saving is its cost times the share
            of its recent results that were copies (``StepHistory.reuse_rate``).
    """
    sample = list(sizes) or [(1024, 1024)]
    steps: list[StepEstimate] = []
    calls_by_provider: dict[str, float] = {}
    tokens_by_provider: dict[str, float] = {}
    for step in plan.steps:
        past = history.get(step.name)
        if step.tier == 3:
            share = sum(1 for w, h in sample if min(w, h) >= plan.tier3_min_side) / len(sample)
            share = share if sizes else (past.pass_rate if past else 1.0)
        elif step.tier == 2:
            share = past.pass_rate if past else 1.0
        else:
            share = 1.0
        n = round(images * share)
        basis = f"history of {past.results} results" if past else "priors (no history yet)"
        calls = input_tokens = output_tokens = 0.0
        model: str | None = None
        # A history of copies only says nothing of tokens: the priors stand in for it.
        paid_past = past if past is not None and past.reuse_rate < 1.0 else None
        if step.provider == "openai":
            model = getattr(settings.openai, f"{step.kind}_model")
            per_image = (
                sum(image_tokens(w, h, settings.openai.detail) for w, h in sample) / len(sample)
                + text_tokens(prompts.get(step.kind, ""))
                + MESSAGE_OVERHEAD_TOKENS
            )
            if paid_past:
                per_image = paid_past.input_tokens
            calls = n
            input_tokens = n * per_image
            output_tokens = n * (
                paid_past.output_tokens if paid_past else PRIOR_OUTPUT_TOKENS[step.kind]
            )
        elif step.provider == "rekognition":
            per_image = 1.0 if step.kind == "labels" else 1.0 + PRIOR_FACES_PER_IMAGE
            calls = n * (paid_past.calls if paid_past else per_image)
        price: Price = price_for(settings.prices, step.provider, model)
        realtime = cost_usd(
            price,
            calls=round(calls) if step.provider != "openai" else 0,
            input_tokens=round(input_tokens),
            output_tokens=round(output_tokens),
        )
        offer = BATCH_BACKENDS.get(step.provider)
        batch = realtime * offer.discount if offer is not None else realtime
        reuse = 0.0
        if dedup and past is not None and step.name not in NEVER_REUSED:
            reuse = past.reuse_rate
        steps.append(
            StepEstimate(
                step.name,
                step.provider,
                step.tier,
                n,
                round(calls),
                round(input_tokens),
                round(output_tokens),
                realtime,
                batch,
                basis,
                realtime * reuse,
            )
        )
        calls_by_provider[step.provider] = calls_by_provider.get(step.provider, 0.0) + calls
        tokens_by_provider[step.provider] = (
            tokens_by_provider.get(step.provider, 0.0) + input_tokens + output_tokens
        )
    seconds, bottleneck = 0.0, None
    for provider, calls in calls_by_provider.items():
        limit = settings.rate_limit(provider)
        needed = calls / limit.rps if not math.isinf(limit.rps) else 0.0
        tpm = settings.openai.tokens_per_minute if provider == "openai" else None
        if tpm:
            needed = max(needed, tokens_by_provider[provider] / tpm * 60.0)
        if needed > seconds:
            seconds, bottleneck = needed, provider
    return Estimate(
        images,
        steps,
        sum(s.realtime_usd for s in steps),
        sum(s.batch_usd for s in steps),
        seconds,
        bottleneck,
        sum(s.dedup_usd for s in steps),
    )
