"""docker-compose.yml, .env.example and the Dockerfile: parse, and expose nothing by default.

The compose file is read with PyYAML, and its ``${VAR:?message}`` / ``${VAR:-default}``
references are substituted the way Compose does (the subset this file uses), so the test sees
the values a ``docker compose up`` with a given ``.env`` would.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?:(?P<op>:\?|:-)(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset or empty."""


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """``value`` (from ``yaml.safe_load``) with every ``${...}`` substituted from ``env``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        current = env.get(match["name"], "")
        if match["op"] == ":?" and not current:
            raise MissingVariable(match["arg"])
        if match["op"] == ":-" and not current:
            return match["arg"]
        return current

    return REFERENCE.sub(substitute, value)


def compose(env: dict[str, str]) -> dict[str, Any]:
    """The compose file as Compose would see it with ``env`` (its ``.env``)."""
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    doc: dict[str, Any] = interpolate(raw, env)
    return doc


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a ``.env`` file (comments and blanks skipped)."""
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_compose_publishes_ports_on_loopback_only() -> None:
    services = compose({"POSTGRES_PASSWORD": "pw"})["services"]
    published = {name: svc.get("ports", []) for name, svc in services.items()}
    assert published["db"] == ["127.0.0.1:5432:5432"]
    assert published["listener"] == ["127.0.0.1:8080:8080"]
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_compose_takes_the_password_from_env() -> None:
    with pytest.raises(MissingVariable, match=r"set it in \.env"):
        compose({})
    with pytest.raises(MissingVariable):
        compose({"POSTGRES_PASSWORD": ""})
    services = compose({"POSTGRES_PASSWORD": "s3cr3t-pw", "LISTENER_HEALTH_TOKEN": "t0ken"})[
        "services"
    ]
    assert services["db"]["environment"]["POSTGRES_PASSWORD"] == "s3cr3t-pw"
    url = "postgresql://app:s3cr3t-pw@db:5432/app"
    assert services["listener"]["environment"]["DATABASE_URL"] == url
    assert services["listener-cli"]["environment"]["DATABASE_URL"] == url
    assert services["listener"]["environment"]["LISTENER_HEALTH_TOKEN"] == "t0ken"
    # No password is written in the file itself.
    text = (ROOT / "docker-compose.yml").read_text()
    assert "app:app@" not in text and "POSTGRES_PASSWORD: app" not in text


def test_env_example_names_every_variable_and_is_not_ignored_by_accident() -> None:
    example = read_env_file(ROOT / ".env.example")
    assert set(example) == {"POSTGRES_PASSWORD", "LISTENER_HEALTH_TOKEN"}
    assert all(value == "" for value in example.values()), "the example holds a secret"
    # The example is empty on purpose: compose refuses it until a password is filled in.
    with pytest.raises(MissingVariable):
        compose(example)
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in ignored and ".env.example" not in ignored


def test_the_image_binds_the_health_server_on_all_interfaces_explicitly() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^\s*LISTENER_HEALTH_HOST=0\.0\.0\.0\b", dockerfile, re.MULTILINE)
