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


# Unknown names and invalid values, in the user's terms (listener.cli.settings_check) ---------


def _every_variable() -> list[str]:
    """Every variable the settings reference lists, and per-key forms of every dict setting."""
    from pydantic import BaseModel

    from listener.cli.settings_check import OTHER_VARIABLES

    names = list(OTHER_VARIABLES)
    for name, field in Settings.model_fields.items():
        top = f"LISTENER_{name.upper()}"
        names.append(top)
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            names += [f"{top}__{sub.upper()}" for sub in type(default).model_fields]
        if isinstance(default, dict):
            for key, value in default.items():
                names.append(f"{top}__{key.upper()}")
                if isinstance(value, BaseModel):
                    names += [
                        f"{top}__{key.upper()}__{sub.upper()}" for sub in type(value).model_fields
                    ]
    return names


def test_every_setting_nested_and_per_key_is_known() -> None:
    from listener.cli.settings_check import unknown_settings

    names = _every_variable()
    assert {
        "LISTENER_FETCH__MAX_BYTES",
        "LISTENER_OPENAI__API_KEY",
        "LISTENER_TIERS__TIER1",
        "LISTENER_RATE_LIMITS__OPENAI__RPS",
        "LISTENER_STEP_TIMEOUTS__LOCAL",
        "LISTENER_PRICES__REKOGNITION__PER_CALL_USD",
        "LISTENER_PG_BINDIR",
        "LISTENER_STRICT_SETTINGS",
        "LISTENER_DATABASE_URL",
    } <= set(names)
    environ = dict.fromkeys(names, "1")
    # Any provider may be given limits; names are matched in any case.
    environ |= {"LISTENER_RATE_LIMITS__MYPROVIDER__BURST": "2", "listener_concurrency": "3"}
    assert unknown_settings(environ, {"DATABASE_URL": "x", "POSTGRES_PASSWORD": "y"}) == []


def test_every_listener_variable_the_project_names_is_known() -> None:
    """A LISTENER_* name read or set anywhere in the project (code, scripts, docs, the
    Dockerfile) is a setting or one of OTHER_VARIABLES: none is ever flagged."""
    import re
    import subprocess
    from pathlib import Path

    from listener.cli.settings_check import is_known

    root = Path(__file__).resolve().parents[2]
    # The docs show a misspelling; these tests are full of them.
    misspelled_on_purpose = {"LISTENER_CONCURENCY"}
    skipped = {"tests/unit/test_settings.py", "tests/integration/test_cli.py"}
    files = subprocess.run(
        ["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    unknown = set()
    for name in files:
        path = root / name
        if name in skipped or path.suffix in {".png", ".jpg"} or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for found in re.findall(r"LISTENER_[A-Za-z0-9_]*[A-Za-z0-9]", text):
            if found.upper() not in misspelled_on_purpose and not is_known(found.upper()):
                unknown.add(f"{name}: {found}")
    assert not unknown, sorted(unknown)


@pytest.mark.parametrize(
    ("given", "closest"),
    [
        ("LISTENER_CONCURENCY", "LISTENER_CONCURRENCY"),
        ("LISTENER_FETCH__MAX_BYTE", "LISTENER_FETCH__MAX_BYTES"),
        ("LISTENER_FETCH_MAX_BYTES", "LISTENER_FETCH__MAX_BYTES"),
        ("LISTENER_OPENAI_API_KEY", "LISTENER_OPENAI__API_KEY"),
        ("LISTENER_RATE_LIMITS__OPENAI__RSP", "LISTENER_RATE_LIMITS__OPENAI__RPS"),
        ("LISTENER_TIERS__TIER_1", "LISTENER_TIERS__TIER1"),
        ("LISTENER_PG_BIN_DIR", "LISTENER_PG_BINDIR"),
        ("LISTENER_NO_SUCH_THING", None),
    ],
)
def test_the_closest_known_name_is_suggested(given: str, closest: str | None) -> None:
    from listener.cli.settings_check import suggest

    assert suggest(given) == closest


def test_unknown_names_of_the_environment_and_of_dotenv() -> None:
    from listener.cli.settings_check import unknown_settings

    found = unknown_settings(
        {"LISTENER_CONCURENCY": "5", "PATH": "/bin", "LISTENER_PG_BINDIR": "/usr/bin"},
        {
            "LISTENER_CONCURENCY": "6",  # the environment's copy is reported, once
            "listener_fetch__max_byte": "5",
            "POSTGRES_PASSWORD": "compose's, not ours",
            "LISTENER_NO_SUCH_THING": "1",
        },
        ".env",
    )
    assert [u.message() for u in found] == [
        "unknown setting LISTENER_CONCURENCY: did you mean LISTENER_CONCURRENCY?",
        "unknown setting LISTENER_NO_SUCH_THING in .env (no setting has a similar name)",
        "unknown setting listener_fetch__max_byte in .env: did you mean LISTENER_FETCH__MAX_BYTES?",
    ]
    # Log redaction would read "API_KEY: did" as a key and its value: no colon there.
    (key,) = unknown_settings({"LISTENER_OPENAI_API_KEY": "sk-x"}, {})
    assert key.message() == (
        "unknown setting LISTENER_OPENAI_API_KEY (did you mean LISTENER_OPENAI__API_KEY?)"
    )


def _invalid(monkeypatch: pytest.MonkeyPatch, **options: object) -> list[str]:
    import os

    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from listener.cli.settings_check import invalid_settings

    with pytest.raises((ValidationError, SettingsError)) as caught:
        Settings(_env_file=None, **options)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValidationError | SettingsError)
    return invalid_settings(caught.value, dict(os.environ), {}, options)


def test_invalid_values_name_the_variable_the_value_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTENER_CONCURRENCY", "abc")
    monkeypatch.setenv("LISTENER_PIPELINE", "tierd")
    monkeypatch.setenv("LISTENER_DEDUP", "sha265")
    monkeypatch.setenv("LISTENER_DEDUP_MAX_DISTANCE", "9")
    monkeypatch.setenv("LISTENER_FETCH__MAX_DECODE_BYTES", "0")
    monkeypatch.setenv("LISTENER_RATE_LIMITS__OPENAI__RPS", "fast")
    monkeypatch.setenv("LISTENER_OTEL", "maybe")
    monkeypatch.setenv("LISTENER_TIERS", '{"tier3_min_side": "big"}')
    monkeypatch.setenv("LISTENER_OPENAI__TOKENS_PER_MINUTE", "lots")
    assert sorted(_invalid(monkeypatch)) == sorted(
        [
            "invalid setting LISTENER_CONCURRENCY='abc': expected an integer >= 1",
            "invalid setting LISTENER_PIPELINE='tierd': expected one of 'local', 'noop', "
            "'tiered' (did you mean 'tiered'?)",
            "invalid setting LISTENER_DEDUP='sha265': expected one of 'off', 'sha256', "
            "'phash' (did you mean 'sha256'?)",
            "invalid setting LISTENER_DEDUP_MAX_DISTANCE='9': expected an integer >= 0 and <= 3",
            "invalid setting LISTENER_FETCH__MAX_DECODE_BYTES='0': expected an integer > 0",
            "invalid setting LISTENER_RATE_LIMITS__OPENAI__RPS='fast': expected a number",
            "invalid setting LISTENER_OTEL='maybe': expected true or false (or 1/0, yes/no, "
            "on/off)",
            "invalid setting LISTENER_TIERS: tier3_min_side='big': expected an integer",
            "invalid setting LISTENER_OPENAI__TOKENS_PER_MINUTE='lots': expected an integer",
        ]
    )


def test_an_option_is_named_as_an_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTENER_CONCURRENCY", "4")
    assert _invalid(monkeypatch, concurrency=0) == [
        "invalid option --concurrency=0: expected an integer >= 1"
    ]


def test_a_secret_value_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-proj-verysecret12345"
    monkeypatch.setenv("LISTENER_OPENAI", f'{{"api_key" "{secret}"')
    monkeypatch.setenv("LISTENER_FETCH__ALLOWED_HOSTS", "a,b")
    lines = _invalid(monkeypatch)
    assert lines == [
        "invalid setting LISTENER_FETCH__ALLOWED_HOSTS='a,b': not JSON (Expecting value); "
        "expected a JSON list",
        "invalid setting LISTENER_OPENAI=***: not JSON (Expecting ':' delimiter); "
        "expected a JSON object",
    ]
    monkeypatch.delenv("LISTENER_FETCH__ALLOWED_HOSTS")
    monkeypatch.setenv("LISTENER_OPENAI", '{"api_key": 12345678901234, "detail": "medium"}')
    lines = _invalid(monkeypatch)
    assert "invalid setting LISTENER_OPENAI: api_key=***: Input should be a valid string" in lines
    assert not any("12345678901234" in line for line in lines), lines
    assert (
        "invalid setting LISTENER_OPENAI: detail='medium': expected one of 'low', 'high'" in lines
    )
