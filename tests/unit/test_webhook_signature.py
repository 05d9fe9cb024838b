"""The webhook signature scheme: examples, properties (hypothesis), and the documented snippet.

The receiver snippet of docs/reference/events.md is read from that page and run beside
``verify_signature``: both must refuse malformed headers without raising, and agree on every
header.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from listener.app_side.webhooks import (
    DEFAULT_TOLERANCE_S,
    event_body,
    redact_url,
    sign,
    verify_signature,
)

SECRET = "whsec_test_0123456789"
BODY = b'{"table":"public.images","job_id":7,"row_id":"7","status":"complete","event_id":3}'
EVENTS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "events.md"

# Bounded and without hypothesis's per-example deadline (a timed assertion): fast and steady.
# No example database: nothing to replay from a previous run, the same run everywhere.
PROPERTY = settings(max_examples=300, deadline=None, database=None)


def documented_verify() -> Callable[..., bool]:
    """The ``verify`` function of the Events and webhooks page, as written there."""
    blocks = re.findall(r"```python\n(.*?)```", EVENTS_PAGE.read_text(encoding="utf-8"), re.S)
    (snippet,) = [b for b in blocks if "def verify(secret: str, header: str" in b]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/reference/events.md", "exec"), namespace)
    verify: Callable[..., bool] = namespace["verify"]
    return verify


VERIFY_FROM_DOCS = documented_verify()


def test_signature_verifies_with_the_documented_scheme_and_fails_with_a_wrong_secret() -> None:
    now = int(time.time())
    header = sign(SECRET, BODY, now)
    assert header.startswith(f"t={now},v1=")
    assert VERIFY_FROM_DOCS(SECRET, header, BODY)
    assert verify_signature(SECRET, header, BODY)
    assert not VERIFY_FROM_DOCS("whsec_wrong", header, BODY)
    assert not verify_signature("whsec_wrong", header, BODY)
    assert not verify_signature(SECRET, header, BODY.replace(b"complete", b"failed"))


# NOW stands for the current Unix time (ARABIC_NOW: in Arabic-Indic digits), so that the
# timestamp passes and the rest is checked.
MALFORMED = [
    "",
    ",",
    "v1=abc",
    "t=,v1=abc",
    "t=NOW,t=NOW,v1=abc",
    "t=abc,v1=00",
    "t=²,v1=" + "0" * 64,  # '²'.isdigit() is True, int('²') raises
    "t=ARABIC_NOW,v1=" + "0" * 64,  # Arabic-Indic digits: int() takes them
    "t=+NOW,v1=" + "0" * 64,
    "t=NOW000000000000,v1=" + "0" * 64,
    "t=NOW,v1=é" + "0" * 63,  # non-ASCII: compare_digest raises TypeError on str
    "t=NOW,v1=\ud800",  # a lone surrogate (a server may decode with surrogateescape)
    "t=NOW,v1=" + "0" * 64 + ",garbage",
]


@pytest.mark.parametrize("header", MALFORMED)
def test_malformed_headers_are_refused_without_raising(header: str) -> None:
    now = str(int(time.time()))
    arabic = "".join(chr(0x0660 + int(d)) for d in now)
    header = header.replace("ARABIC_NOW", arabic).replace("NOW", now)
    assert verify_signature(SECRET, header, BODY) is False
    assert VERIFY_FROM_DOCS(SECRET, header, BODY) is False


@pytest.mark.parametrize(
    ("secret", "header", "body"),
    [
        (SECRET, None, BODY),
        (SECRET, b"t=1,v1=00", BODY),
        (SECRET, "t=1,v1=00", "a str body"),
        (SECRET, "t=1,v1=00", None),
        (None, "t=1,v1=00", BODY),
        ("\ud800", sign("x", BODY, 1_700_000_000), BODY),  # not encodable as UTF-8
    ],
)
def test_arguments_of_the_wrong_type_are_refused(secret: Any, header: Any, body: Any) -> None:
    assert verify_signature(secret, header, body, now=1_700_000_000) is False


def test_stale_timestamps_rotation_and_whitespace() -> None:
    old = int(time.time()) - 3600
    assert not verify_signature(SECRET, sign(SECRET, BODY, old), BODY)
    assert verify_signature(SECRET, sign(SECRET, BODY, old), BODY, now=old + 10)
    assert not verify_signature(SECRET, sign(SECRET, BODY, old), BODY, now=float("nan"))
    assert not verify_signature(
        SECRET, sign(SECRET, BODY, old), BODY, now=old, tolerance_s=float("nan")
    )
    now = int(time.time())
    good = sign(SECRET, BODY, now).rpartition("v1=")[2]
    # Rotation: any one matching v1 entry is enough; others of any shape match nothing.
    assert verify_signature(SECRET, f"t={now},v1=00ff,v1={good.upper()},v1={good}", BODY)
    assert not verify_signature(SECRET, f"t={now},v1={good.upper()}", BODY)
    # Spaces and tabs around parts, keys and values; other schemes are ignored.
    assert verify_signature(SECRET, f" t = {now} ,\tv1={good}\t, v0=whatever", BODY)
    assert VERIFY_FROM_DOCS(SECRET, f" t = {now} ,\tv1={good}\t, v0=whatever", BODY)
    # The HMAC covers t as sent: the same instant with a leading zero is another payload.
    assert not verify_signature(SECRET, f"t=0{now},v1={good}", BODY)


def test_the_body_carries_the_event_id_under_the_signature() -> None:
    stored = '{"table": "public.images", "job_id": 7, "row_id": "7é", "status": "complete"}'
    body = event_body(3, stored)
    assert body == event_body(3, stored)  # the same bytes on every attempt
    assert json.loads(body) == {**json.loads(stored), "event_id": 3}
    assert "7é".encode() in body and b" " not in body.replace(b"public.images", b"")
    assert json.loads(event_body(4, '{"event_id": 99, "a": 1}')) == {"event_id": 4, "a": 1}
    for bad in ("[1, 2]", "null", "not json"):
        with pytest.raises(ValueError):
            event_body(3, bad)

    # A receiver deduplicating on the body's event_id: another id under the same signature
    # (an attacker replaying a captured delivery as a new event) does not verify.
    now = int(time.time())
    header = sign(SECRET, body, now)
    assert verify_signature(SECRET, header, body)
    replayed = event_body(4, stored)
    assert json.loads(replayed)["event_id"] == 4
    assert not verify_signature(SECRET, header, replayed)
    assert not VERIFY_FROM_DOCS(SECRET, header, replayed)


# -- properties --

# Anything a header may hold: every code point, lone surrogates included (a server may decode
# header bytes with surrogateescape), and the characters the parser splits on.
any_char = st.characters(codec=None, exclude_categories=["Cn"]) | st.characters(categories=["Cs"])
# Digits of several scripts, and characters that str.isdigit() takes but int() refuses.
DIGITS = "0123456789²³¹\u0661\u0663\u0967\uff11"
TOKENS = ["t", "v1", "v0", "=", ",", " ", "\t", *DIGITS, "a", "f", "F"]
# Token soup: the separators, keys and digits in any order.
header_text = st.lists(st.sampled_from(TOKENS) | st.text(any_char, max_size=8), max_size=24).map(
    "".join
)
# Headers shaped like the real one: known keys (spaced or not) with values that almost pass.
part_key = st.sampled_from(["t", "v1", " t", "v1 ", "\tt", "v0"]) | st.text(any_char, max_size=4)
part_value = (
    st.text(st.sampled_from(DIGITS), min_size=1, max_size=14)
    | st.text(st.sampled_from("0123456789abcdefABCDEF"), min_size=63, max_size=65)
    | st.text(any_char, min_size=64, max_size=64)
    | st.text(any_char, max_size=8)
)
shaped_headers = st.lists(
    st.tuples(part_key, part_value).map("=".join) | st.text(any_char, max_size=6), max_size=6
).map(",".join)
secrets = st.text(any_char, max_size=80)


@PROPERTY
@given(
    secret=secrets,
    header=shaped_headers | header_text | st.text(any_char),
    body=st.binary(max_size=256),
)
@example(secret=SECRET, header="t=²,v1=" + "0" * 64, body=BODY)
@example(secret=SECRET, header="t=1,v1=é", body=BODY)
def test_any_header_gives_a_bool_and_never_raises(secret: str, header: str, body: bytes) -> None:
    assert isinstance(verify_signature(secret, header, body), bool)
    # Any t of 1 to 12 digits in time: the HMAC and the comparisons run too.
    assert isinstance(verify_signature(secret, header, body, now=0.0, tolerance_s=1e13), bool)
    # The snippet's secret is the receiver's own (its encode() may raise on a lone surrogate).
    assert isinstance(VERIFY_FROM_DOCS(SECRET, header, body), bool)


utf8_secrets = st.text(max_size=80)  # no lone surrogates: sign can encode them
timestamps = st.integers(min_value=0, max_value=10**12 - 1)
offsets = st.integers(min_value=-DEFAULT_TOLERANCE_S, max_value=DEFAULT_TOLERANCE_S)


@PROPERTY
@given(secret=utf8_secrets, body=st.binary(max_size=256), t=timestamps, offset=offsets)
def test_a_signed_header_verifies_within_the_tolerance(
    secret: str, body: bytes, t: int, offset: int
) -> None:
    assert verify_signature(secret, sign(secret, body, t), body, now=t + offset)


@PROPERTY
@given(
    secret=utf8_secrets, body=st.binary(max_size=256), other=st.binary(max_size=256), t=timestamps
)
def test_a_changed_body_does_not_verify(secret: str, body: bytes, other: bytes, t: int) -> None:
    assume(body != other)
    assert not verify_signature(secret, sign(secret, body, t), other, now=t)


@PROPERTY
@given(secret=utf8_secrets, other=utf8_secrets, body=st.binary(max_size=256), t=timestamps)
def test_a_changed_secret_does_not_verify(secret: str, other: str, body: bytes, t: int) -> None:
    # HMAC pads a short key with zero bytes (RFC 2104, section 2): "k" and "k\0" are one key.
    assume(secret.rstrip("\0") != other.rstrip("\0"))
    assert not verify_signature(other, sign(secret, body, t), body, now=t)


@PROPERTY
@given(
    secret=utf8_secrets,
    body=st.binary(max_size=256),
    t=timestamps,
    late=st.integers(min_value=DEFAULT_TOLERANCE_S + 1, max_value=10**9),
    sign_of_late=st.sampled_from([-1, 1]),
)
def test_a_stale_timestamp_does_not_verify(
    secret: str, body: bytes, t: int, late: int, sign_of_late: int
) -> None:
    assert not verify_signature(secret, sign(secret, body, t), body, now=t + sign_of_late * late)


@st.composite
def assembled_headers(draw: st.DrawFn, good_t: str, good_v1: str) -> tuple[str, bool]:
    """A header made of labelled parts, and whether it should verify: exactly one ``t`` part,
    a valid one, at least one correct ``v1``, and no part without ``=``."""
    ows = st.sampled_from(["", " ", "\t", "  "])
    valued = {
        "t_good": st.just(good_t),
        "t_bad": st.sampled_from(["", "²", "٣", "+1", "-1", "1e3", "0x1", " ", good_t + "0" * 12])
        | st.text(any_char, max_size=6).filter(
            lambda v: not re.fullmatch(r"[0-9]{1,12}", v.strip(" \t"))
        ),
        "v1_good": st.just(good_v1),
        "v1_bad": st.sampled_from([good_v1.upper(), good_v1[:-1], good_v1 + "0", "é" * 64])
        | st.text(any_char, max_size=6),
        "other": st.text(any_char, max_size=6),
    }
    kinds = draw(st.lists(st.sampled_from([*valued, "no_equals"]), max_size=6))
    parts = []
    for kind in kinds:
        if kind == "no_equals":
            no_equals = st.text(any_char, max_size=6).filter(lambda p: not {"=", ","} & set(p))
            parts.append(draw(no_equals))
            continue
        key = {"t_good": "t", "t_bad": "t", "v1_good": "v1", "v1_bad": "v1"}.get(kind)
        if key is None:
            # A key without "=" or "," (they would end it), and none of the two known ones.
            key = draw(
                st.text(any_char, max_size=4).filter(
                    lambda k: not {"=", ","} & set(k) and k.strip(" \t") not in ("t", "v1")
                )
            )
        value = draw(valued[kind].filter(lambda v: "," not in v))
        parts.append(f"{draw(ows)}{key}{draw(ows)}={draw(ows)}{value}{draw(ows)}")
    verifies = (
        kinds.count("t_good") == 1
        and kinds.count("t_bad") == 0
        and "v1_good" in kinds
        and "no_equals" not in kinds
    )
    return ",".join(parts), verifies


@PROPERTY
@given(data=st.data())
def test_verify_signature_and_the_documented_snippet_agree_on_assembled_headers(
    data: st.DataObject,
) -> None:
    now = int(time.time())
    good_v1 = sign(SECRET, BODY, now).rpartition("v1=")[2]
    header, verifies = data.draw(assembled_headers(str(now), good_v1))
    # The documented snippet reads the clock itself; t is within a second of it, far inside the
    # 300 s tolerance.
    assert verify_signature(SECRET, header, BODY, now=now) is verifies
    assert VERIFY_FROM_DOCS(SECRET, header, BODY) is verifies


def test_redacted_url_keeps_no_credentials_query_or_fragment() -> None:
    shown = redact_url("https://user:pw@hooks.example.com:8443/in/abc?token=s3cret#frag")
    assert shown == "https://hooks.example.com:8443/in/abc"
