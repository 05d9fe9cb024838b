"""Delivers terminal job events to ``LISTENER_WEBHOOK_URL``, signed, at least once.

The trigger of ``sql/migrations/0010_events.sql`` writes each terminal change of a job
(complete, failed, cancelled) into ``listener.event_outbox`` in the change's own transaction,
once a daemon with a webhook URL has enabled it. ``WebhookSender`` drains that outbox every
``interval_s`` in short transactions of its own, as ``listener.app_side.writeback`` does:

1. claim up to ``concurrency`` due rows (``FOR UPDATE SKIP LOCKED``: daemons share the work)
   and lease them: their ``next_attempt_at`` moves ``timeout_s + LEASE_MARGIN_S`` ahead;
2. POST them all at once, each bounded by ``timeout_s``;
3. delete those answered 2xx; push the others back by a full-jitter backoff
   (``listener.queue.retry.full_jitter_backoff`` over the row's ``attempts``).

A daemon killed between 1 and 3 leaves its rows to come due when the lease ends, and another
daemon (or itself, restarted) sends them again: delivery is at least once, and receivers
deduplicate on the body's ``event_id``, which the signature covers. Events are retried until
delivered; nothing is dropped.

Request: ``POST`` of the event's JSON with its outbox id added
(``{"table", "row_id", "status", "job_id", "event_id"}``, built by ``event_body``) with
``Content-Type: application/json``, ``X-Listener-Event-Id: <outbox id>`` (the body's
``event_id`` again, unsigned, for convenience) and
``X-Listener-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` keyed with
``LISTENER_WEBHOOK_SECRET`` (HMAC: RFC 2104; the layout is Stripe's ``Stripe-Signature``).
Redirects are not followed (a 3xx is a failure), so the signed body goes to the configured
host only. The URL is the operator's: any host is allowed (unlike image URLs,
``listener.analysis.fetch``), but logs and errors show it without credentials, query or fragment,
and
the secret appears nowhere but in the HMAC.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import re
import time
from collections.abc import Callable

import aiohttp
from loguru import logger
from yarl import URL

from listener.db.queries import OutboxEvent, Queries
from listener.queue.loops import Loop, Ticked
from listener.queue.retry import full_jitter_backoff

SIGNATURE_HEADER = "X-Listener-Signature"
EVENT_ID_HEADER = "X-Listener-Event-Id"
LEASE_MARGIN_S = 2.0
"""Seconds a claimed event's lease outlasts the POST's timeout (claim and ack round trips)."""
DEFAULT_TOLERANCE_S = 300
"""How old a signature ``verify_signature`` accepts by default, seconds (Stripe's default)."""


_TIMESTAMP = re.compile(r"[0-9]{1,12}")
"""A ``t`` value: ASCII digits only (``str.isdigit`` also takes other scripts' digits and
``²``), at most 12 of them (Unix seconds until the year 33658)."""
_V1 = re.compile(r"[0-9a-f]{64}")
"""A ``v1`` value that can match: lowercase hex of a SHA-256 digest."""
_OWS = " \t"
"""Whitespace allowed around a header's parts (HTTP's optional whitespace, RFC 9110 5.6.3)."""


def event_body(event_id: int, event: str) -> bytes:
    """The POSTed (and signed) body of outbox event ``event_id``.

    Args:
        event_id: the event's id in ``listener.event_outbox``.
        event: the stored event, JSON text of an object (``{"table", "row_id", "status",
            "job_id"}``).

    Returns:
        UTF-8 JSON of that object with ``"event_id": event_id`` added (replacing any such key),
        compact (``separators=(",", ":")``), keys in their stored order: the same bytes for
        the same row on every attempt, so a redelivery carries the body of the first.

    Raises:
        ValueError: ``event`` is not JSON text of an object.
    """
    parsed = json.loads(event)
    if not isinstance(parsed, dict):
        raise ValueError(f"event is JSON {type(parsed).__name__}, not an object")
    parsed["event_id"] = event_id
    return json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(key: bytes, timestamp: str, body: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of ``b"<timestamp>." + body`` keyed with ``key`` (RFC 2104)."""
    return hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Listener-Signature`` value of ``body`` sent at ``timestamp``.

    Args:
        secret: ``LISTENER_WEBHOOK_SECRET`` (its UTF-8 bytes are the key).
        body: the exact request body.
        timestamp: Unix time, whole seconds.

    Returns:
        ``"t=<timestamp>,v1=<hex HMAC-SHA256(secret, b"<timestamp>." + body)>"`` (RFC 2104).

    Raises:
        UnicodeEncodeError: ``secret`` holds a lone surrogate (not encodable as UTF-8).
    """
    return f"t={timestamp},v1={_digest(secret.encode(), str(timestamp), body)}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (an ``X-Listener-Signature``) signs ``body`` with ``secret``.

    For receivers written in Python: call it on the raw body, before parsing the JSON, then
    deduplicate on the body's ``event_id`` (signed, unlike the ``X-Listener-Event-Id``
    header). Never raises on what a request carries: a malformed header, or a header or body
    of the wrong type, is refused.

    The header is comma-separated ``key=value`` parts, spaces or tabs allowed around each key
    and value. It must hold exactly one ``t``, 1 to 12 ASCII digits, at most ``tolerance_s``
    seconds from ``now`` (default: ``time.time()``), which bounds replays. Each ``v1`` is a
    candidate signature, any one matching is enough (several allow secret rotation); one that
    is not 64 lowercase hex characters matches nothing. Parts with other keys are ignored
    (room for other schemes, as ``Stripe-Signature`` does). The HMAC covers ``t`` as sent,
    and is compared in constant time, as bytes.

    Args:
        secret: ``LISTENER_WEBHOOK_SECRET``.
        header: the ``X-Listener-Signature`` value.
        body: the raw request body (``bytes`` or ``bytearray``).
        tolerance_s: largest accepted distance between ``t`` and ``now``, seconds.
        now: Unix time, seconds.

    Returns:
        True when some ``v1`` matches; False for a stale timestamp, no matching ``v1``, a
        malformed header (a part without ``=``, no ``t`` or several, a ``t`` that is not
        ASCII digits), or arguments of the wrong types.
    """
    if not (
        isinstance(secret, str) and isinstance(header, str) and isinstance(body, bytes | bytearray)
    ):
        return False
    stamps: list[str] = []
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            return False
        key, value = key.strip(_OWS), value.strip(_OWS)
        if key == "t":
            stamps.append(value)
        elif key == "v1":
            candidates.append(value)
    if len(stamps) != 1 or not _TIMESTAMP.fullmatch(stamps[0]):
        return False
    timestamp = stamps[0]
    current = time.time() if now is None else now
    # Written so that a NaN (in now or tolerance_s) refuses rather than accepts.
    if not abs(current - int(timestamp)) <= tolerance_s:
        return False
    try:
        key_bytes = secret.encode()
    except UnicodeEncodeError:
        return False
    expected = _digest(key_bytes, timestamp, bytes(body)).encode("ascii")
    matches = [
        hmac.compare_digest(expected, c.encode("ascii")) for c in candidates if _V1.fullmatch(c)
    ]
    return any(matches)


def redact_url(url: str) -> str:
    """``url`` as logs may show it: scheme, host, port and path; no user, password, query or
    fragment (any of which may carry a token)."""
    try:
        parsed = URL(url)
        return str(parsed.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<unparseable URL>"


def check_webhook_url(url: str) -> None:
    """Refuse a webhook URL that cannot work.

    Raises:
        ValueError: not an absolute ``http``/``https`` URL. The message does not repeat the
            URL (it may hold a token).
    """
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise ValueError("LISTENER_WEBHOOK_URL is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("LISTENER_WEBHOOK_URL must be an absolute http:// or https:// URL")


class WebhookSender:
    """The webhook delivery loop of one daemon.

    Flushes at stop (``at_stop="flush"``): once the worker has drained, it delivers what is
    due (for up to ``flush_s``), so the events of the last jobs go out before exit.

    Args:
        queries: the daemon's queries, bound to a pool.
        url: ``LISTENER_WEBHOOK_URL`` (checked with ``check_webhook_url``).
        secret: ``LISTENER_WEBHOOK_SECRET``.
        timeout_s: longest POST, seconds (connect to answer's headers).
        interval_s: seconds between looks for due events.
        concurrency: events claimed and POSTed at once, each on a connection of its own: one
            daemon delivers at most ``concurrency`` events per receiver answer time (16 at
            200 ms: 80 events/s).
        backoff_base_s, backoff_cap_s: redelivery delays, seconds: the n-th failed attempt
            waits ``rng() * min(cap, base * 2**(n-1))``.
        rng: uniform floats in [0, 1).
        clock: Unix time in seconds, for the signature's ``t``.
        flush_s: longest time ``run`` spends delivering what is due once stopped, seconds.
    """

    def __init__(
        self,
        queries: Queries,
        url: str,
        secret: str,
        *,
        timeout_s: float = 10.0,
        interval_s: float = 0.5,
        concurrency: int = 16,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 600.0,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
        flush_s: float = 5.0,
    ) -> None:
        check_webhook_url(url)
        self._q = queries
        self._url = url
        self._secret = secret
        self.shown_url = redact_url(url)
        """The URL as logs show it."""
        self._timeout_s = timeout_s
        self._concurrency = concurrency
        self._base_s = backoff_base_s
        self._cap_s = backoff_cap_s
        self._rng = rng
        self._clock = clock
        self.loop = Loop(
            "webhooks",
            self._round,
            interval_s,
            at_stop="flush",
            flush_s=flush_s,
            label=f"webhook delivery to {self.shown_url}",
        )
        self._session: aiohttp.ClientSession | None = None
        self.delivered = 0
        """Events answered 2xx since start."""
        self.failed = 0
        """Delivery attempts that failed since start."""

    def wake(self) -> None:
        """Look for due events now rather than at the next interval."""
        self.loop.wake()

    def stop(self) -> None:
        """End ``run``: it delivers what is due (for up to ``flush_s``) and returns."""
        self.loop.stop()

    async def run(self) -> None:
        """Deliver until stopped, then flush; errors are logged, never raised."""
        logger.info("webhooks: delivering terminal job events to {}", self.shown_url)
        async with self._client() as session:
            self._session = session
            try:
                await self.loop.run()
            finally:
                self._session = None

    def _client(self) -> aiohttp.ClientSession:
        # aiohttp's connector opens 100 connections at most by default: beyond that a round's
        # POSTs would queue for a connection (and that wait counts against their timeout).
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._concurrency),
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            trust_env=False,
            headers={"User-Agent": "listener-webhooks"},
        )

    async def tick(self) -> int:
        """Deliver due events, ``concurrency`` at a time, until none is due.

        Returns:
            Events delivered (answered 2xx). Errors are logged (each distinct one once),
            not raised.
        """
        if self._session is None:
            async with self._client() as session:
                self._session = session
                try:
                    return await self.loop.tick()
                finally:
                    self._session = None
        return await self.loop.tick()

    async def _round(self) -> Ticked:
        max_s = self.loop.time_left()
        deadline = None if max_s is None else time.monotonic() + max_s
        delivered = 0
        errors: set[str] = set()
        try:
            if not await self._q.events_due():
                return Ticked(0)
            while True:
                claimed = await self._q.claim_events(
                    self._concurrency, self._timeout_s + LEASE_MARGIN_S
                )
                if not claimed:
                    break
                outcomes = await asyncio.gather(*(self._post(e) for e in claimed))
                done = [e.id for e, reason in zip(claimed, outcomes, strict=True) if not reason]
                failed = [
                    (e, full_jitter_backoff(e.attempts, self._base_s, self._cap_s, self._rng), r)
                    for e, r in zip(claimed, outcomes, strict=True)
                    if r
                ]
                if done:
                    await self._q.events_delivered(done)
                await self._q.events_failed(failed)
                delivered += len(done)
                self.delivered += len(done)
                self.failed += len(failed)
                errors.update(f"{r} (will retry)" for _, _, r in failed)
                # Stop at the end of the due events, or when nothing got through (the
                # receiver is down: the failed ones wait for their backoff, the others for
                # the next round).
                if len(claimed) < self._concurrency or not done:
                    break
                if deadline is None and self.loop.stopping:
                    break  # the flush after the loop (with its deadline) takes over
                if deadline is not None and time.monotonic() > deadline:
                    break
        except Exception as error:
            errors.add(f"outbox failed: {self._safe(f'{type(error).__name__}: {error}')}")
        return Ticked(delivered, errors)

    async def _post(self, event: OutboxEvent) -> str:
        """POST one event; ``""`` on 2xx, else the reason (no URL query, no secret)."""
        assert self._session is not None
        try:
            body = event_body(event.id, event.body)
        except ValueError as error:  # json.JSONDecodeError is one
            return f"unsendable event: {error}"
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: str(event.id),
            SIGNATURE_HEADER: sign(self._secret, body, int(self._clock())),
        }
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return ""
                return f"HTTP {response.status}"
        except TimeoutError:
            return f"timed out after {self._timeout_s:g} s"
        except aiohttp.ClientError as error:
            return self._safe(f"{type(error).__name__}: {error}".rstrip(": "))

    def _safe(self, text: str) -> str:
        """``text`` with the URL (whole, or its query string) replaced by the shown one."""
        text = text.replace(self._url, self.shown_url)
        query = URL(self._url).raw_query_string
        if query:
            text = text.replace(query, "...")
        return " ".join(text.split())[:500]
