"""Reading untrusted YAML: the safe loader, plus a cap on what aliases expand to.

``yaml.safe_load`` refuses tags (no code runs), but not a "billion laughs" document: nine levels
of nine aliases load in milliseconds as shared references, then expand to 9⁹ values the moment
anything walks them (validation, or the ``repr`` of an error message), which hung ``rmtp
validate`` at 2 GB. The composed node graph is measured first, counting each alias as the size
of what it stands for, and a document that would expand past :data:`MAX_EXPANDED_NODES` nodes,
or refers to itself, is refused before any value is built.

PyYAML also keeps the last of two equal keys in one mapping without a word (``lr: 0.001`` then
``lr: 5.0`` trains at 5.0), so a mapping with a key twice, at any depth, is refused too, naming
the line of each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rmtp.errors import RmtpError, short_repr

#: Far above any real recipe (the largest shipped one has ~150 nodes), far below a hang.
MAX_EXPANDED_NODES = 100_000


class YamlRefused(ValueError):
    """The document is valid YAML but is refused (too large once expanded, self-referencing, a key twice)."""


class DuplicateKey(YamlRefused):
    """One mapping holds a key twice; ``line`` and ``first_line`` are 1-based."""

    def __init__(self, key: str, line: int, first_line: int):
        self.key, self.line, self.first_line = key, line, first_line
        super().__init__(f"duplicate key {short_repr(key, 80)} (first at line {first_line})")


def load_untrusted(text: str) -> Any:
    """Parse ``text`` with PyYAML's safe loader after checking its expanded size.

    Raises ``yaml.YAMLError`` for invalid YAML or a tag, :class:`YamlRefused` for a bomb,
    :class:`DuplicateKey` for a mapping with a key twice.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node, limit=MAX_EXPANDED_NODES)
        check_unique_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def expanded_size(node: yaml.Node, *, limit: int) -> int:
    """Nodes in the tree ``node`` becomes once every alias is replaced by a copy of its target.

    Shared nodes (aliases) are measured once and memoised, so the cost is linear in the document,
    not in its expansion. Stops with :class:`YamlRefused` as soon as the count passes ``limit``.
    """
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(current: yaml.Node) -> int:
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise YamlRefused("an alias refers to a node that contains it (a self-referencing document)")
        in_progress.add(key)
        total = 1
        if isinstance(current, yaml.SequenceNode):
            children: list[yaml.Node] = list(current.value)
        elif isinstance(current, yaml.MappingNode):
            children = [part for pair in current.value for part in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                raise YamlRefused(f"its aliases expand to more than {limit:,} values (a 'billion laughs' document?)")
        in_progress.discard(key)
        sizes[key] = total
        return total

    return size(node)


def check_unique_keys(node: yaml.Node) -> None:
    """Raise :class:`DuplicateKey` for the first mapping, at any depth, holding a scalar key twice.

    Keys are compared as resolved scalars (tag and text), so ``lr`` and ``"lr"`` are one key; a
    merge key (``<<: *base``) is how YAML overrides on purpose and is not compared. Each node is
    visited once (aliases share nodes), so the cost is linear in the document; call it after
    :func:`expanded_size`, which refuses self-referencing documents.
    """
    seen: set[int] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            _check_mapping(current)
            stack.extend(reversed([part for pair in current.value for part in pair]))  # document order
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(reversed(current.value))


def _check_mapping(node: yaml.MappingNode) -> None:
    first: dict[tuple[str, str], yaml.ScalarNode] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        earlier = first.setdefault((key.tag, key.value), key)
        if earlier is not key:
            raise DuplicateKey(key.value, key.start_mark.line + 1, earlier.start_mark.line + 1)


def read_yaml_file(path: Path) -> Any:
    """The YAML document in ``path`` (safe loader, size-capped), or one-line :class:`RmtpError`.

    The message names the file (with line and column where PyYAML knows them) and what is wrong,
    for a syntax error, a tag, a bomb, bad UTF-8 or an unreadable file alike.
    """
    try:
        return load_untrusted(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RmtpError(f"{path}{where}: not valid YAML (safe loader; tags are refused): {problem}") from None
    except DuplicateKey as exc:
        raise RmtpError(f"{path}:{exc.line}: {exc}") from None
    except YamlRefused as exc:
        raise RmtpError(f"{path}: YAML refused: {exc}") from None
    except UnicodeDecodeError as exc:
        raise RmtpError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    except OSError as exc:
        raise RmtpError(f"{path}: cannot read: {exc.strerror or exc}") from None
