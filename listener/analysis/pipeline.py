"""The pipeline: which steps run for an image, in which tier, and the gates between tiers.

Pure: it decides, the dispatcher does. Steps are named ``<provider>.<kind>``:

=========  ====================  ===================================================
tier       step                  what
=========  ====================  ===================================================
1          ``local.analysis``    size, EXIF, blur, exposure, quality, hash, faces
1          ``rekognition.labels`` labels and image quality (DetectLabels)
1          ``openai.tier1``      angle, category, quality 0-10, description
1          ``rekognition.faces`` faces indexed per owner and matched to people (AWS)
1          ``local.faces``       the same, offline: dlib embeddings searched in Postgres
2          ``openai.tier2``      parts and their condition, if tier-1 quality > gate
3          ``openai.tier3``      expert assessment, if the shorter side >= gate
=========  ====================  ===================================================

``LISTENER_PIPELINE=local`` is tier 1 = ``local`` alone (and ``local.faces`` with
``LISTENER_TIERS__FACES``); ``noop`` is one ``noop`` step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from listener.settings import TierSettings

KINDS: dict[str, dict[int, str]] = {
    "local": {1: "analysis"},
    "noop": {1: "noop"},
    "rekognition": {1: "labels"},
    "openai": {1: "tier1", 2: "tier2", 3: "tier3"},
}
"""The step kind each provider performs at each tier it supports."""


class PipelineError(ValueError):
    """The configured pipeline asks a provider for a tier it does not do."""


@dataclass(frozen=True, slots=True)
class Step:
    """One step: ``name`` (``provider.kind``), the provider, its kind and tier."""

    name: str
    provider: str
    kind: str
    tier: int


@dataclass(frozen=True, slots=True)
class Plan:
    """The steps of every job, in order, and the gates of tiers 2 and 3."""

    steps: tuple[Step, ...]
    tier2_min_quality: float = 6.0
    tier3_min_side: int = 1024

    @property
    def providers(self) -> list[str]:
        """Provider names, in the order they first appear."""
        return list(dict.fromkeys(s.provider for s in self.steps))


def build_plan(pipeline: str, tiers: TierSettings) -> Plan:
    """The plan for ``LISTENER_PIPELINE`` (``local``, ``noop`` or ``tiered``).

    Raises:
        PipelineError: a provider is asked for a tier it does not support, or tier 1 is empty.
    """
    if pipeline == "noop":
        return Plan((Step("noop.noop", "noop", "noop", 1),))
    if pipeline == "local":
        local = [Step("local.analysis", "local", "analysis", 1)]
        if tiers.faces:
            local.append(Step("local.faces", "local", "faces", 1))
        return Plan(tuple(local))
    steps: list[Step] = []
    for tier, providers in ((1, tiers.tier1), (2, tiers.tier2), (3, tiers.tier3)):
        for provider in providers:
            kind = KINDS.get(provider, {}).get(tier)
            if kind is None:
                known = ", ".join(f"{p} (tiers {sorted(k)})" for p, k in KINDS.items())
                raise PipelineError(f"provider {provider!r} has no tier {tier}; known: {known}")
            steps.append(Step(f"{provider}.{kind}", provider, kind, tier))
        if tier == 1 and tiers.faces:
            faces = tiers.faces_provider
            steps.append(Step(f"{faces}.faces", faces, "faces", 1))
    if not any(s.tier == 1 for s in steps):
        raise PipelineError("the tiered pipeline needs at least one tier-1 provider")
    return Plan(tuple(steps), tiers.tier2_min_quality, tiers.tier3_min_side)


def tier1_quality(outputs: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The tier-1 quality (0-10): OpenAI's judgement if it ran, else the local score."""
    for step in ("openai.tier1", "local.analysis"):
        value = outputs.get(step, {}).get("quality")
        if isinstance(value, int | float):
            return float(value)
    return None


def skip_reason(
    step: Step, plan: Plan, outputs: Mapping[str, Mapping[str, Any]], width: int, height: int
) -> str | None:
    """Why ``step`` does not run for this image, or ``None`` when it runs.

    Args:
        step: the step.
        plan: the plan, for its gates.
        outputs: outputs of the steps already done for this job, by step name.
        width, height: the image's size in pixels (0 when unknown).
    """
    if step.tier == 2:
        quality = tier1_quality(outputs)
        if quality is None:
            return "tier 2 skipped: no tier-1 quality"
        if quality <= plan.tier2_min_quality:
            return f"tier 2 skipped: quality {quality:g} <= {plan.tier2_min_quality:g}"
    if step.tier == 3:
        shorter = min(width, height)
        if shorter < plan.tier3_min_side:
            return f"tier 3 skipped: shorter side {shorter} px < {plan.tier3_min_side} px"
    return None
