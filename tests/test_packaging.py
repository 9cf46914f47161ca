"""The wheel a `pip install .` (or pipx) user gets ships the bundled recipes, usable by name."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.mark.slow
def test_the_wheel_ships_the_recipes_usable_by_name(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("mbp_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mbp_cli/recipes/digits.yaml" in names
    assert "mbp_cli/recipes/examples/tagging.py" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
    # The installed copy, not this checkout: run from elsewhere with only it on the path.
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    def mbp(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mbp_cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True)

    listed = mbp("recipes")
    assert listed.returncode == 0 and "examples/tagger" in listed.stdout
    trained = mbp("train", "digits", "--set", "train.steps=2", "--out", "run", "-q")
    assert trained.returncode == 0, trained.stderr
    saved = (tmp_path / "run/recipe.yaml").read_text()
    assert str(tmp_path / "site" / "mbp_cli" / "recipes") in saved.splitlines()[0]
    tagger = mbp("validate", "examples/tagger")  # its model and data: a .py beside it
    assert tagger.returncode == 0, tagger.stderr
