"""Deciding about transaction-mode poolers without touching a database: URLs and settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from listener.db.connect import (
    Database,
    PoolerError,
    check_listen_dsn,
    resolve_database,
    url_says_transaction_pooler,
)
from listener.settings import Settings

SUPABASE_TX = "postgresql://postgres.abcd:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres"
SUPABASE_SESSION = (
    "postgresql://postgres.abcd:pw@aws-0-eu-central-1.pooler.supabase.com:5432/postgres"
)
SUPABASE_DIRECT = "postgresql://postgres:pw@db.abcd.supabase.co:5432/postgres"
# Nothing listens on port 1: a probe would fail with OSError, so these tests prove none ran.
UNREACHABLE = "postgresql://u@127.0.0.1:1/db"


@pytest.mark.parametrize(
    ("url", "pooled"),
    [
        (SUPABASE_TX, True),
        ("postgresql://postgres:pw@db.abcd.supabase.co:6543/postgres", True),
        (SUPABASE_SESSION, False),
        (SUPABASE_DIRECT, False),
        ("postgresql://u@localhost/db", False),
        ("postgresql://u@localhost:6432/db", False),  # PgBouncer's port: mode unknown, probed
        ("host=localhost port=6543", False),  # not a URL: no guess
    ],
)
def test_the_url_alone_recognises_supabase_transaction_mode(url: str, pooled: bool) -> None:
    assert url_says_transaction_pooler(url) is pooled


async def test_explicit_modes_and_port_6543_need_no_probe() -> None:
    assert (await resolve_database(UNREACHABLE, "transaction")).transaction_pooler
    assert not (await resolve_database(UNREACHABLE, "none", listen_dsn=SUPABASE_DIRECT)).options()
    supabase = await resolve_database(SUPABASE_TX, "auto", probe=True)
    assert supabase.transaction_pooler and supabase.reason == "port 6543"
    assert supabase.options() == {"statement_cache_size": 0}
    plain = await resolve_database(UNREACHABLE, "auto")
    assert not plain.transaction_pooler and plain.options() == {}


async def test_listen_needs_a_direct_url_when_the_database_url_is_pooled() -> None:
    pooled = Database(SUPABASE_TX, True, "port 6543")
    with pytest.raises(PoolerError, match="set LISTENER_LISTEN_DATABASE_URL to a direct") as e:
        await check_listen_dsn(pooled, None, "auto")
    assert "supabase.com" not in str(e.value) and "pw" not in str(e.value)
    with pytest.raises(PoolerError, match="where LISTEN cannot work"):
        await check_listen_dsn(pooled, SUPABASE_TX, "transaction")
    with pytest.raises(PoolerError, match="uses port 6543"):
        await check_listen_dsn(Database(SUPABASE_DIRECT), SUPABASE_TX, "auto")
    # LISTENER_POOLER=none trusts the URLs as they are.
    assert await check_listen_dsn(Database(SUPABASE_DIRECT), SUPABASE_TX, "none") == SUPABASE_TX


def test_the_setting_reads_listener_pooler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTENER_POOLER", "transaction")
    assert Settings(_env_file=None).pooler == "transaction"  # type: ignore[call-arg]
    assert Settings(_env_file=None, pooler="none").pooler == "none"  # type: ignore[call-arg]
    monkeypatch.setenv("LISTENER_POOLER", "pgbouncer")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]
