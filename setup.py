"""The packages that ship, found on disk so that a module or folder added later ships too.

Every package under mbp_cli/, and the bundled recipes: recipes/ in a checkout (where users type
recipes/digits.yaml), mbp_cli/recipes in a wheel, each folder of it a package of its own. The
rest of the build is in pyproject.toml; pyproject's tables cannot map a folder found on disk.
"""

from setuptools import find_namespace_packages, find_packages, setup

RECIPES = ["mbp_cli.recipes", *(f"mbp_cli.recipes.{name}" for name in
                                find_namespace_packages("recipes", exclude=["*__pycache__*"]))]

setup(packages=[*find_packages(include=["mbp_cli", "mbp_cli.*"]), *RECIPES],
      package_dir={"mbp_cli.recipes": "recipes"})
