"""Fetch images from user-controlled URLs without letting the URLs reach inside the network.

The URLs come from users' rows, so every fetch is treated as hostile:

* only ``http`` and ``https`` (and ``file`` when ``FetchSettings.allow_file_urls`` is on);
* an SSRF guard refuses hosts that are, or resolve to, loopback, private, link-local (the
  cloud metadata service at 169.254.169.254), multicast, reserved, unspecified or otherwise
  non-global addresses, unless ``FetchSettings.allowed_hosts`` allows them. The check runs in
  a custom aiohttp resolver, on the addresses the connection is actually made to, so DNS
  rebinding cannot slip past it; IP-literal hosts, which aiohttp never resolves, are checked
  before the request;
* redirects are followed by hand, each hop checked like the first URL;
* the body is streamed and cut off as soon as it exceeds ``FetchSettings.max_bytes``;
* the format, size and decoded footprint are read from the header by ``listener.analysis.probe``
  (never from ``Content-Type``), once, in a thread: header parsing is CPU work that must not
  stall the event loop, and it is bounded by the probe's caps on segments and chunks;
* error messages never contain URL credentials or query strings (``redact_url``).

Errors are those of ``listener.errors``: ``InvalidURL``, ``FetchRefused``, ``ImageNotFound``,
``ImageTooLarge`` and ``InvalidImage`` are permanent; ``FetchTimeout``, ``ProviderUnavailable``
and ``RateLimited`` are retryable.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import math
import os
import socket
import stat
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from listener import __version__
from listener.analysis.probe import probe_image
from listener.errors import (
    FetchRefused,
    FetchTimeout,
    ImageNotFound,
    ImageTooLarge,
    InvalidImage,
    InvalidURL,
    ListenerError,
    ProviderUnavailable,
    RateLimited,
)
from listener.redact import redact_url

__all__ = ["FetchedImage", "ImageFetcher", "redact_url"]

if TYPE_CHECKING:
    from collections.abc import Mapping

    from listener.settings import FetchSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES: Final = 64 * 1024
_MAX_URL_CHARS: Final = 8192
_HEADERS: Final = {
    "User-Agent": f"listener/{__version__} (image analysis)",
    "Accept": "image/*",
    # Images are compressed already; asking for identity also keeps gzip bombs away.
    "Accept-Encoding": "identity",
}
# Signatures of common non-image files (compared with the lowercased head), for messages.
# RFC 6052 well-known NAT64 prefix: the last 32 bits are an IPv4 address the gateway reaches.
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True, slots=True)
class FetchedImage:
    """An image fetched and sniffed.

    Attributes:
        url: the final URL, after redirects, exactly as requested (it may carry credentials
            or a signed query string: pass it through ``redact_url`` before logging it).
        data: the body, at most ``FetchSettings.max_bytes`` bytes, never empty.
        format: Pillow's format name sniffed from the bytes
        (``listener.analysis.probe.ACCEPTED_FORMATS``).
        width, height: pixels, from the header (before any EXIF rotation).
        mode: Pillow's mode of the decoded image, e.g. ``"RGB"``.
        bytes_per_pixel: bytes one decoded pixel takes (``listener.analysis.probe.ImageInfo``).
    """

    url: str
    data: bytes
    format: str
    width: int
    height: int
    mode: str
    bytes_per_pixel: int


@dataclass(frozen=True, slots=True)
class _AddressPolicy:
    """Which hosts and addresses may be fetched; built from ``FetchSettings.allowed_hosts``."""

    hostnames: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def from_entries(cls, entries: list[str]) -> _AddressPolicy:
        """Split entries into IP networks (``"10.0.0.0/8"``, ``"::1"``) and host names.

        Raises:
            ValueError: an entry is empty.
        """
        hostnames: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            text = entry.strip()
            if not text:
                raise ValueError("fetch.allowed_hosts contains an empty entry")
            try:
                networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
            except ValueError:
                hostnames.add(_normalize_hostname(text))
        return cls(frozenset(hostnames), tuple(networks))

    def allows_hostname(self, host: str) -> bool:
        """``host`` (IDNA-encoded) is listed by name in ``allowed_hosts``."""
        return _normalize_hostname(host) in self.hostnames

    def refusal(self, address: IPAddress) -> str | None:
        """Why ``address`` may not be fetched, or ``None`` when it may."""
        # Embedded IPv4 addresses first: they say where the traffic really goes.
        candidates = [*_embedded_ipv4(address), address]
        if any(ip in network for ip in candidates for network in self.networks):
            return None
        for ip in candidates:
            reason = _address_kind(ip)
            if reason is not None:
                return reason if ip is address else f"an IPv6 address embedding {ip}, {reason}"
        return None


def _normalize_hostname(host: str) -> str:
    host = host.strip().rstrip(".").lower()
    try:
        return URL.build(scheme="http", host=host).raw_host or host
    except ValueError:
        return host


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to: IPv4-mapped, 6to4, NAT64 (RFC 4291/3056/6052)."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    embedded = [address.ipv4_mapped, address.sixtofour]
    if address in _NAT64:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [ip for ip in embedded if ip is not None]


def _address_kind(ip: IPAddress) -> str | None:
    """The class of a refused address, or ``None`` for a globally routable unicast address."""
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (such as the cloud metadata service)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a non-global address"
    return None


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class _RefusedHost(FetchRefused):
    """Raised by ``GuardedResolver``; ``ImageFetcher`` re-raises it with the URL prepended."""


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that drops addresses the SSRF policy refuses.

    It wraps another resolver (aiohttp's default one in ``ImageFetcher``) and filters its
    answers; the connector then only ever connects to addresses that passed. Because the
    check is made on the very answer used for the connection, DNS rebinding (a name that
    resolves to a public address when checked and to a private one when used) cannot bypass
    it. aiohttp does not call resolvers for IP-literal hosts: check those with
    ``ImageFetcher`` before the request.

    Raises (from ``resolve``):
        FetchRefused: every address the host resolves to is refused.
    """

    def __init__(self, inner: AbstractResolver, policy: _AddressPolicy) -> None:
        self._inner = inner
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` with the wrapped resolver and keep only permitted addresses."""
        results = await self._inner.resolve(host, port, family)
        if self._policy.allows_hostname(host):
            return results
        permitted: list[ResolveResult] = []
        refused: list[str] = []
        for result in results:
            address = _parse_ip(result["host"])
            reason = "an unparsable address" if address is None else self._policy.refusal(address)
            if reason is None:
                permitted.append(result)
            else:
                refused.append(f"{result['host']}, {reason}")
        if not permitted:
            raise _RefusedHost(
                f"host {host!r} resolves to {'; '.join(refused) or 'no address'}; "
                "add it to fetch.allowed_hosts to allow it"
            )
        return permitted

    async def close(self) -> None:
        """Close the wrapped resolver."""
        await self._inner.close()


class ImageFetcher:
    """Fetches image bytes from users' URLs, with the limits and guards of ``FetchSettings``.

    Call ``start`` once inside the running event loop before ``fetch``, and ``close`` at
    shutdown. One fetcher is shared by all tasks.

    Args:
        settings: the ``fetch`` slice of the settings.

    Raises:
        ValueError: ``settings.allowed_hosts`` contains an empty entry.
    """

    def __init__(self, settings: FetchSettings) -> None:
        self._settings = settings
        self._policy = _AddressPolicy.from_entries(settings.allowed_hosts)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Create the HTTP session (the connector, with the guarded resolver)."""
        if self._session is not None:
            return
        s = self._settings
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(aiohttp.DefaultResolver(), self._policy),
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                # The total limit covers every redirect hop: fetch() applies it around them all.
                total=None,
                connect=s.connect_timeout_s,
                sock_connect=s.connect_timeout_s,
                sock_read=s.read_timeout_s,
            ),
            headers=_HEADERS,
            # A proxy from the environment would resolve the host itself, past the guard.
            trust_env=False,
            # Cookies from one user's server must never reach another's.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        """Close the HTTP session. Safe to call twice, or without ``start``."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def fetch(self, url: str | None) -> FetchedImage:
        """Fetch the image at ``url``.

        Args:
            url: an ``http(s)://`` URL; ``file://`` URLs and absolute paths only when
                ``allow_file_urls`` is set.

        Returns:
            The final URL, the bytes (at most ``max_bytes``), and the format, size and mode
            read from the header.

        Raises:
            InvalidURL: ``None``, empty, whitespace or control characters, not absolute,
                unsupported scheme, too many redirects, or an HTTP 4xx other than 401, 403,
                404, 408, 410 and 429.
            FetchRefused: a refused address (SSRF guard), file URLs disabled, HTTP 401/403.
            ImageNotFound: HTTP 404/410, or a missing file.
            ImageTooLarge: over ``max_bytes``, declaring over ``max_pixels`` pixels, or over
                ``max_decode_bytes`` bytes once decoded.
            InvalidImage: empty body, not an image in an accepted format, or a header over
                the probe's structure caps (``listener.analysis.probe.scan_structure``).
            FetchTimeout: connect, read or total timeout.
            RateLimited: HTTP 429 (``retry_after`` from ``Retry-After`` when present).
            ProviderUnavailable: connection refused/reset, DNS failure, HTTP 408 or 5xx.
            RuntimeError: ``start`` was not called.
        """
        target = self._parse(url)
        if target.scheme == "file" or not target.scheme:
            data = await self._read_file(target)
            shown = str(target) if target.scheme else target.path
            return await self._probe(shown, data, f"the file {redact_url(target)}")
        if self._session is None:
            raise RuntimeError("ImageFetcher.start() must be called before fetch()")
        total = self._settings.total_timeout_s
        try:
            async with asyncio.timeout(total):
                final_url, data = await self._get(self._session, target)
        except TimeoutError:
            raise FetchTimeout(
                f"fetching {redact_url(target)} took longer than the total timeout of {total} s"
            ) from None
        return await self._probe(str(final_url), data, f"the response from {redact_url(final_url)}")

    async def _probe(self, url: str, data: bytes, source: str) -> FetchedImage:
        """Read the header in a thread (bounded CPU work, off the loop) and check the limits."""
        info = await asyncio.to_thread(
            probe_image,
            data,
            max_pixels=self._settings.max_pixels,
            max_decode_bytes=self._settings.max_decode_bytes,
            source=source,
        )
        return FetchedImage(
            url=url,
            data=data,
            format=info.format,
            width=info.width,
            height=info.height,
            mode=info.mode,
            bytes_per_pixel=info.bytes_per_pixel,
        )

    def _parse(self, url: str | None) -> URL:
        """Validate the text of ``url``; a scheme-less result is an absolute local path."""
        if url is None:
            raise InvalidURL("image URL is NULL")
        if not url.strip():
            raise InvalidURL("image URL is empty" if not url else "image URL is only whitespace")
        if len(url) > _MAX_URL_CHARS:
            raise InvalidURL(f"image URL is too long: {len(url)} characters")
        bad = next((c for c in url if c.isspace() or unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            kind = "whitespace" if bad.isspace() else "a control character"
            raise InvalidURL(
                f"image URL contains {kind} ({bad!r} at position {url.index(bad)}): "
                f"{redact_url(url)} (percent-encode it as {_percent_encoded(bad)})"
            )
        if url.startswith("/"):
            if not self._settings.allow_file_urls:
                raise FetchRefused(
                    f"local paths are disabled: {redact_url(url)} "
                    "(set fetch.allow_file_urls to allow file URLs and absolute paths)"
                )
            return URL.build(path=url)
        try:
            parsed = URL(url)
        except ValueError as exc:
            raise InvalidURL(f"malformed image URL: {exc}") from None
        scheme = parsed.scheme.lower()
        if scheme == "file":
            if not self._settings.allow_file_urls:
                raise FetchRefused(
                    f"file URLs are disabled: {redact_url(parsed)} "
                    "(set fetch.allow_file_urls to allow them)"
                )
            if parsed.raw_host not in (None, "", "localhost"):
                raise InvalidURL(f"file URL with a remote host: {redact_url(parsed)}")
            return parsed
        if not scheme:
            raise InvalidURL(f"image URL is not absolute (no scheme): {redact_url(url)}")
        if scheme not in ("http", "https"):
            raise InvalidURL(
                f"unsupported URL scheme {scheme!r} in {redact_url(parsed)}: "
                "only http and https are fetched"
            )
        return self._check_http_target(parsed)

    def _check_http_target(self, url: URL) -> URL:
        """Check an http(s) URL (the first or a redirect target) before connecting to it."""
        host = url.raw_host
        if not host:
            raise InvalidURL(f"image URL has no host: {redact_url(url)}")
        try:
            url.host  # noqa: B018  (decodes the IDNA labels, which may be invalid)
        except UnicodeError:
            raise InvalidURL(
                f"image URL has an invalid internationalized host name {host!r}: its "
                f"'xn--' labels are not valid IDNA (Punycode): {redact_url(url)}"
            ) from None
        address = _parse_ip(host)
        if address is None and all(c in "0123456789." for c in host):
            # 127.1 or 2130706433: socket would map these onto addresses; refuse the ambiguity.
            raise InvalidURL(f"host {host!r} is not a canonical IPv4 address: {redact_url(url)}")
        if address is not None and not self._policy.allows_hostname(host):
            reason = self._policy.refusal(address)
            if reason is not None:
                raise FetchRefused(
                    f"refusing to fetch {redact_url(url)}: {address} is {reason}; "
                    "add it to fetch.allowed_hosts to allow it"
                )
        return url

    async def _read_file(self, target: URL) -> bytes:
        """Read a local file (``file://`` URL or absolute path) of at most ``max_bytes``."""
        path = Path(target.path)
        shown = redact_url(target)
        limit = self._settings.max_bytes

        def read() -> bytes:
            # O_NONBLOCK: opening a FIFO must not hang; it is refused just below as not regular.
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(path, flags)
            with os.fdopen(fd, "rb") as file:
                info = os.fstat(file.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise InvalidURL(f"{shown} is not a regular file")
                if info.st_size > limit:
                    raise ImageTooLarge(
                        f"{shown} is {info.st_size} bytes, over the limit of {limit} bytes"
                    )
                data = file.read(limit + 1)
            if len(data) > limit:
                raise ImageTooLarge(f"{shown} is over the limit of {limit} bytes")
            return data

        try:
            data = await asyncio.to_thread(read)
        except FileNotFoundError:
            raise ImageNotFound(f"no such file: {shown}") from None
        except (IsADirectoryError, NotADirectoryError):
            raise InvalidURL(f"{shown} is not a regular file") from None
        except PermissionError:
            raise FetchRefused(f"permission denied reading {shown}") from None
        except OSError as exc:
            raise ProviderUnavailable(f"cannot read {shown}: {exc.strerror or exc}") from None
        if not data:
            raise InvalidImage(f"empty file: {shown} has 0 bytes")
        return data

    async def _get(self, session: aiohttp.ClientSession, target: URL) -> tuple[URL, bytes]:
        """GET ``target``, following up to ``max_redirects`` redirects, each one checked."""
        current = target
        for _ in range(self._settings.max_redirects + 1):
            shown = redact_url(current)
            try:
                async with session.get(current, allow_redirects=False) as response:
                    if response.status in _REDIRECT_STATUSES and "Location" in response.headers:
                        current = self._redirect_target(response, current)
                        continue
                    _raise_for_status(response.status, response.headers, shown)
                    return current, await self._read_body(response, shown)
            except _RefusedHost as exc:
                raise FetchRefused(f"refusing to fetch {shown}: {exc}") from None
            except ListenerError:
                raise
            except aiohttp.ConnectionTimeoutError:
                raise FetchTimeout(
                    f"timed out connecting to {current.raw_host!r} "
                    f"(connect timeout {self._settings.connect_timeout_s} s) for {shown}"
                ) from None
            except TimeoutError:  # aiohttp's sock_read timeout
                raise FetchTimeout(
                    f"timed out waiting for data from {shown} "
                    f"(read timeout {self._settings.read_timeout_s} s)"
                ) from None
            except aiohttp.ClientConnectorDNSError as exc:
                raise ProviderUnavailable(
                    f"cannot resolve host {current.raw_host!r} of {shown}: {_os_reason(exc)}"
                ) from None
            except aiohttp.ClientConnectorCertificateError:
                raise ProviderUnavailable(
                    f"TLS certificate of {current.raw_host!r} failed verification: {shown}"
                ) from None
            except aiohttp.ClientConnectorError as exc:
                raise ProviderUnavailable(
                    f"cannot connect to {current.raw_host}:{current.port} for {shown}: "
                    f"{_os_reason(exc)}"
                ) from None
            except aiohttp.InvalidURL:
                raise InvalidURL(f"malformed image URL: {shown}") from None
            except aiohttp.ClientPayloadError:
                raise ProviderUnavailable(f"the response body of {shown} was cut short") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise ProviderUnavailable(
                    f"connection failed fetching {shown}: {type(exc).__name__}"
                ) from None
        raise InvalidURL(
            f"too many redirects (more than {self._settings.max_redirects}) "
            f"starting from {redact_url(target)}"
        )

    def _redirect_target(self, response: aiohttp.ClientResponse, current: URL) -> URL:
        location = response.headers["Location"]
        try:
            target = current.join(URL(location))
        except ValueError:
            raise InvalidURL(
                f"{redact_url(current)} redirected to a malformed URL {redact_url(location)}"
            ) from None
        if target.scheme not in ("http", "https"):
            # Never let a remote server point us at file:// or another scheme.
            raise FetchRefused(
                f"refusing redirect from {redact_url(current)} to {redact_url(target)}: "
                "redirects may only lead to http or https URLs"
            )
        return self._check_http_target(target)

    async def _read_body(self, response: aiohttp.ClientResponse, shown: str) -> bytes:
        limit = self._settings.max_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            response.close()
            raise ImageTooLarge(
                f"{shown} is {declared} bytes (Content-Length), over the limit of {limit} bytes"
            )
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                response.close()
                raise ImageTooLarge(f"{shown} is over the limit of {limit} bytes")
        if not body:
            raise InvalidImage(f"empty response body from {shown}")
        return bytes(body)


def _percent_encoded(char: str) -> str:
    """``char`` percent-encoded as in a URL: its UTF-8 bytes, ``%E2%80%A8`` for U+2028."""
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    """The OS-level reason of a connector error, without the URL aiohttp puts in ``str``."""
    os_error = exc.os_error
    return os_error.strerror or type(os_error).__name__


def _raise_for_status(status: int, headers: Mapping[str, str], shown: str) -> None:
    """Turn a non-2xx status into the matching ``listener.errors`` exception."""
    if 200 <= status < 300:
        return
    what = f"HTTP {status} from {shown}"
    if status in (404, 410):
        raise ImageNotFound(f"image not found: {what}")
    if status in (401, 403):
        raise FetchRefused(f"access denied: {what}")
    if status == 429:
        raise RateLimited(f"rate limited: {what}", retry_after=parse_retry_after(headers))
    if status == 408 or 500 <= status < 600:
        raise ProviderUnavailable(
            f"server unavailable: {what}", retry_after=parse_retry_after(headers)
        )
    raise InvalidURL(f"unexpected response: {what}")


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header, or ``None``.

    Accepts both forms of RFC 9110 section 10.2.3: delay-seconds (``"7"``) and an HTTP-date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``, converted against ``now``, a Unix time in seconds,
    default the current time). Negative results become 0; unparsable values give ``None``.
    """
    value = headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
