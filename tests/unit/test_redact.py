"""``listener.redact``: URLs, free text and DSNs, and the places that must use it."""

from __future__ import annotations

import io
import json

import pytest
from loguru import logger
from yarl import URL

from listener.errors import InvalidURL, RejectedByProvider
from listener.ops.logs import configure_logging
from listener.queue.retry import describe
from listener.redact import check_dsn, redact_text, redact_url
from listener.settings import Settings


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://u:p@host.example/a/b.jpg?sig=x#y", "https://host.example/a/b.jpg"),
        ("https://user:HUSH42@host/a.jpg", "https://host/a.jpg"),
        # A password with unescaped delimiters is removed whole, not read as host:port.
        ("https://user:12#HUSH42@host/a.jpg", "https://host/a.jpg"),
        ("https://user:pa/HUSH42@host/a.jpg", "https://host/a.jpg"),
        ("postgresql://app:12/HUSH42@db:5432/app", "postgresql://db:5432/app"),
        ("postgresql://app:p@HUSH42@db/app", "postgresql://db/app"),
        # An "@" in a path or query is not user info.
        ("https://cdn.example.com/img@2x.png?token=HUSH42", "https://cdn.example.com/img@2x.png"),
        ("https://host.example:8443/p/@me/a.jpg", "https://host.example:8443/p/@me/a.jpg"),
        ("https://xn--a.com/a.jpg?token=HUSH42", "https://xn--a.com/a.jpg"),
        ("http://[::1", "<unparsable URL>"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_reads_a_parsed_url_like_its_text() -> None:
    assert redact_url(URL("https://user:12/HUSH42@host/a.jpg?token=t")) == "https://host/a.jpg"
    assert redact_url(URL("https://host/a%20b.jpg?x=1")) == "https://host/a b.jpg"


@pytest.mark.parametrize(
    "text",
    [
        "HTTP 404 from https://user:HUSH42@host/a.jpg",
        "https://b.s3.amazonaws.com/a.jpg?X-Amz-Signature=HUSH42&X-Amz-Credential=HUSH42",
        "https://x.supabase.co/storage/v1/object/sign/a.jpg?token=HUSH42",
        "Authorization: Bearer HUSH42HUSH42 was refused",
        "{'Authorization': 'Basic U0VDUkVUOlNFQ1JFVA=='}",
        "authorization=AWS4-HMAC-SHA256 Credential=HUSH42/x, SignedHeaders=host, Signature=HUSH42",
        "the key Bearer sk-proj-HUSH42123 is wrong",
        "Incorrect API key provided: sk-HUSH42-abcdef",
        "access key AKIAHUSH42HUSH421234 and ASIAHUSH42HUSH425678",
        "sig: X-Amz-Signature=HUSH42; Signature=HUSH42",
        "query token=HUSH42&access_token=HUSH42&key=HUSH42&apikey=HUSH42",
        '{"password": "HUSH42", "secret": "HUSH42", "api_key": "HUSH42"}',
        "password=HUSH42 secret=HUSH42 client_secret=HUSH42",
        "dsn postgresql://app:HUSH42@db:5432/app failed",
        "dsn postgresql://app:pa/HUSH42#x@db:5432/app failed",
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiU0VDUkVUIn0.HUSH42sig",
        "cookie: session=HUSH42; other=HUSH42",
    ],
)
def test_redact_text_masks_secrets(text: str) -> None:
    redacted = redact_text(text)
    assert "HUSH42" not in redacted.upper(), redacted
    assert redact_text(redacted) == redacted  # idempotent


def test_redact_text_keeps_what_is_not_secret() -> None:
    text = (
        "HTTP 404 from https://host.example/a/b.jpg; OpenAI 400 invalid_image: Invalid image; "
        "prompt_tokens=12 max_tokens=300 monkey=banana; step local.analysis timed out after 5s"
    )
    assert redact_text(text) == text
    assert redact_text("") == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fetch http://h/a.jpg?sig=HUSH42: refused", "fetch http://h/a.jpg: refused"),
        ("fetch http://h/a.jpg?sig=HUSH42, then gave up", "fetch http://h/a.jpg, then gave up"),
        ("(see http://h/a.jpg?sig=HUSH42).", "(see http://h/a.jpg)."),
        ("from 'http://h/a.jpg?sig=HUSH42';", "from 'http://h/a.jpg';"),
    ],
)
def test_redact_text_keeps_the_punctuation_after_a_url(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_describe_redacts_every_stored_reason() -> None:
    assert describe(InvalidURL("bad https://u:HUSH42@h/a.jpg?token=HUSH42")) == (
        "bad https://h/a.jpg"
    )
    reason = describe(RuntimeError("echo: Authorization: Bearer HUSH42HUSH42"))
    assert reason == "RuntimeError: echo: Authorization: ***"
    # Redacted before the cut: a long text does not leave half a key at its end.
    long = describe(RejectedByProvider("x" * 990 + " Bearer sk-HUSH42HUSH42HUSH42"))
    assert "HUSH42" not in long and len(long) <= 1000


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:pa/HUSH42@127.0.0.1:5432/app",
        "postgresql://app:12#HUSH42@127.0.0.1:5432/app",
        "postgres://app:x?HUSH42@127.0.0.1/app",
    ],
)
def test_malformed_dsn_is_refused_without_quoting_it(dsn: str) -> None:
    with pytest.raises(ValueError, match="percent-encode") as caught:
        check_dsn(dsn)
    assert "HUSH42" not in str(caught.value) and "pa/" not in str(caught.value)
    with pytest.raises(ValueError, match="percent-encode") as caught:
        Settings(database_url=dsn).dsn()
    assert "HUSH42" not in str(caught.value)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:p%2Fss%23w@127.0.0.1:5432/app",
        "postgresql://app:p@ss@db/app",
        "postgresql://h1:5432,h2:5433/app?sslmode=require",
        "postgresql://[::1]:5432/app",
        "postgresql:///app?host=/var/run/postgresql",
        "postgresql://db/app?sslcert=/certs/a@b.pem",
    ],
)
def test_well_formed_dsns_pass(dsn: str) -> None:
    assert check_dsn(dsn) == dsn


def test_log_records_are_redacted_in_every_sink() -> None:
    stream, own = io.StringIO(), list[str]()
    configure_logging("DEBUG", json_lines=True, stream=stream)
    # A format function: loguru then does not append the traceback, which a patcher cannot
    # redact (only the sinks configure_logging installs redact their whole output).
    sink = logger.add(own.append, format=lambda _: "{message} {extra}\n")
    try:
        logger.bind(url="https://u:HUSH42@h/a.jpg?token=HUSH42", attempt=2).warning(
            "fetch {} failed: {}", "https://u:HUSH42@h/b.jpg", "Bearer sk-HUSH42HUSH42"
        )
        try:
            raise ValueError("postgresql://app:HUSH42@db/app")
        except ValueError:
            logger.exception("connect failed")
    finally:
        logger.remove(sink)
        configure_logging("INFO")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["message"] == "fetch https://h/b.jpg failed: Bearer ***"
    assert (lines[0]["url"], lines[0]["attempt"]) == ("https://h/a.jpg", 2)
    assert "ValueError: postgresql://db/app" in lines[1]["exception"]
    assert "HUSH42" not in stream.getvalue() + "".join(own)
