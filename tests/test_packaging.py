"""What a user who installs mbp as a package gets: a wheel (from the tree or from the sdist) that
holds every module and recipe of the checkout, and runs from a virtual environment of its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO


def _shipped(repo: Path) -> set[str]:
    """The paths a wheel must hold: every module of mbp_cli/ and every file of recipes/."""
    modules = {str(p.relative_to(repo)) for p in (repo / "mbp_cli").rglob("*.py")}
    recipes = {"mbp_cli/" + str(p.relative_to(repo)) for p in (repo / "recipes").rglob("*")
               if p.suffix in (".yaml", ".py")}
    return modules | recipes | {"mbp_cli/embedded/digits.csv.gz"}


def _files(wheel: Path) -> set[str]:
    return {name for name in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in name}


def _clean_copy(tmp_path: Path) -> Path:
    """The checkout's files as a clone has them: no build/ left by an earlier build, whose
    copies setuptools would put in the wheel."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, check=True, capture_output=True)
    copy = tmp_path / "checkout"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    return copy


def _build(tmp_path: Path) -> Path:
    """The wheel built from the sdist (as pip builds one from PyPI), checked against the wheel
    built from the tree; returns the first."""
    def run(*args: str) -> None:
        subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True)

    tree = _clean_copy(tmp_path)
    run("build", "--sdist", "--wheel", "--outdir", str(tmp_path / "sdist"), str(tree))
    run("pip", "wheel", str(tree), "--no-deps", "-q", "-w", str(tmp_path / "tree"))
    (from_sdist,) = (tmp_path / "sdist").glob("mbp_cli-*.whl")
    (from_tree,) = (tmp_path / "tree").glob("mbp_cli-*.whl")
    assert _files(from_sdist) == _files(from_tree)
    return from_sdist


def _fresh_environment(tmp_path: Path, wheel: Path) -> Path:
    """A virtual environment holding the wheel and no copy of mbp besides it. Its dependencies
    (installed here from constraints.txt) are read from this environment's site-packages by a
    .pth line: a folder added that way has its own .pth files skipped, so the editable
    install's import hook there never runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    Path(site.stdout.strip(), "dependencies.pth").write_text(sysconfig.get_paths()["purelib"])
    return venv


@pytest.mark.slow
def test_the_installed_wheel_holds_every_module_and_runs_on_its_own(tmp_path):
    wheel = _build(tmp_path)
    missing = _shipped(REPO) - _files(wheel)
    assert not missing, f"left out of the wheel: {sorted(missing)}"
    venv = _fresh_environment(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(program: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([venv / "bin" / program, *args], cwd=elsewhere,
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})

    where = run("python", "-c", "import mbp_cli; print(mbp_cli.__file__)")
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    version = run("mbp", "--version")
    assert version.returncode == 0 and version.stdout.strip(), version.stderr
    listed = run("mbp", "recipes")
    assert listed.returncode == 0 and "examples/tagger" in listed.stdout, listed.stderr
    trained = run("mbp", "train", "digits", "--set", "train.steps=20", "--out", "run", "-q")
    assert trained.returncode == 0, trained.stderr
    saved = (elsewhere / "run/recipe.yaml").read_text()
    assert str(venv) in saved.splitlines()[0]  # the recipe the wheel carries, by name
    tagger = run("mbp", "validate", "examples/tagger")  # its model and data: a .py beside it
    assert tagger.returncode == 0, tagger.stderr
