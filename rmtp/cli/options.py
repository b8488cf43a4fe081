"""Option parsing the ``rmtp`` commands share: ``--kwargs`` (``analyze-spectrum``, ``bench``).

One convention for every command that passes keyword arguments to ``timm.create_model``: the
option is repeatable, each value is ``key=value`` (several may be joined by commas) or a whole
JSON/YAML object, later keys override earlier ones. A value is read as JSON (``32``, ``1e-3``,
``true``, ``[1, 2]``, ``"text"``), else as a YAML scalar or flow collection, as in a recipe
(``{a: 1}``, ``[a, b]``, ``null``), else kept as the string it is. One object holding a key twice
(``{"a": 1, "a": 2}``), at any depth, is refused as a recipe's YAML is: JSON and YAML parsers keep
the last of the two without a word.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rmtp.errors import RmtpError, short_repr

__all__ = ["KWARGS_HELP", "KWARGS_METAVAR", "DuplicateOptionKey", "parse_kwargs", "parse_value"]

#: The start of every ``--kwargs`` help; a command adds what its kwargs are for.
KWARGS_HELP = ("timm.create_model kwargs, repeatable: key=value (or key=value,key=value; values read as "
               "JSON/YAML, e.g. --kwargs img_size=32 --kwargs drop_rate=0.1), or a JSON object "
               "('{\"img_size\": 32}')")

KWARGS_METAVAR = "KEY=VALUE"
#: What ``--json`` of prune, bench and analyze-spectrum does to a file already at its path
#: (:func:`rmtp.storage.atomic.check_json_report_path`).
JSON_REPLACES = "replacing an earlier JSON report there; any other file there is refused, not overwritten"

#: A comma that starts a new ``key=`` pair (not one inside a value such as ``[1, 2]``).
_PAIR_SPLIT = re.compile(r",\s*(?=[A-Za-z_][\w.-]*\s*=)")


class DuplicateOptionKey(RmtpError):
    """A JSON or YAML object in an option value holds ``key`` twice."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"duplicate key {short_repr(key, 80)}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook``: the object, or :class:`DuplicateOptionKey` for a key it
    holds twice (``json.loads`` alone keeps the last value and drops the first without a word)."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise DuplicateOptionKey(key)
        value[key] = item
    return value


def _json(text: str) -> Any:
    """``text`` as JSON, an object with a key twice refused (:class:`DuplicateOptionKey`)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def parse_value(text: str) -> Any:
    """``text`` as JSON, else as YAML (safe loader, size-capped), else the string itself; an
    object with a key twice, in either, is refused (:class:`DuplicateOptionKey`), not read as a string."""
    text = text.strip()
    try:
        return _json(text)
    except json.JSONDecodeError:
        pass
    import yaml

    from rmtp.storage import safe_yaml

    try:
        value = safe_yaml.load_untrusted(text)
    except safe_yaml.DuplicateKey as exc:
        raise DuplicateOptionKey(exc.key) from None
    except (yaml.YAMLError, safe_yaml.YamlRefused):
        return text
    return text if value is None and text not in ("null", "~", "Null", "NULL") else value


def _mapping(text: str, flag: str) -> dict[str, Any]:
    try:
        value = _json(text)
    except json.JSONDecodeError as exc:
        value = parse_value(text)
        if not isinstance(value, dict):
            raise RmtpError(f"{flag}: not a valid JSON object ({exc.msg} at char {exc.pos}): {text}") from None
    if not isinstance(value, dict):
        raise RmtpError(f"{flag}: expected a JSON object or key=value, got {text}")
    return value


def parse_kwargs(values: list[str] | str | None, *, flag: str = "--kwargs") -> dict[str, Any] | None:
    """The merged keyword arguments of a repeatable ``--kwargs`` (``None`` when none was given).

    Each value is a JSON (or YAML flow) object, or ``key=value`` pairs separated by commas; later
    keys override earlier ones, but one object holding a key twice is refused. Errors are one-line
    :class:`RmtpError` naming ``flag``.
    """
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    if not values:
        return None
    merged: dict[str, Any] = {}
    for value in values:
        text = value.strip()
        try:
            merged.update(_parse_one(text, flag))
        except DuplicateOptionKey as exc:
            raise RmtpError(f"{flag}: {exc} in {short_repr(text, 200)}; give each key once") from None
    return merged


def _parse_one(text: str, flag: str) -> dict[str, Any]:
    """One ``--kwargs`` value: a JSON/YAML object or ``key=value`` pairs (a later pair overrides)."""
    if text.startswith(("{", "[")):
        return _mapping(text, flag)
    parsed: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in _PAIR_SPLIT.split(text))):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise RmtpError(f"{flag}: expected key=value, got {pair!r}")
        parsed[key.strip()] = parse_value(raw)
    return parsed
