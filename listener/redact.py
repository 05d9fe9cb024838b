"""One redaction for everything that leaves the process: stored reasons, logs, JSON, pages, CLI.

Users' URLs carry credentials (``https://user:password@host``) and signed query strings
(``X-Amz-Signature=``, Supabase ``token=``); providers echo request headers and keys in their
error bodies; a DSN holds the database password. Everything that reaches the outside (the
``last_error`` column, log records, ``/status``, the status page, ``listener status``, the
CLI's error messages) passes through this module first:

- ``redact_url(url)``: a URL without user info, query string or fragment.
- ``redact_text(text)``: free text (an error message, a provider's error body) with every URL
  inside it redacted as above, and with the values of bearer tokens, ``Authorization`` and
  ``Cookie`` headers, API keys (``sk-...``, AWS access key ids, JWTs, ...) and secret-looking
  parameters (``token=``, ``key=``, ``password=``, ``X-Amz-Signature=``, ...) masked as
  ``***``.
- ``check_dsn(dsn)``: refuse a malformed database URL with a message that never quotes it.

It errs on the side of hiding: a word such as ``token: expired`` loses its value, and a URL
that cannot be parsed is replaced as a whole. Redaction is idempotent.
"""

from __future__ import annotations

import re
from typing import Final

from yarl import URL

MASK: Final = "***"
UNPARSABLE_URL: Final = "<unparsable URL>"
SHOWN_URL_CHARS: Final = 200
"""A redacted URL is cut to this many characters."""

# Schemes whose URLs never carry an "@" in their path: everything up to the last "@" is
# user info, even when a password holds an unescaped "/", "?" or "#".
_CREDENTIAL_SCHEMES: Final = frozenset(
    {
        "postgres",
        "postgresql",
        "mysql",
        "mariadb",
        "redis",
        "rediss",
        "mongodb",
        "mongodb+srv",
        "amqp",
        "amqps",
        "ftp",
        "sftp",
        "ssh",
    }
)

# A URL inside free text: a scheme, "://", then everything up to whitespace or a quote,
# less the punctuation that ends it ("fetch <url>: refused", "(see <url>).").
_URL_IN_TEXT: Final = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s<>\"'`]*[^\s<>\"'`.,:;!?)\]}]")

# Headers whose whole value is a credential (AWS's Authorization value has spaces and commas).
_HEADER: Final = re.compile(
    r"(?i)\b((?:proxy-)?authorization|cookie|set-cookie)([\"']?\s*[:=]\s*[\"']?)[^\"'\r\n]+"
)

# A parameter whose name says its value is secret, as a query field, a header, a JSON member
# or prose: ``token=x``, ``X-Amz-Signature=x``, ``"api_key": "x"``, ``password: x``.
_PARAM: Final = re.compile(
    r"(?i)\b([\w.\-]*?(?:signature|credential|token|secret|password|passwd|pwd|"
    r"api[_-]?key|apikey|access[_-]?key|private[_-]?key|\bkey|\bsig))"
    r"([\"']?\s*[:=]\s*[\"']?)"
    r"(?!\*\*\*)[^\s\"'&;,<>)\]}]+"
)

_BEARER: Final = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/]{8,}=*")

# Credentials recognisable by their shape alone.
_KEYS: Final = (
    # OpenAI (sk-..., sk-proj-..., sk-svcacct-...) and Anthropic-style keys.
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"), "sk-" + MASK),
    # AWS access key ids: AKIA (long-term), ASIA (temporary), and other principal prefixes.
    (re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{12,}\b"), r"\1" + MASK),
    # JSON Web Tokens (Supabase keys and signed-URL tokens are JWTs).
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*"), "eyJ" + MASK),
    # GitHub, Google API and Slack tokens.
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{16,}"), "gh_" + MASK),
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{20,}"), "AIza" + MASK),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{8,}"), "xox-" + MASK),
)


def redact_url(url: str | URL) -> str:
    """``url`` without user info, query string or fragment, safe to log and to show users.

    Args:
        url: an absolute URL, a path, or any text meant as one.

    Returns:
        The URL in readable form (percent-decoded, IDNA host decoded when valid), with
        non-printable characters escaped as ``\\x00``, cut to 200 characters. Text that
        does not parse as a URL is replaced by ``"<unparsable URL>"``: it may hold a secret
        in a shape we cannot recognise.

    A password that holds an unescaped ``/``, ``?``, ``#`` or ``@`` is still removed as a
    whole: for the user info, the last ``@`` counts (see ``_strip_userinfo``).
    """
    try:
        # A parsed URL is read again from its text: yarl reads "user:12/pw@host" as host
        # "user", port 12, and its user info would then be the path's business.
        parsed = URL(_strip_userinfo(str(url)))
        if parsed.raw_user is not None or parsed.raw_password is not None:
            parsed = parsed.with_user(None)
        bare = parsed.with_query(None).with_fragment(None)
        try:
            shown = bare.human_repr()
        except UnicodeError:
            # An invalid IDNA host (``xn--a.com``): show it encoded, as written.
            shown = str(bare)
    except (ValueError, TypeError):
        return UNPARSABLE_URL
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)
    if len(shown) > SHOWN_URL_CHARS:
        shown = shown[: SHOWN_URL_CHARS - 3] + "..."
    return shown


def redact_text(text: str) -> str:
    """``text`` with every secret it may hold masked; safe to store, log and show.

    Args:
        text: free text: an exception's message, a provider's error body, a log message.

    Returns:
        The text with URLs passed through ``redact_url``, ``Authorization``/``Cookie`` header
        values, ``Bearer``/``Basic`` credentials, secret-named parameters (``token``,
        ``access_token``, ``key``, ``apikey``, ``password``, ``secret``, ``Signature``,
        ``X-Amz-Signature``, ``X-Amz-Credential``, ...) and key-shaped words (``sk-...``,
        ``AKIA...``, ``ASIA...``, JWTs) replaced by ``***``. Everything else is unchanged.
    """
    if not text:
        return text
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    text = _HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    for pattern, replacement in _KEYS:
        text = pattern.sub(replacement, text)
    return text


def check_dsn(dsn: str) -> str:
    """``dsn`` unchanged when it parses as a PostgreSQL URL the way it reads.

    asyncpg's own parse errors quote pieces of the URL: with an unescaped ``/`` or ``#`` in
    the password, ``invalid literal for int() with base 10: 'pa'`` prints its first
    characters. This check refuses such URLs first, with a message that quotes no part of
    the URL.

    Args:
        dsn: a ``postgresql://`` or ``postgres://`` URL (other text is passed through
            unchecked; asyncpg refuses it without quoting it).

    Returns:
        ``dsn``.

    Raises:
        ValueError: the URL holds an unescaped ``#``, or a port that is not a number (what
            a password with an unescaped ``/`` or ``?`` leads to); the message says how to
            fix it.
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme.lower() not in ("postgres", "postgresql"):
        return dsn
    first = re.split(r"[/?]", rest, maxsplit=1)[0]
    hosts = first.rpartition("@")[2]
    ports = [h.rpartition("]")[2].partition(":")[2] for h in hosts.split(",")]
    problem = None
    if "#" in rest:
        problem = "it holds an unescaped '#'"
    elif any(port and not port.isdigit() for port in ports):
        problem = "its port is not a number (is there a '/' or '?' in the password?)"
    if problem is not None:
        raise ValueError(
            f"cannot parse the database URL: {problem}; percent-encode special characters "
            "in the user name and password ('/' as %2F, '#' as %23, '?' as %3F, '@' as %40, "
            "':' as %3A, '%' as %25)"
        )
    return dsn


def _strip_userinfo(url: str) -> str:
    """``url`` without its user info, reading a password with unescaped delimiters whole.

    RFC 3986 ends the authority at the first ``/``, ``?`` or ``#``, so
    ``https://user:pa/ss@host`` would read as host ``user``, port ``pa``, and a redaction that
    trusted the parser would show ``pa``. Here the last ``@`` wins when what precedes it
    looks like ``name:password`` rather than ``host[:port]/path`` (an ``@2x.png`` image path
    stays as it is).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    candidate, at, after = rest.rpartition("@")
    if not at:
        return url
    first = re.split(r"[/?#]", candidate, maxsplit=1)[0]
    if first == candidate or scheme.lower() in _CREDENTIAL_SCHEMES:
        return f"{scheme}://{after}"  # plain user info, or a scheme with no "@" in paths
    host, colon, port = first.rpartition(":") if not first.endswith("]") else (first, "", "")
    looks_like_host = not colon or (port.isdigit() and ("." in host or host.startswith("[")))
    if looks_like_host and "@" not in first:
        return url
    return f"{scheme}://{after}"
