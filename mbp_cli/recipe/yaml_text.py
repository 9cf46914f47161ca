"""Recipe YAML as YAML 1.2 reads it (`1e-3` a number, `on` a string), duplicate keys refused,
and `--set key.path=value` overrides."""

from __future__ import annotations

import re
from typing import Any

import yaml


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float, `on`/`no` as strings and notes duplicate keys."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.problems: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                self.problems.append(
                    f"line {line}: key '{key}' appears twice in one mapping; the first is on line "
                    f"{seen[key]}")
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> tuple[Any, list[str]]:
    """Parse recipe YAML; return the data (None when unreadable) and the problems found."""
    try:
        loader = _RecipeLoader(text)  # its reader refuses control characters at once
    except yaml.YAMLError as exc:
        return None, [f"invalid YAML: {' '.join(str(exc).split())}"]
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        return None, [f"invalid YAML: {' '.join(str(exc).split())}"]
    finally:
        loader.dispose()
    return data, loader.problems


def apply_overrides(raw: Any, overrides: list[str] | tuple[str, ...],
                    shorthand_keys: tuple[str, ...] = ()) -> list[str]:
    """Apply `key.path=value` overrides (value read as YAML) to raw data in place.

    A string under one of `shorthand_keys` (`loss: mse`) stands for `{name: mse}`.
    """
    problems: list[str] = []
    for item in overrides:
        key_path, sep, text = item.partition("=")
        if not sep or not key_path.strip():
            problems.append(f"--set {item!r}: expected KEY.PATH=VALUE")
            continue
        value, value_problems = parse_yaml(text) if text.strip() else (None, [])
        if value_problems:
            problems.append(f"--set {key_path}: {value_problems[0]}")
            continue
        node, keys = raw, key_path.strip().split(".")
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key) if isinstance(node, dict) else None
            if isinstance(child, str) and key in shorthand_keys:
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(node, dict) or not isinstance(child, dict):
                problems.append(f"--set {key_path}: {'.'.join(keys[:depth + 1])} is not a mapping")
                break
            node[key] = child
            node = child
        else:
            if isinstance(node, dict):
                node[keys[-1]] = value
    return problems
