"""Option parsing the ``rmtp`` commands share: ``--kwargs`` (``analyze-spectrum``, ``bench``).

One convention for every command that passes keyword arguments to ``timm.create_model``: the
option is repeatable, each value is ``key=value`` (several may be joined by commas) or a whole
JSON/YAML object, later keys override earlier ones. A value is read as JSON (``32``, ``1e-3``,
``true``, ``[1, 2]``, ``"text"``), else as a YAML scalar or flow collection, as in a recipe
(``{a: 1}``, ``[a, b]``, ``null``), else kept as the string it is.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rmtp.errors import RmtpError

__all__ = ["KWARGS_HELP", "KWARGS_METAVAR", "parse_kwargs", "parse_value"]

#: The start of every ``--kwargs`` help; a command adds what its kwargs are for.
KWARGS_HELP = ("timm.create_model kwargs, repeatable: key=value (or key=value,key=value; values read as "
               "JSON/YAML, e.g. --kwargs img_size=32 --kwargs drop_rate=0.1), or a JSON object "
               "('{\"img_size\": 32}')")

KWARGS_METAVAR = "KEY=VALUE"

#: A comma that starts a new ``key=`` pair (not one inside a value such as ``[1, 2]``).
_PAIR_SPLIT = re.compile(r",\s*(?=[A-Za-z_][\w.-]*\s*=)")


def parse_value(text: str) -> Any:
    """``text`` as JSON, else as YAML (safe loader, size-capped), else the string itself."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    import yaml

    from rmtp.storage.safe_yaml import YamlRefused, load_untrusted

    try:
        value = load_untrusted(text)
    except (yaml.YAMLError, YamlRefused):
        return text
    return text if value is None and text not in ("null", "~", "Null", "NULL") else value


def _mapping(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
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
    keys override earlier ones. Errors are one-line :class:`RmtpError` naming ``flag``.
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
        if text.startswith(("{", "[")):
            merged.update(_mapping(text, flag))
            continue
        for pair in filter(None, (p.strip() for p in _PAIR_SPLIT.split(text))):
            key, sep, raw = pair.partition("=")
            if not sep or not key.strip():
                raise RmtpError(f"{flag}: expected key=value, got {pair!r}")
            merged[key.strip()] = parse_value(raw)
    return merged
