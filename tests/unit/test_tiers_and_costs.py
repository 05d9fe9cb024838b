"""Pure parts of the paid pipeline: plans and gates, costs, fleet GCRA, faces, budget."""

from __future__ import annotations

import io
import itertools
from datetime import UTC, datetime

import pytest
from PIL import Image

from listener.analysis.budget import Budget
from listener.analysis.costs import cost_usd, image_tokens, price_for
from listener.analysis.faces import classify, collection_id, safe_id
from listener.analysis.pipeline import PipelineError, build_plan, skip_reason, tier1_quality
from listener.analysis.providers.openai import parse_duration, rate_hints, retry_after
from listener.analysis.providers.rekognition import prepare_image
from listener.analysis.ratelimit import FleetState, fleet_correct, fleet_pause, fleet_reserve
from listener.errors import BudgetExhausted
from listener.settings import Price, TierSettings


def test_plans() -> None:
    assert [s.name for s in build_plan("local", TierSettings()).steps] == ["local.analysis"]
    assert [s.name for s in build_plan("noop", TierSettings()).steps] == ["noop.noop"]
    tiers = TierSettings(
        tier1=["local", "rekognition", "openai"], tier2=["openai"], tier3=["openai"], faces=True
    )
    plan = build_plan("tiered", tiers)
    assert [(s.name, s.tier) for s in plan.steps] == [
        ("local.analysis", 1),
        ("rekognition.labels", 1),
        ("openai.tier1", 1),
        ("rekognition.faces", 1),
        ("openai.tier2", 2),
        ("openai.tier3", 3),
    ]
    assert plan.providers == ["local", "rekognition", "openai"]
    with pytest.raises(PipelineError, match="'local' has no tier 2"):
        build_plan("tiered", TierSettings(tier1=["openai"], tier2=["local"]))
    with pytest.raises(PipelineError, match="at least one tier-1"):
        build_plan("tiered", TierSettings(tier1=[]))


def test_tier_gates() -> None:
    plan = build_plan(
        "tiered",
        TierSettings(
            tier1=["local", "openai"],
            tier2=["openai"],
            tier3=["openai"],
            tier2_min_quality=6,
            tier3_min_side=1500,
        ),
    )
    tier2, tier3 = plan.steps[2], plan.steps[3]
    low = {"local.analysis": {"quality": 9.0}, "openai.tier1": {"quality": 5}}
    assert tier1_quality(low) == 5.0  # OpenAI's judgement wins over the local score
    assert skip_reason(tier2, plan, low, 4000, 3000) == "tier 2 skipped: quality 5 <= 6"
    assert skip_reason(tier2, plan, {"openai.tier1": {"quality": 7}}, 10, 10) is None
    assert skip_reason(tier2, plan, {}, 10, 10) == "tier 2 skipped: no tier-1 quality"
    assert skip_reason(tier3, plan, {}, 2000, 1499) is not None
    assert skip_reason(tier3, plan, {}, 1500, 2000) is None


def test_image_tokens_follow_openai_rule() -> None:
    assert image_tokens(4000, 3000, "low") == 85
    assert image_tokens(1024, 1024, "high") == 85 + 170 * 4  # 768x768 -> 2x2 tiles
    assert image_tokens(2048, 4096, "high") == 85 + 170 * 6  # 768x1536 -> 2x3 tiles
    assert image_tokens(512, 512, "high") == 85 + 170


def test_costs() -> None:
    prices = {"openai:gpt-4o-mini": Price(per_million_input_usd=0.15, per_million_output_usd=0.6)}
    prices["rekognition"] = Price(per_call_usd=0.001)
    mini = price_for(prices, "openai", "gpt-4o-mini")
    assert cost_usd(mini, input_tokens=1_000_000, output_tokens=500_000) == pytest.approx(0.45)
    assert cost_usd(price_for(prices, "rekognition", "7.0"), calls=3) == pytest.approx(0.003)
    assert cost_usd(price_for(prices, "local", None), calls=10) == 0


def test_fleet_gcra_spaces_requests_and_tokens() -> None:
    state = FleetState(0.0, 0.0, 0.0)
    starts = [fleet_reserve(state, 100.0, rps=10, burst=1) for _ in range(30)]
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(starts)}
    assert starts[0] == 100.0 and gaps == {0.104}
    # Any one-second window holds at most 10 starts.
    assert max(sum(1 for s in starts if t <= s < t + 1) for t in starts) <= 10

    burst = FleetState(0.0, 0.0, 0.0)
    assert [fleet_reserve(burst, 50.0, rps=10, burst=3) for _ in range(3)] == [50.0] * 3

    tokens = FleetState(0.0, 0.0, 0.0)
    first = fleet_reserve(tokens, 0.0, rps=100, burst=1, tokens=600, tokens_per_minute=1000)
    second = fleet_reserve(tokens, 0.0, rps=100, burst=1, tokens=600, tokens_per_minute=1000)
    assert first == 0.0 and second == pytest.approx(12.0)  # 1,200 tokens: 200 over a minute
    # Without a refund, 100 more tokens would wait until 18 s (1,300 tokens, 300 over).
    fleet_correct(tokens, -600, 1000)  # the first call used nothing: refund it
    third = fleet_reserve(tokens, 0.0, rps=100, burst=1, tokens=100, tokens_per_minute=1000)
    assert third == pytest.approx(second + 0.0104)  # only the request spacing remains


def test_fleet_pause_holds_every_request() -> None:
    state = FleetState(0.0, 0.0, 0.0)
    fleet_pause(state, 10.0, 30.0)
    fleet_pause(state, 10.0, 5.0)  # a shorter pause never shortens a longer one
    assert fleet_reserve(state, 11.0, rps=10, burst=5) == 40.0


def test_face_decisions_and_ids() -> None:
    assert classify(99.0, 95, 80) == "assigned"
    assert classify(95.0, 95, 80) == "assigned"
    assert classify(88.0, 95, 80) == "suggested"
    assert classify(79.9, 95, 80) == "new"
    assert classify(None, 95, 80) == "new"
    assert collection_id("listener", "user_42") == "listener-user_42"
    odd = collection_id("listener", "a/b c@d")
    assert odd.startswith("listener-a_b_c_d-") and odd != collection_id("listener", "a_b c@d")
    assert safe_id("x" * 300) != safe_id("x" * 301) and len(safe_id("x" * 300)) <= 255


async def test_budget_defers_paid_work_once_spent() -> None:
    spent = {"openai": 0.4}
    reads = []

    async def spend_since(since: datetime) -> dict[str, float]:
        reads.append(since)
        return dict(spent)

    noon = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    clock = [0.0]
    budget = Budget(1.0, spend_since, cache_s=2.0, clock=lambda: clock[0], now=lambda: noon)
    await budget.check()
    spent["rekognition"] = 0.6
    await budget.check()  # cached reading
    clock[0] = 5.0
    with pytest.raises(BudgetExhausted, match=r"\$1.0000 spent today of \$1.00") as info:
        await budget.check()
    # One snooze per job until midnight UTC, held by the budget (listener resume budget).
    assert info.value.retry_after == 12 * 3600.0 and info.value.held_by == "budget"
    assert reads[0] == datetime(2026, 11, 21, tzinfo=UTC)


def test_openai_header_parsing() -> None:
    assert parse_duration("6m0s") == 360.0
    assert parse_duration("1s") == 1.0
    assert parse_duration("120ms") == pytest.approx(0.12)
    assert parse_duration("20") == 20.0 and parse_duration(None) is None
    headers = {"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "7.5s"}
    assert retry_after(headers) == 7.5
    assert retry_after({"retry-after": "3", **headers}) == 3.0
    hints = rate_hints({"x-ratelimit-remaining-requests": "0", **headers})
    assert hints.remaining_requests == 0 and hints.reset_requests_s == 2.0


def test_rekognition_image_preparation() -> None:
    png = io.BytesIO()
    Image.new("RGB", (100, 100), (10, 20, 30)).save(png, format="PNG")
    assert prepare_image(png.getvalue(), "PNG") == png.getvalue()
    gif = io.BytesIO()
    Image.new("RGB", (100, 100)).save(gif, format="GIF")
    converted = prepare_image(gif.getvalue(), "GIF")
    assert converted[:3] == b"\xff\xd8\xff"
    noisy = Image.effect_noise((1600, 1600), 120).convert("RGB")
    big = io.BytesIO()
    noisy.save(big, format="PNG")
    assert len(big.getvalue()) > 1_000_000
    small = prepare_image(big.getvalue(), "PNG", max_bytes=500_000)
    assert len(small) <= 500_000
    with Image.open(io.BytesIO(small)) as img:
        assert img.format == "JPEG" and img.width < 1600


def test_batch_prices_come_from_the_providers_batch_backends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from listener.analysis import estimate as estimate_module
    from listener.analysis.estimate import StepHistory, estimate
    from listener.analysis.pipeline import Plan, Step
    from listener.analysis.providers.base import BATCH_BACKENDS, BatchOffer
    from listener.analysis.providers.local import LocalProvider
    from listener.analysis.providers.noop import NoopProvider
    from listener.analysis.providers.openai import OpenAIProvider
    from listener.analysis.providers.rekognition import RekognitionProvider
    from listener.settings import Settings

    # The registry names exactly the providers that implement a batch backend, each at the
    # discount its class charges.
    batch_methods = ("request_body", "parse_body", "create_batch", "list_batches")
    classes = (LocalProvider, NoopProvider, OpenAIProvider, RekognitionProvider)
    backends = {c.name: c for c in classes if all(hasattr(c, m) for m in batch_methods)}
    assert set(backends) == set(BATCH_BACKENDS) == {"openai"}
    for name, cls in backends.items():
        assert BATCH_BACKENDS[name].provider == name
        assert cls.batch_discount == BATCH_BACKENDS[name].discount == 0.5

    # The estimate reads the registry, not a provider's name: another discount, or another
    # provider with a batch backend, changes its batch prices.
    tier1 = Step("openai.tier1", "openai", "tier1", 1)
    labels = Step("rekognition.labels", "rekognition", "labels", 1)
    plan = Plan((tier1, labels))
    history = {
        tier1.name: StepHistory(100, 1000.0, 100.0, 1.0, 1.0),
        labels.name: StepHistory(100, 0, 0, 1.0, 1.0),
    }
    settings = Settings(prices={"rekognition": Price(per_call_usd=0.001)})
    openai_step, rekognition_step = estimate(plan, 1000, [], history, settings, {}).steps
    assert openai_step.batch_usd == pytest.approx(openai_step.realtime_usd * 0.5)
    assert rekognition_step.batch_usd == rekognition_step.realtime_usd  # no batch backend
    monkeypatch.setattr(
        estimate_module,
        "BATCH_BACKENDS",
        {
            "openai": BatchOffer("openai", 0.25, "test"),
            "rekognition": BatchOffer("rekognition", 0.8, "test"),
        },
    )
    openai_step, rekognition_step = estimate(plan, 1000, [], history, settings, {}).steps
    assert openai_step.batch_usd == pytest.approx(openai_step.realtime_usd * 0.25)
    assert rekognition_step.batch_usd == pytest.approx(rekognition_step.realtime_usd * 0.8)
