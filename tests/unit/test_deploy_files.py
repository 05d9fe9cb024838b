"""docker-compose.yml, .env.example and the Dockerfile: parse, expose nothing by default, and
agree with the CLI (the image's entrypoint is ``listener``; every documented ``docker run``
names a listener command).

The compose file is read with PyYAML, and its ``${VAR:?message}`` / ``${VAR:-default}``
references are substituted the way Compose does (the subset this file uses), so the test sees
the values a ``docker compose up`` with a given ``.env`` would.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from listener.cli import app as cli_app

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


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_the_image_runs_the_daemon_by_default_and_takes_any_listener_command() -> None:
    final = dict(dockerfile_stages()[-1])
    # `docker run IMAGE migrate` runs `listener migrate`; no arguments run the daemon.
    assert json.loads(final["ENTRYPOINT"]) == ["listener"]
    assert json.loads(final["CMD"]) == ["run", "--migrate"]
    assert final["USER"] not in ("root", "0")
    assert "/healthz" in final["HEALTHCHECK"]


def test_the_final_stage_copies_the_venv_and_installs_nothing() -> None:
    builder, final = dockerfile_stages()[0], dockerfile_stages()[-1]
    assert builder[0][1].endswith(" AS builder")
    runs = " ".join(arguments for instruction, arguments in final if instruction == "RUN")
    for tool in ("pip", "apt-get", "gcc", "wheel"):
        assert tool not in runs, f"the final stage runs {tool}"
    copies = [arguments for instruction, arguments in final if instruction == "COPY"]
    assert copies == ["--from=builder /opt/listener /opt/listener"]


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``docker run`` / ``docker compose run`` in the docs and deploy files, as
    (file, the arguments given to the image), shell continuations joined."""
    found = []
    pages = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))
    for name in ["README.md", *pages, "Dockerfile", "docker-compose.yml"]:
        text = re.sub(r"\\\n[#\s]*", " ", (ROOT / name).read_text())
        for line in text.splitlines():
            match = re.search(r"docker (compose )?run (.*)", line)
            if match is None:
                continue
            words = shlex.split(match[2].split("`")[0])
            found.append((name, _after_image(words)))
    return found


def _after_image(words: list[str]) -> list[str]:
    """The words after the image (or compose service), docker run's own options skipped."""
    with_value = {"-e", "--env", "-p", "--publish", "--name", "-v", "--volume", "--network"}
    i = 0
    while i < len(words) and words[i].startswith("-"):
        i += 2 if words[i] in with_value else 1
    return words[i + 1 :]


def test_every_documented_container_command_is_a_listener_command() -> None:
    commands = set(typer.main.get_command(cli_app).commands)
    examples = documented_commands()
    assert any(args[:1] == ["migrate"] for _, args in examples), "no `IMAGE migrate` example"
    for name, args in examples:
        if args:
            assert args[0] in commands, f"{name}: `{' '.join(args)}` is not a listener command"


def test_compose_keeps_the_image_entrypoint() -> None:
    services = compose({"POSTGRES_PASSWORD": "pw"})["services"]
    for name in ("listener", "listener-cli"):
        assert "entrypoint" not in services[name], name
    command = services["listener"].get("command", ["run", "--migrate"])
    assert command[0] == "run"
