"""Settings: environment variables, the DATABASE_URL fallback, secrets that never print."""

from __future__ import annotations

import pytest

from listener.settings import Settings


def test_database_url_falls_back_and_listener_prefix_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTENER_DATABASE_URL", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:s3cret@db/app")
    assert Settings(_env_file=None).dsn() == "postgresql://app:s3cret@db/app"
    monkeypatch.setenv("LISTENER_DATABASE_URL", "postgresql://l:other@db/l")
    assert Settings(_env_file=None).dsn() == "postgresql://l:other@db/l"


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTENER_DATABASE_URL", "postgresql://app:s3cret@db/app")
    monkeypatch.setenv("LISTENER_LISTEN_DATABASE_URL", "postgresql://app:s3cret@direct/app")
    settings = Settings(_env_file=None)
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)
    assert "s3cret" not in settings.model_dump_json()
    assert settings.listen_dsn() == "postgresql://app:s3cret@direct/app"


def test_missing_database_url_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTENER_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ValueError, match="LISTENER_DATABASE_URL or DATABASE_URL"):
        Settings(_env_file=None).dsn()


def test_nested_and_json_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTENER_FETCH__MAX_BYTES", "1234")
    monkeypatch.setenv("LISTENER_FETCH__ALLOWED_HOSTS", '["storage.internal", "10.0.0.0/8"]')
    monkeypatch.setenv("LISTENER_RATE_LIMITS", '{"local": {"rps": 5, "burst": 2}}')
    settings = Settings(_env_file=None)
    assert settings.fetch.max_bytes == 1234
    assert settings.fetch.allowed_hosts == ["storage.internal", "10.0.0.0/8"]
    assert settings.rate_limit("local").rps == 5 and settings.rate_limit("local").burst == 2
    assert settings.rate_limit("noop").concurrency == 100_000


def test_step_timeouts_merge_over_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTENER_STEP_TIMEOUTS", '{"local": 30, "openai": null}')
    settings = Settings(_env_file=None)
    assert settings.step_timeout("local") == 30
    assert settings.step_timeout("openai") is None
    assert settings.step_timeout("rekognition") == 90
    assert settings.step_timeout("unknown") is None
    monkeypatch.setenv("LISTENER_STEP_TIMEOUTS", '{"local": 0}')
    with pytest.raises(ValueError, match="greater than 0"):
        Settings(_env_file=None)
