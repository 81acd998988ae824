"""Reading YAML (recipes, mergekit configs) at a bounded cost, whoever wrote it.

A YAML text is refused before it is built into Python objects when it is larger than
`MAX_YAML_BYTES` (1 MB: a recipe is a few KB) or when it would expand to more than
`MAX_YAML_NODES` nodes. The second bound is what stops an alias bomb: a 400-byte text whose
anchors each repeat the previous one nine times expands to 9^k leaves, and PyYAML builds every one
of them. The expanded size is counted from the parser's event stream in one pass, without building
anything: each event is one node, and an alias counts as the size of the node its anchor names.
The count stops at the bound, so any text up to the size cap is judged in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_YAML_BYTES = 1_000_000
MAX_YAML_NODES = 20_000

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # the same text as SafeDumper, faster


class YamlRefused(ValueError):
    """A YAML text that is malformed or beyond the size bounds; the message names the source."""


def load_yaml(text: str | bytes, source: str = "recipe") -> Any:
    """The Python value of a YAML text (safe types only) after the size and expansion checks."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlRefused(f"{source}: {len(text):,} bytes, above the limit of {MAX_YAML_BYTES:,} "
                          "bytes for a recipe or config")
    try:
        nodes = expanded_nodes(text, stop_after=MAX_YAML_NODES)
        if nodes > MAX_YAML_NODES:
            raise YamlRefused(f"{source}: expands to more than {MAX_YAML_NODES:,} YAML nodes "
                              "(anchors and aliases included); a recipe or config is far smaller")
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        raise YamlRefused(f"{source}: not valid YAML: {err}") from None


def dump_yaml(value: Any) -> str:
    """YAML text of plain Python values (safe types only), keys in their given order."""
    return yaml.dump(value, Dumper=_DUMPER, sort_keys=False)


def read_yaml_file(path: str | Path, source: str | None = None) -> Any:
    """`load_yaml` of a file, refused by its size before it is read."""
    path = Path(path)
    source = source or str(path)
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise YamlRefused(f"{source}: {size:,} bytes, above the limit of {MAX_YAML_BYTES:,} bytes "
                          "for a recipe or config")
    return load_yaml(path.read_bytes(), source)


def expanded_nodes(text: str | bytes, stop_after: int) -> int:
    """How many nodes the text builds, aliases expanded; counting stops past `stop_after`.

    One event per scalar, per sequence or mapping start, per alias (which adds the size of its
    anchor's node). An anchored collection's size is the count between its start and end event.
    """
    count = 0
    sizes: dict[str, int] = {}
    open_anchors: list[tuple[str | None, int]] = []
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent):
            count += sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            count += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            open_anchors.append((event.anchor, count))
            count += 1
        elif isinstance(event, yaml.CollectionEndEvent) and open_anchors:
            anchor, started = open_anchors.pop()
            if anchor is not None:
                sizes[anchor] = count - started
        if count > stop_after:
            return count
    return count
