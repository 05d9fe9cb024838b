"""Settings as the user wrote them: names no setting reads, and values that do not validate.

pydantic-settings reads the ``LISTENER_*`` variables (and ``.env``) it has fields for and
ignores the others (``extra="ignore"``: the ``.env`` is shared with docker compose), so a
misspelled ``LISTENER_CONCURENCY=5`` would leave the default in place without a word; and its
``ValidationError`` names a field (``fetch.max_bytes``), not the variable the user set. This
module says both in the user's terms:

- ``unknown_settings(environ, dotenv, source)``: the ``LISTENER_*`` names of the environment
  and of ``.env`` that nothing reads, each with the closest known name (``difflib``). Nested
  models (``LISTENER_FETCH__MAX_BYTES``) and per-key dicts
  (``LISTENER_RATE_LIMITS__OPENAI__RPS``, any key) are walked from ``Settings``' own fields;
  ``OTHER_VARIABLES`` are the ``LISTENER_*`` names read outside ``Settings``.
- ``invalid_settings(error, environ, dotenv, options)``: one line per problem of a
  ``ValidationError`` or ``SettingsError``, naming the variable (or command-line option) that
  gave the value, the value (``***`` for a secret; any other passes ``redact_text``) and what
  is allowed.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import SettingsError

from listener.redact import MASK, redact_text
from listener.settings import Settings

PREFIX: typing.Final = str(Settings.model_config.get("env_prefix") or "").upper()
DELIMITER: typing.Final = str(Settings.model_config.get("env_nested_delimiter") or "__")
ENVIRONMENT: typing.Final = "environment"

OTHER_VARIABLES: typing.Final = frozenset(
    {
        # listener.testing.cluster: the directory of initdb, pg_ctl and postgres.
        "LISTENER_PG_BINDIR",
        # tests/container (and .ci/container-test): run the container test, the image's tag.
        "LISTENER_CONTAINER_TEST",
        "LISTENER_IMAGE",
    }
)
"""``LISTENER_*`` variables read with ``os.environ`` rather than through ``Settings``."""

SHOWN_VALUE_CHARS: typing.Final = 80
_SECRET_NAME = re.compile(r"(?i)(^|_)(key|token|secret|password|dsn)$")
"""A field named like a credential (``api_key``, ``health_token``), whatever its type."""


@dataclass(frozen=True)
class UnknownSetting:
    """A ``LISTENER_*`` name that no setting reads.

    Attributes:
        name: the name as written.
        source: ``"environment"``, or the ``.env`` file's name.
        suggestion: the closest known name, or None when none is close.
    """

    name: str
    source: str
    suggestion: str | None

    def message(self) -> str:
        """``unknown setting LISTENER_CONCURENCY: did you mean LISTENER_CONCURRENCY?``"""
        where = "" if self.source == ENVIRONMENT else f" in {self.source}"
        if self.suggestion is None:
            return f"unknown setting {self.name}{where} (no setting has a similar name)"
        message = f"unknown setting {self.name}{where}: did you mean {self.suggestion}?"
        if redact_text(message) != message:
            # A name ending in API_KEY or TOKEN, then a colon, reads as a key and its value
            # to the log redaction, which would mask the advice.
            message = f"unknown setting {self.name}{where} (did you mean {self.suggestion}?)"
        return message


def unknown_settings(
    environ: Mapping[str, str], dotenv: Mapping[str, str], source: str = ".env"
) -> list[UnknownSetting]:
    """The ``LISTENER_*`` names (in any case) of ``environ`` and ``dotenv`` nothing reads.

    Args:
        environ: the process environment.
        dotenv: the keys and values of the ``.env`` file (keys as written).
        source: the ``.env`` file's name, for the messages.

    Returns:
        One ``UnknownSetting`` per name, environment first, each name once, sorted.
    """
    found: dict[str, UnknownSetting] = {}
    for origin, names in ((ENVIRONMENT, environ), (source, dotenv)):
        for name in sorted(names):
            upper = name.upper()
            if not upper.startswith(PREFIX) or upper in found or is_known(upper):
                continue
            found[upper] = UnknownSetting(name, origin, suggest(upper))
    return list(found.values())


def is_known(name: str) -> bool:
    """Whether ``name`` (upper case) is read by listener: a setting, a nested one, a dict's
    key, or one of ``OTHER_VARIABLES``."""
    if name in OTHER_VARIABLES:
        return True
    parts = name.removeprefix(PREFIX).split(DELIMITER)
    field = _top_level().get(PREFIX + parts[0])
    return field is not None and _reads(field, parts[1:])


def suggest(name: str) -> str | None:
    """The known name closest to ``name`` (upper case), or None when none is close."""
    given = name.removeprefix(PREFIX).split(DELIMITER)
    candidates = {n.removeprefix(PREFIX) for n in OTHER_VARIABLES}
    for top, annotation in _top_level().items():
        candidates.update(n.removeprefix(PREFIX) for n in _spellings(top, annotation, given[1:]))
    match = difflib.get_close_matches(name.removeprefix(PREFIX), sorted(candidates), n=1)
    return PREFIX + match[0] if match else None


def invalid_settings(
    error: ValidationError | SettingsError,
    environ: Mapping[str, str],
    dotenv: Mapping[str, str],
    options: Mapping[str, object],
) -> list[str]:
    """One line per problem of ``error``, in the terms the user gave the value in.

    Args:
        error: what ``Settings(...)`` raised.
        environ: the process environment.
        dotenv: the ``.env`` file's keys and values.
        options: the values given on the command line, by field name (``--field-name``).

    Returns:
        Lines such as ``invalid setting LISTENER_CONCURRENCY='abc': expected an integer
        >= 1``; a secret's value is shown as ``***``.
    """
    given = _given(environ, dotenv)
    if isinstance(error, SettingsError):
        return _bad_json(given) or [f"invalid settings: {error}: {error.__cause__}"]
    lines: list[str] = []
    for problem in error.errors(include_url=False):
        line = _describe(problem, given, options)
        if line not in lines:
            lines.append(line)
    return lines


# Names ----------------------------------------------------------------------------------------


def _top_level() -> dict[str, Any]:
    """Each top-level variable name (aliases included) and its field's annotation."""
    names: dict[str, Any] = {}
    for field_name, field in Settings.model_fields.items():
        for name in _env_names(field_name):
            names[name] = field.annotation
    return names


def _env_names(field_name: str) -> list[str]:
    """The variables of a top-level field, ``LISTENER_``-prefixed ones only."""
    alias = Settings.model_fields[field_name].validation_alias
    choices = getattr(alias, "choices", None)
    if choices:
        names = [c.upper() for c in choices if isinstance(c, str)]
        return [n for n in names if n.startswith(PREFIX)]
    return [(PREFIX + field_name).upper()]


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """The type inside ``Annotated[...]`` and ``X | None``, and the metadata met on the way."""
    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin is typing.Annotated:
            annotation, metadata = args[0], [*metadata, *args[1:]]
            continue
        if origin in (typing.Union, types.UnionType):
            members = [a for a in args if a is not type(None)]
            if len(members) == 1:
                annotation = members[0]
                continue
        return annotation, metadata


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _reads(annotation: Any, parts: Sequence[str]) -> bool:
    """Whether pydantic-settings reads ``parts`` (what follows a field's name, split on
    ``__``) into a field of this type: a nested model's field, or any key of a dict."""
    return _annotation_of(annotation, parts) is not None


def _spellings(name: str, annotation: Any, given: Sequence[str]) -> Iterator[str]:
    """Every variable name at or under ``name``; a dict's keys are those ``given`` uses."""
    yield name
    inner, _ = _unwrap(annotation)
    if _is_model(inner):
        for sub, field in inner.model_fields.items():
            yield from _spellings(f"{name}{DELIMITER}{sub.upper()}", field.annotation, given[1:])
    elif typing.get_origin(inner) is dict and given and given[0]:
        value = typing.get_args(inner)[1]
        yield from _spellings(f"{name}{DELIMITER}{given[0]}", value, given[1:])


# Values ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Given:
    """A ``LISTENER_*`` variable set in the environment or ``.env``."""

    name: str
    value: str


def _given(environ: Mapping[str, str], dotenv: Mapping[str, str]) -> dict[str, _Given]:
    """Upper-case name -> the variable as given; the environment wins over ``.env``."""
    found: dict[str, _Given] = {}
    for names in (dotenv, environ):
        for name, value in names.items():
            found[name.upper()] = _Given(name, value)
    return found


def _field_at(loc: Sequence[int | str]) -> tuple[Any, list[Any], str]:
    """The type, its constraints and the field name at ``loc`` of a ``Settings`` error."""
    annotation: Any = Settings
    metadata: list[Any] = []
    name = ""
    for part in loc:
        inner, _ = _unwrap(annotation)
        if _is_model(inner) and isinstance(part, str) and part in inner.model_fields:
            field = inner.model_fields[part]
            annotation, metadata, name = field.annotation, list(field.metadata), part
        elif typing.get_origin(inner) in (dict, list):
            annotation, metadata = typing.get_args(inner)[-1], []
        else:
            break
    inner, more = _unwrap(annotation)
    return inner, [*metadata, *more], name


def _holds_secret(annotation: Any, name: str = "") -> bool:
    """Whether a value of this type (a field called ``name``) is or holds a secret."""
    inner, _ = _unwrap(annotation)
    if inner is SecretStr or (name and _SECRET_NAME.search(name)):
        return True
    if _is_model(inner):
        return any(_holds_secret(f.annotation, n) for n, f in inner.model_fields.items())
    return any(_holds_secret(arg) for arg in typing.get_args(inner))


def _shown(value: object, secret: bool) -> str:
    """A value for a message: ``***`` for a secret, else redacted, quoted and cut short."""
    if secret:
        return MASK
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = redact_text(text)
    if len(text) > SHOWN_VALUE_CHARS:
        text = text[: SHOWN_VALUE_CHARS - 3] + "..."
    return repr(text) if isinstance(value, str) else text


def _expected(annotation: Any, metadata: list[Any], value: object) -> str | None:
    """What a value of this type may be, in words, or None when pydantic says it better."""
    if typing.get_origin(annotation) is Literal:
        allowed = [str(a) for a in typing.get_args(annotation)]
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return "one of " + ", ".join(repr(a) for a in allowed) + hint
    if annotation is bool:
        return "true or false (or 1/0, yes/no, on/off)"
    if annotation in (int, float):
        signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        bounds = [
            f"{sign} {getattr(item, attr):g}"
            for item in metadata
            for attr, sign in signs.items()
            if getattr(item, attr, None) is not None
        ]
        noun = "an integer" if annotation is int else "a number"
        return " and ".join([noun, *bounds]).replace(" and ", " ", 1)
    if typing.get_origin(annotation) is list:
        return "a JSON list"
    if typing.get_origin(annotation) is dict or _is_model(annotation):
        return "a JSON object"
    return None


def _describe(
    problem: Mapping[str, Any], given: Mapping[str, _Given], options: Mapping[str, object]
) -> str:
    """One line for one error of ``ValidationError.errors()``."""
    loc: tuple[int | str, ...] = tuple(problem["loc"])
    annotation, metadata, name = _field_at(loc)
    value = problem.get("input")
    if problem["type"] == "value_error":
        what = str(problem.get("ctx", {}).get("error", problem["msg"]))
    else:
        expected = _expected(annotation, metadata, value)
        what = f"expected {expected}" if expected else str(problem["msg"])
    if not loc:
        # A model validator's message (the pipeline file's) names its variable first.
        return f"invalid setting{'' if what.startswith(PREFIX) else 's:'} {what}"
    shown = _shown(value, _holds_secret(annotation, name))
    if isinstance(loc[0], str) and loc[0] in options:
        option = "--" + loc[0].replace("_", "-")
        return f"invalid option {option}={shown}: {what}"
    where, inside = _variable_of(loc, given)
    what = what.removeprefix(f"{where.upper()}: ")
    if inside:
        path = ".".join(str(p) for p in inside)
        return f"invalid setting {where}: {path}={shown}: {what}"
    return f"invalid setting {where}={shown}: {what}"


def _variable_of(
    loc: tuple[int | str, ...], given: Mapping[str, _Given]
) -> tuple[str, tuple[int | str, ...]]:
    """The variable that gave the value at ``loc``, and the path inside its JSON value."""
    top = str(loc[0])
    names = _env_names(top) if top in Settings.model_fields else [(PREFIX + top).upper()]
    for depth in range(len(loc), 0, -1):
        keys = loc[1:depth]
        if any(not isinstance(k, str) for k in keys):
            continue
        for name in names:
            variable = DELIMITER.join([name, *(str(k).upper() for k in keys)])
            if variable in given:
                return given[variable].name, loc[depth:]
    return (names[0] if names else top.upper()), loc[1:]


def _bad_json(given: Mapping[str, _Given]) -> list[str]:
    """Lines for the variables that hold a list, dict or section but no valid JSON."""
    lines = []
    top = _top_level()
    for upper, variable in sorted(given.items()):
        parts = upper.removeprefix(PREFIX).split(DELIMITER)
        if not upper.startswith(PREFIX) or PREFIX + parts[0] not in top:
            continue
        annotation = _annotation_of(top[PREFIX + parts[0]], parts[1:])
        expected = _expected(annotation, [], None) if annotation is not None else None
        if expected is None or not expected.startswith("a JSON"):
            continue
        try:
            json.loads(variable.value)
        except ValueError as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            shown = _shown(variable.value, _holds_secret(annotation))
            lines.append(
                f"invalid setting {variable.name}={shown}: not JSON ({reason}); expected {expected}"
            )
    return lines


def _annotation_of(annotation: Any, parts: Sequence[str]) -> Any:
    """The unwrapped type ``parts`` lead to under ``annotation``; None when none."""
    inner, _ = _unwrap(annotation)
    if not parts:
        return inner
    if _is_model(inner):
        fields = {name.upper(): f for name, f in inner.model_fields.items()}
        field = fields.get(parts[0])
        return None if field is None else _annotation_of(field.annotation, parts[1:])
    if typing.get_origin(inner) is dict and parts[0]:
        return _annotation_of(typing.get_args(inner)[1], parts[1:])
    return None
