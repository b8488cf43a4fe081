"""Selecting layers: a recipe step's ``layers`` filter applied to an architecture's prunable layers."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmtp.contract.architecture import PrunableLayer


class LayerFilter(BaseModel):
    """``layers:`` of a prune step.

    Patterns are shell globs on the dotted layer name (``blocks.*.mlp.fc1``) or, prefixed with
    ``re:``, Python regular expressions matched against the whole name (``re:blocks\\.[0-5]\\..*``).
    Without ``include`` a step takes every non-optional prunable layer; with ``include`` it takes
    exactly the layers the patterns match, optional ones (head, patch embedding) included.
    A bare list is shorthand for ``include``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _list_is_include(cls, data: Any) -> Any:
        return {"include": data} if isinstance(data, list) else data

    def problems(self) -> list[str]:
        """Patterns that are not valid regular expressions, as ``include[i]: message``."""
        found = []
        for key in ("include", "exclude"):
            for index, pattern in enumerate(getattr(self, key)):
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as exc:
                        found.append(f"{key}[{index}]: invalid regular expression '{pattern}': {exc}")
        return found


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_layers(layers: list[PrunableLayer], layer_filter: LayerFilter | None) -> list[PrunableLayer]:
    """The layers a step acts on, in the architecture's (forward) order."""
    if layer_filter is None or not layer_filter.include:
        chosen = [layer for layer in layers if not layer.optional]
    else:
        chosen = [layer for layer in layers if any(_matches(layer.name, p) for p in layer_filter.include)]
    if layer_filter is not None and layer_filter.exclude:
        chosen = [layer for layer in chosen if not any(_matches(layer.name, p) for p in layer_filter.exclude)]
    return chosen
