"""The one way in: a recipe file read, overridden and checked, builder arguments included."""

from __future__ import annotations

from pathlib import Path

from mbp_cli.errors import RecipeError
from mbp_cli.recipe.spec import Recipe, read_recipe


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
