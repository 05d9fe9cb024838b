"""``listener.analysis.fetch.ImageFetcher`` against a real aiohttp server on 127.0.0.1.

Every test runs under the ``connections`` guard: it records each TCP connect the event loop
makes and fails the test on any address outside 127.0.0.0/8, so refused URLs are proven to
be refused *before* a connection is attempted, and this machine never sends traffic
elsewhere. Nothing here needs DNS beyond ``localhost`` in /etc/hosts.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from hostile_images import app1_bomb_jpeg, chunk_bomb_png, rgba16_8k_png
from PIL import Image
from support import beat, serving

from listener.analysis.fetch import (
    FetchedImage,
    GuardedResolver,
    ImageFetcher,
    _AddressPolicy,
    parse_retry_after,
    redact_url,
)
from listener.errors import (
    FetchRefused,
    FetchTimeout,
    ImageNotFound,
    ImageTooLarge,
    InvalidImage,
    InvalidURL,
    ListenerError,
    PermanentError,
    ProviderUnavailable,
    RateLimited,
    RetryableError,
)
from listener.settings import FetchSettings

DEMO = Path(__file__).resolve().parents[2] / "listener" / "demo_images"
PHOTO = (DEMO / "rocket.jpg").read_bytes()
PNG = (DEMO / "chelsea.png").read_bytes()
MAX_BYTES = 512 * 1024
READ_TIMEOUT_S = 0.5
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
RELEASE = web.AppKey("release", asyncio.Event)


# --- the server -------------------------------------------------------------------------


async def photo(request: web.Request) -> web.Response:
    return web.Response(body=PHOTO, content_type="image/jpeg")


def bomb_png() -> bytes:
    """A 20000x20000 1-bit PNG: about 50 KB, 400 million pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    return buffer.getvalue()


async def bomb(request: web.Request) -> web.Response:
    return web.Response(body=bomb_png(), content_type="image/png")


async def photo_png(request: web.Request) -> web.Response:
    return web.Response(body=PNG, content_type="image/png")


async def html_as_jpeg(request: web.Request) -> web.Response:
    body = b"<!DOCTYPE html><html><body>Sign in to see this image</body></html>"
    return web.Response(body=body, content_type="image/jpeg")


async def empty(request: web.Request) -> web.Response:
    return web.Response(body=b"", content_type="image/jpeg")


async def huge_with_length(request: web.Request) -> web.Response:
    return web.Response(body=b"\xff" * (4 * MAX_BYTES), content_type="image/jpeg")


async def huge_chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        for _ in range(4 * MAX_BYTES // 65536):
            await response.write(b"\xff" * 65536)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client hung up, as it should
    return response


async def slow_headers(request: web.Request) -> web.Response:
    await request.app[RELEASE].wait()
    return web.Response(body=PHOTO, content_type="image/jpeg")


async def slow_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    response.content_length = len(PHOTO)
    await response.prepare(request)
    try:
        await response.write(PHOTO[:1000])
        await request.app[RELEASE].wait()
        await response.write(PHOTO[1000:])
    except ConnectionResetError:
        pass
    return response


def redirect_to(location: str, status: int = 302) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": location})

    return handler


def status(code: int, headers: dict[str, str] | None = None) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=code, headers=headers, text="nope")

    return handler


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """The base URL (``http://127.0.0.1:PORT``) of a server with the routes below."""
    app = web.Application()
    app[RELEASE] = asyncio.Event()
    app.router.add_get("/photo.jpg", photo)
    app.router.add_get("/photo.png", photo_png)
    app.router.add_get("/bomb.png", bomb)
    app.router.add_get("/html.jpg", html_as_jpeg)
    app.router.add_get("/empty.jpg", empty)
    app.router.add_get("/huge-length.jpg", huge_with_length)
    app.router.add_get("/huge-chunked.jpg", huge_chunked)
    app.router.add_get("/slow.jpg", slow_headers)
    app.router.add_get("/slow-body.jpg", slow_body)
    app.router.add_get("/redirect-metadata", redirect_to("http://169.254.169.254/latest/meta-data"))
    app.router.add_get("/redirect-local", redirect_to("/photo.jpg", 301))
    app.router.add_get("/redirect-loop", redirect_to("/redirect-loop", 307))
    app.router.add_get("/redirect-file", redirect_to("file:///etc/passwd"))
    app.router.add_get("/redirect-idna", redirect_to("http://xn--a.com/a.jpg"))
    app.router.add_get("/unavailable.jpg", status(503))
    app.router.add_get("/ratelimited.jpg", status(429, {"Retry-After": "7"}))
    app.router.add_get("/forbidden.jpg", status(403))
    app.router.add_get("/gone.jpg", status(410))
    app.router.add_get("/teapot.jpg", status(418))
    async with serving(app) as base_url:
        try:
            yield base_url
        finally:
            app[RELEASE].set()


@pytest.fixture(autouse=True)
async def connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Addresses the loop connected to; any outside 127.0.0.0/8 fails the test at once."""
    loop = asyncio.get_running_loop()
    attempted: list[str] = []
    real_sock_connect = loop.sock_connect

    async def guarded(sock: socket.socket, address: Any) -> None:
        host = str(address[0])
        attempted.append(host)
        if ipaddress.ip_address(host.split("%")[0]) not in LOOPBACK:
            raise AssertionError(f"the test tried to connect to {host}")
        await real_sock_connect(sock, address)

    # aiohttp connects through aiohappyeyeballs, which calls loop.sock_connect.
    monkeypatch.setattr(loop, "sock_connect", guarded)
    return attempted


def settings(**overrides: Any) -> FetchSettings:
    values: dict[str, Any] = {
        "max_bytes": MAX_BYTES,
        "connect_timeout_s": 2.0,
        "read_timeout_s": READ_TIMEOUT_S,
        "total_timeout_s": 10.0,
        "allowed_hosts": ["127.0.0.1"],
    }
    values.update(overrides)
    return FetchSettings(**values)


@asynccontextmanager
async def started(fetch_settings: FetchSettings) -> AsyncIterator[ImageFetcher]:
    fetcher = ImageFetcher(fetch_settings)
    await fetcher.start()
    try:
        yield fetcher
    finally:
        await fetcher.close()


async def fetch(url: str | None, **overrides: Any) -> FetchedImage:
    async with started(settings(**overrides)) as fetcher:
        return await fetcher.fetch(url)


# --- success --------------------------------------------------------------------------------


async def test_fetches_a_photo_from_an_allowed_host(server: str, connections: list[str]) -> None:
    image = await fetch(f"{server}/photo.jpg")
    assert image == FetchedImage(
        url=f"{server}/photo.jpg",
        data=PHOTO,
        format="JPEG",
        width=640,
        height=427,
        mode="RGB",
        bytes_per_pixel=4,
    )
    assert connections == ["127.0.0.1"]


async def test_format_is_sniffed_from_the_bytes(server: str) -> None:
    image = await fetch(f"{server}/photo.png")
    assert image.format == "PNG"
    assert image.data == PNG


@pytest.mark.parametrize("allowed", [["127.0.0.0/8"], ["localhost"]])
async def test_allowed_hosts_accepts_cidr_networks_and_host_names(
    server: str, allowed: list[str]
) -> None:
    port = server.rsplit(":", 1)[1]
    host = "localhost" if allowed == ["localhost"] else "127.0.0.1"
    image = await fetch(f"http://{host}:{port}/photo.jpg", allowed_hosts=allowed)
    assert image.format == "JPEG"


async def test_follows_a_redirect_to_the_same_allowed_server(server: str) -> None:
    image = await fetch(f"{server}/redirect-local")
    assert image.url == f"{server}/photo.jpg"
    assert image.data == PHOTO


async def test_reads_file_urls_and_absolute_paths_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "chelsea.png"
    path.write_bytes(PNG)
    by_url = await fetch(path.as_uri(), allow_file_urls=True)
    by_path = await fetch(str(path), allow_file_urls=True)
    assert by_url.format == by_path.format == "PNG"
    assert by_url.data == by_path.data == PNG
    assert by_url.url == path.as_uri()


# --- SSRF guard -----------------------------------------------------------------------------


async def test_loopback_is_refused_unless_allowed(server: str, connections: list[str]) -> None:
    with pytest.raises(FetchRefused, match=r"127\.0\.0\.1 is a loopback address"):
        await fetch(f"{server}/photo.jpg", allowed_hosts=[])
    assert connections == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.0.0.1/image.jpg", "private"),
        ("http://[::1]/image.jpg", "loopback"),
        ("http://224.0.0.1/image.jpg", "multicast"),
        ("http://0.0.0.0/image.jpg", "unspecified"),
        ("http://[::ffff:169.254.169.254]/latest/meta-data", "link-local"),
        ("http://[2002:a00:1::]/image.jpg", "private"),  # 6to4 wrapping 10.0.0.1
        ("http://100.64.0.1/image.jpg", "non-global"),  # carrier-grade NAT
        ("http://localhost:{port}/photo.jpg", "loopback"),  # a name resolving to loopback
    ],
)
async def test_refuses_internal_addresses_before_connecting(
    server: str, connections: list[str], url: str, reason: str
) -> None:
    url = url.format(port=server.rsplit(":", 1)[1])
    with pytest.raises(FetchRefused, match=reason) as caught:
        await fetch(url, allowed_hosts=[])
    assert isinstance(caught.value, PermanentError)
    assert connections == []


async def test_allowing_loopback_does_not_open_other_internal_addresses(
    connections: list[str],
) -> None:
    with pytest.raises(FetchRefused):
        await fetch("http://169.254.169.254/latest/meta-data", allowed_hosts=["127.0.0.1"])
    assert connections == []


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0"])
async def test_non_canonical_ipv4_hosts_are_invalid(host: str, connections: list[str]) -> None:
    with pytest.raises(InvalidURL, match="canonical"):
        await fetch(f"http://{host}/image.jpg", allowed_hosts=[])
    assert connections == []


async def test_redirect_to_cloud_metadata_is_refused(server: str, connections: list[str]) -> None:
    with pytest.raises(FetchRefused, match=r"169\.254\.169\.254.*link-local"):
        await fetch(f"{server}/redirect-metadata")
    assert connections == ["127.0.0.1"]  # only the first hop, to the test server


async def test_redirect_to_a_file_url_is_refused_even_when_file_urls_are_allowed(
    server: str,
) -> None:
    with pytest.raises(FetchRefused, match="redirects may only lead to http or https"):
        await fetch(f"{server}/redirect-file", allow_file_urls=True)


async def test_redirect_loop_stops_after_max_redirects(server: str) -> None:
    with pytest.raises(InvalidURL, match="too many redirects"):
        await fetch(f"{server}/redirect-loop", max_redirects=3)


class FakeResolver(AbstractResolver):
    """Answers every name with fixed addresses (no DNS, no traffic)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_resolver_drops_refused_addresses_of_a_rebinding_name() -> None:
    inner = FakeResolver(["93.184.215.14", "10.1.2.3", "::ffff:127.0.0.1"])
    resolver = GuardedResolver(inner, _AddressPolicy.from_entries([]))
    results = await resolver.resolve("rebind.example", 443)
    assert [r["host"] for r in results] == ["93.184.215.14"]


async def test_resolver_refuses_a_name_with_only_internal_addresses() -> None:
    inner = FakeResolver(["169.254.169.254", "fd00::1"])
    resolver = GuardedResolver(inner, _AddressPolicy.from_entries([]))
    with pytest.raises(FetchRefused, match=r"169\.254\.169\.254, a link-local.*fd00::1"):
        await resolver.resolve("metadata.example", 80)


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        (["storage.internal"], ["10.1.2.3", "192.168.0.9"]),
        (["STORAGE.internal."], ["10.1.2.3", "192.168.0.9"]),
        (["10.0.0.0/8"], ["10.1.2.3"]),
        (["192.168.0.9"], ["192.168.0.9"]),
    ],
)
async def test_allowed_hosts_entries_in_the_resolver(
    allowed: list[str], expected: list[str]
) -> None:
    inner = FakeResolver(["10.1.2.3", "192.168.0.9"])
    resolver = GuardedResolver(inner, _AddressPolicy.from_entries(allowed))
    results = await resolver.resolve("storage.internal", 80)
    assert [r["host"] for r in results] == expected


# --- invalid URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "NULL"),
        ("", "empty"),
        ("   ", "whitespace"),
        ("not a url", "whitespace"),
        ("notaurl", "not absolute"),
        ("ftp://127.0.0.1/image.jpg", "unsupported URL scheme 'ftp'"),
        ("data:image/png;base64,iVBORw0KGgo=", "unsupported URL scheme 'data'"),
        ("javascript:alert(1)", "unsupported URL scheme 'javascript'"),
        ("http:///image.jpg", "no host"),
        ("http://127.0.0.1:99999/image.jpg", "malformed"),
        ("http://127.0.0.1/a\x00b.jpg", "control character"),
        ("http://127.0.0.1/image.jpg\n", "whitespace"),
    ],
)
async def test_invalid_urls(url: str | None, message: str, connections: list[str]) -> None:
    with pytest.raises(InvalidURL, match=message):
        await fetch(url)
    assert connections == []


async def test_invalid_idna_host_is_a_permanent_invalid_url(connections: list[str]) -> None:
    # "xn--a" is not valid Punycode: decoding the host for the message raised UnicodeError,
    # an unknown error that was retried until the attempts ran out.
    for url in ("https://xn--a.com/a.jpg", "http://user:pw@xn--a.com/a.jpg?token=t"):
        with pytest.raises(InvalidURL, match="invalid internationalized host name") as caught:
            await fetch(url)
        assert isinstance(caught.value, PermanentError)
        assert "xn--a.com" in str(caught.value)
        assert "pw" not in str(caught.value) and "token" not in str(caught.value)
    assert connections == []


async def test_redirect_to_an_invalid_idna_host_is_invalid(server: str) -> None:
    with pytest.raises(InvalidURL, match="invalid internationalized host name"):
        await fetch(f"{server}/redirect-idna")


@pytest.mark.parametrize(
    ("char", "encoded"),
    [("\u2028", "%E2%80%A8"), ("\u00a0", "%C2%A0"), ("\x85", "%C2%85"), ("\x7f", "%7F")],
)
async def test_the_fix_it_hint_gives_the_utf8_percent_encoding(char: str, encoded: str) -> None:
    with pytest.raises(InvalidURL, match=f"percent-encode it as {encoded}\\)"):
        await fetch(f"http://127.0.0.1/a{char}b.jpg")


async def test_a_files_first_bytes_never_reach_the_message(tmp_path: Path) -> None:
    # With file URLs allowed, any readable file can be named; its bytes must not be quoted,
    # not even as hex (they were: "starts with bytes 53 33 43 ...").
    secret = b"S3CRET-KEY-MATERIAL\x00\x01\x02\x03\xfe\xff"
    binary, text = tmp_path / "key.bin", tmp_path / "passwd"
    binary.write_bytes(secret)
    text.write_bytes(b"root:S3CRET:0:0:root:/root:/bin/bash\n")
    for path, looks in ((binary, "binary data of an unknown format"), (text, "plain text")):
        with pytest.raises(InvalidImage, match=looks) as caught:
            await fetch(str(path), allow_file_urls=True)
        message = str(caught.value)
        assert "S3CRET" not in message
        assert secret[:4].hex(" ") not in message and secret[:4].hex() not in message


async def test_url_with_spaces_is_invalid(server: str) -> None:
    with pytest.raises(InvalidURL, match="contains whitespace"):
        await fetch(f"{server}/my photo.jpg")


async def test_file_urls_are_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "chelsea.png"
    path.write_bytes(PNG)
    with pytest.raises(FetchRefused, match=f"file URLs are disabled: file://{path}"):
        await fetch(path.as_uri())
    with pytest.raises(FetchRefused, match="local paths are disabled"):
        await fetch(str(path))


async def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound, match="no such file"):
        await fetch((tmp_path / "missing.png").as_uri(), allow_file_urls=True)


async def test_oversize_file_is_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(b"\xff" * (MAX_BYTES + 1))
    with pytest.raises(ImageTooLarge):
        await fetch(str(path), allow_file_urls=True)


# --- HTTP outcomes --------------------------------------------------------------------------


async def test_unicode_path_is_percent_encoded_and_shown_in_the_message(server: str) -> None:
    with pytest.raises(ImageNotFound, match="HTTP 404") as caught:
        await fetch(f"{server}/фото/снимок.jpg")
    assert "/фото/снимок.jpg" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("/missing.jpg", ImageNotFound, "HTTP 404"),
        ("/gone.jpg", ImageNotFound, "HTTP 410"),
        ("/forbidden.jpg", FetchRefused, "HTTP 403"),
        ("/teapot.jpg", InvalidURL, "HTTP 418"),
        ("/unavailable.jpg", ProviderUnavailable, "HTTP 503"),
        ("/html.jpg", InvalidImage, "not an image.*looks like HTML"),
        ("/empty.jpg", InvalidImage, "empty"),
        ("/huge-length.jpg", ImageTooLarge, "Content-Length"),
        ("/huge-chunked.jpg", ImageTooLarge, f"over the limit of {MAX_BYTES} bytes"),
        ("/slow.jpg", FetchTimeout, "read timeout"),
        ("/slow-body.jpg", FetchTimeout, "read timeout"),
    ],
)
async def test_http_outcomes(
    server: str, path: str, error: type[ListenerError], message: str
) -> None:
    with pytest.raises(error, match=message) as caught:
        await fetch(f"{server}{path}")
    assert type(caught.value) is error


async def test_declared_pixel_count_is_checked_before_any_decoding(server: str) -> None:
    with pytest.raises(ImageTooLarge, match="decompression-bomb"):
        await fetch(f"{server}/bomb.png")
    with pytest.raises(ImageTooLarge, match="640x427 = 273280 pixels, over the limit of 1000"):
        await fetch(f"{server}/photo.jpg", max_pixels=1000)


async def test_429_is_rate_limited_with_retry_after(server: str) -> None:
    with pytest.raises(RateLimited) as caught:
        await fetch(f"{server}/ratelimited.jpg")
    assert caught.value.retry_after == 7.0
    assert isinstance(caught.value, RetryableError)


async def test_total_timeout(server: str) -> None:
    with pytest.raises(FetchTimeout, match="total timeout"):
        await fetch(f"{server}/slow.jpg", read_timeout_s=30.0, total_timeout_s=0.3)


async def test_connection_refused_is_retryable() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ProviderUnavailable, match="cannot connect"):
        await fetch(f"http://127.0.0.1:{port}/photo.jpg")


# --- no secrets in messages -----------------------------------------------------------------


async def test_credentials_and_query_never_reach_the_message(server: str) -> None:
    netloc = server.removeprefix("http://")
    with pytest.raises(ImageNotFound) as not_found:
        await fetch(f"http://user:hunter2@{netloc}/missing.jpg?token=s3cret#frag")
    with pytest.raises(FetchRefused) as refused:
        await fetch("http://user:hunter2@10.0.0.1/x.jpg?X-Amz-Signature=s3cret")
    with pytest.raises(InvalidURL) as invalid:
        await fetch("http://user:hunter2@127.0.0.1/a b.jpg?sig=s3cret")
    for caught in (not_found, refused, invalid):
        text = str(caught.value)
        assert "hunter2" not in text
        assert "s3cret" not in text
        assert "user" not in text


def test_redact_url() -> None:
    assert redact_url("https://u:p@host.example/a/b.jpg?sig=x#y") == "https://host.example/a/b.jpg"
    assert redact_url("http://host/\u0000") == "http://host/%00"
    assert redact_url("file:///tmp/a%20b.png?x=1") == "file:///tmp/a b.png"


def test_parse_retry_after() -> None:
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({}) is None
    assert parse_retry_after({"Retry-After": "soon"}) is None
    date = {"Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT"}
    assert parse_retry_after(date, now=1445412480.0) == 30.0
    assert parse_retry_after(date, now=1445412490.0 + 3600) == 0.0


async def test_fetch_before_start_is_an_error(server: str) -> None:
    fetcher = ImageFetcher(settings())
    with pytest.raises(RuntimeError, match="start"):
        await fetcher.fetch(f"{server}/photo.jpg")
    await fetcher.close()


# --- hostile headers ------------------------------------------------------------------------


@pytest.fixture
async def hostile_server() -> AsyncIterator[str]:
    """Serves the hostile files of ``hostile_images`` (and a photo) on 127.0.0.1."""
    bodies = {
        "/app1-bomb.jpg": app1_bomb_jpeg(1_000_000),  # 4 MB of empty APP1 segments
        "/chunk-bomb.png": chunk_bomb_png(300_000),
        "/rgba16-8k.png": rgba16_8k_png(),
        "/photo.jpg": PHOTO,
    }

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=bodies[request.path], content_type="image/jpeg")

    app = web.Application()
    for path in bodies:
        app.router.add_get(path, serve)
    async with serving(app) as base_url:
        yield base_url


async def test_hostile_headers_are_refused_without_stalling_the_loop(hostile_server: str) -> None:
    """Pillow took seconds, on the loop, to open a JPEG of a million APP1 segments."""
    gaps: list[float] = []
    beating = asyncio.create_task(beat(gaps))
    try:
        async with started(settings(max_bytes=8 * 1024 * 1024)) as fetcher:
            for _ in range(4):  # four of them once failed the container's HEALTHCHECK
                with pytest.raises(InvalidImage, match="more than 1024 JPEG segments"):
                    await fetcher.fetch(f"{hostile_server}/app1-bomb.jpg")
            with pytest.raises(InvalidImage, match="more than 1024 PNG chunks"):
                await fetcher.fetch(f"{hostile_server}/chunk-bomb.png")
            with pytest.raises(ImageTooLarge, match="at 8 bytes per pixel = 512000000 bytes"):
                await fetcher.fetch(f"{hostile_server}/rgba16-8k.png")
            image = await fetcher.fetch(f"{hostile_server}/photo.jpg")
    finally:
        beating.cancel()
    assert (image.width, image.height, image.mode, image.bytes_per_pixel) == (640, 427, "RGB", 4)
    assert gaps and max(gaps) < 1.0, f"the loop stalled for {max(gaps):.2f} s"
