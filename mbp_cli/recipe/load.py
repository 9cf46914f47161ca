"""The one way in: a recipe file (or a bundled recipe by name) read, overridden and checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mbp_cli.errors import RecipeError, UsageError, suggest
from mbp_cli.recipe.cross_checks import cross_check
from mbp_cli.recipe.fields import build_section, field_names, kind, typed, unknown_keys
from mbp_cli.recipe.spec import READ_FROM, REQUIRED_SECTIONS, SECTIONS, TOP_LEVEL_KEYS, Recipe
from mbp_cli.recipe.yaml_text import apply_overrides, parse_yaml


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file, builder arguments checked against their
    signatures (nothing downloaded); raise RecipeError listing every problem at once."""
    from mbp_cli.recipe.arguments import (
        recipe_problems,  # imports torch: only once the YAML is read
    )

    recipe, problems = read_recipe(path, overrides)
    problems += recipe_problems(recipe)
    if problems:
        raise RecipeError(f"{path}{' with the --set overrides' if overrides else ''}", problems)
    return recipe


def read_recipe(path: str | Path,
                overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recipe, list[str]]:
    """Read and override a recipe; return it (defaults where values are bad) and its problems.

    Import paths in it are looked up first in the folder a run's saved copy names on its first
    line, else in the file's own folder.
    """
    path = find_recipe(Path(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read recipe {path}: {exc}") from exc
    folder = str(path.resolve().parent)
    if text.startswith(READ_FROM):  # a run folder's copy: its imports resolve as they did
        folder = text.split("\n", 1)[0].removeprefix(READ_FROM)
    raw, problems = parse_yaml(text)
    if not isinstance(raw, dict):  # not a recipe at all: nothing else in it can be told
        if raw is not None:
            problems.append(f"the top level must be a mapping of sections, got {kind(raw)}")
        raise RecipeError(str(path), problems or ["the file is empty"])
    problems += apply_overrides(raw, overrides, tuple(SECTIONS))
    recipe = build_recipe(raw, path.stem, problems)
    return dataclasses.replace(recipe, folder=folder), problems


def build_recipe(raw: dict[str, Any], default_name: str, problems: list[str]) -> Recipe:
    """Build the Recipe from a mapping of sections, appending every problem found; defaults
    fill the gaps."""
    unknown_keys(raw, TOP_LEVEL_KEYS, "", problems)
    name = typed(raw.get("name", default_name), str, "name", problems) or default_name
    seed = typed(raw.get("seed", 0), int, "seed", problems)
    if isinstance(seed, int) and not 0 <= seed < 2**63:
        problems.append(f"seed: must be from 0 to 2**63 - 1, got {seed}")
    sections = {}
    for key, cls in SECTIONS.items():
        value = raw.get(key)
        if value is None and key in REQUIRED_SECTIONS:
            problems.append(f"{key}: missing section")
        if isinstance(value, str) and "name" in field_names(cls):
            value = {"name": value}  # `loss: mse` is short for `loss: {name: mse}`
        sections[key] = build_section(cls, value, key, problems)
    recipe = Recipe(name=name, seed=seed if isinstance(seed, int) else 0, **sections)
    cross_check(recipe, problems)
    return recipe


def recipes_folder() -> Path:
    """Where the bundled recipes are: inside the installed package (a wheel), else the
    repository's recipes/ beside it (an editable install)."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "recipes"
    return packaged if packaged.is_dir() else package.parent / "recipes"


def find_recipe(path: Path) -> Path:
    """A recipe file, or a bundled recipe by name (`digits`, `examples/tagger`)."""
    if path.is_file():
        return path
    folder = recipes_folder()
    named = folder / path.with_suffix(".yaml") if path.suffix in ("", ".yaml") else None
    if named is not None and not path.is_absolute() and named.is_file():
        return named
    names = [str(p.relative_to(folder).with_suffix("")) for p in sorted(folder.rglob("*.yaml"))]
    raise UsageError(f"recipe file not found: {path}" + (suggest(str(path), names) or
                     f" (bundled recipes, usable by name: {', '.join(names)})"))


def bundled_recipes() -> list[tuple[Path, str]]:
    """The bundled recipes, each with the first comment line of its file."""
    folder = recipes_folder()
    found = []
    for path in sorted(folder.rglob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        description = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#")), "")
        found.append((path.relative_to(folder).with_suffix(""), description))
    return found
