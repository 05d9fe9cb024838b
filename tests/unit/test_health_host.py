"""The health server's Host check (the DNS rebinding guard when no token is set), without I/O."""

from __future__ import annotations

import ipaddress

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from listener.ops.health import HostCheck, host_of_header
from listener.settings import Settings


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("localhost", "localhost"),
        ("LocalHost:8080", "localhost"),
        ("localhost.:8080", "localhost"),
        ("listener.internal", "listener.internal"),
        ("127.0.0.1", ipaddress.ip_address("127.0.0.1")),
        ("127.0.0.1:8080", ipaddress.ip_address("127.0.0.1")),
        ("10.1.2.3:", ipaddress.ip_address("10.1.2.3")),
        ("[::1]", ipaddress.ip_address("::1")),
        ("[::1]:8080", ipaddress.ip_address("::1")),
        ("[FE80::1]:80", ipaddress.ip_address("fe80::1")),
        # Not dotted quads: names, which only the allowed list can let through.
        ("127.1", "127.1"),
        ("0x7f.0.0.1", "0x7f.0.0.1"),
        ("127.0.0.1.evil.example", "127.0.0.1.evil.example"),
        # Malformed: refused whatever the list says.
        ("", None),
        (":8080", None),
        (".", None),
        ("::1", None),  # IPv6 without brackets
        ("[::1", None),
        ("[evil.example]", None),
        ("[::1]x", None),
        ("localhost:http", None),
        ("localhost:80:80", None),
        ("a b", "a b"),  # a name no allowed list holds (the settings refuse one)
    ],
)
def test_host_of_header(header: str, host: object) -> None:
    assert host_of_header(header) == host


def request(*hosts: str, path: str = "/status") -> web.Request:
    """A request to ``path`` with one ``Host`` header per item of ``hosts``."""
    return make_mocked_request("GET", path, headers=CIMultiDict([("Host", h) for h in hosts]))


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:8080",
        "127.3.4.5",
        "localhost",
        "LOCALHOST:1",
        "localhost.",
        "[::1]:8080",
        "[::ffff:127.0.0.1]",
        # Any IP literal: never resolved, so never the attacker's (see HostCheck).
        "10.0.0.7:8080",
        "203.0.113.9",
        "[2001:db8::1]:9",
        "0.0.0.0:8080",
        # Allowed names, any case, any port.
        "listener",
        "Listener:8080",
        "listener.internal.",
    ],
)
def test_allowed_hosts(host: str) -> None:
    check = HostCheck(["listener", "LISTENER.internal."])
    assert check.allows(request(host))


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8080",
        "localhost.evil.example",
        "listener.evil.example",
        "127.0.0.1.nip.io",
        "127.1",
        "2130706433",
        "",
        "::1",
        "evil.example:8080, 127.0.0.1",
    ],
)
def test_refused_hosts(host: str) -> None:
    check = HostCheck(["listener"])
    assert not check.allows(request(host))


def test_a_missing_or_repeated_host_is_refused() -> None:
    check = HostCheck()
    assert not check.allows(request())
    assert not check.allows(request("127.0.0.1", "evil.example"))
    assert not check.allows(request("127.0.0.1", "127.0.0.1"))
    assert check.allows(request("127.0.0.1"))


def test_only_localhost_and_addresses_by_default() -> None:
    check = HostCheck()
    assert check.names == {"localhost"}
    assert not check.allows(request("listener"))


def test_the_setting_is_a_json_list_of_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).health_allowed_hosts == []  # type: ignore[call-arg]
    monkeypatch.setenv(
        "LISTENER_HEALTH_ALLOWED_HOSTS", '["listener", " Listener.Internal. ", "[::1]", "my_svc"]'
    )
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.health_allowed_hosts == ["listener", "listener.internal", "[::1]", "my_svc"]


@pytest.mark.parametrize(
    "entry", ["listener:8080", "http://listener", "*.internal", "", "listener/metrics", "a b"]
)
def test_the_setting_refuses_what_would_never_match(entry: str) -> None:
    with pytest.raises(ValueError, match="LISTENER_HEALTH_ALLOWED_HOSTS"):
        Settings(_env_file=None, health_allowed_hosts=[entry])  # type: ignore[call-arg]
