"""The webhook signature scheme, checked against an independent verifier (README's snippet)."""

from __future__ import annotations

import hashlib
import hmac
import time

from listener.webhooks import redact_url, sign, verify_signature

SECRET = "whsec_test_0123456789"
BODY = b'{"table": "public.images", "job_id": 7, "row_id": "7", "status": "complete"}'


def readme_verify(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """The README's receiver snippet, written again from the documented scheme."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    timestamp = fields["t"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    expected = hmac.new(
        secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


def test_signature_verifies_with_the_documented_scheme_and_fails_with_a_wrong_secret() -> None:
    now = int(time.time())
    header = sign(SECRET, BODY, now)
    assert header.startswith(f"t={now},v1=")
    assert readme_verify(SECRET, header, BODY)
    assert verify_signature(SECRET, header, BODY)
    assert not readme_verify("whsec_wrong", header, BODY)
    assert not verify_signature("whsec_wrong", header, BODY)
    assert not verify_signature(SECRET, header, BODY.replace(b"complete", b"failed"))


def test_stale_or_malformed_signatures_are_refused() -> None:
    old = int(time.time()) - 3600
    assert not verify_signature(SECRET, sign(SECRET, BODY, old), BODY)
    assert verify_signature(SECRET, sign(SECRET, BODY, old), BODY, now=old + 10)
    for header in ("", "v1=abc", "t=,v1=abc", "t=1,t=2,v1=abc", "t=abc,v1=00"):
        assert not verify_signature(SECRET, header, BODY)
    # Rotation: any one matching v1 entry is enough.
    now = int(time.time())
    good = sign(SECRET, BODY, now).rpartition("v1=")[2]
    assert verify_signature(SECRET, f"t={now},v1=00ff,v1={good}", BODY)


def test_redacted_url_keeps_no_credentials_query_or_fragment() -> None:
    shown = redact_url("https://user:pw@hooks.example.com:8443/in/abc?token=s3cret#frag")
    assert shown == "https://hooks.example.com:8443/in/abc"
