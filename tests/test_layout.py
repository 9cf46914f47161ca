"""The README's layout table names every module of mbp_cli, so it cannot drift from the tree."""

from __future__ import annotations

import re

from tests.conftest import REPO


def named_in_layout() -> set[str]:
    """The modules (and whole folders, as 'folder/') the README's layout table names."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Layout", 1)[1]
    table = section[section.index("| Module"):].split("\n\n", 1)[0]
    named = set()
    for row in table.splitlines()[2:]:
        folder = ""
        for name in re.findall(r"`([\w/.]+)`", row.split("|")[1]):
            folder = name.rpartition("/")[0] + "/" if "/" in name else folder
            named.add(name if "/" in name else folder + name)
    return named


def test_the_layout_table_names_every_module():
    named = named_in_layout()
    modules = sorted(path.relative_to(REPO / "mbp_cli").as_posix()
                     for path in (REPO / "mbp_cli").rglob("*.py")
                     if path.name != "__init__.py" or path.parent.name == "cli")
    folders = [n for n in named if n.endswith("/")]
    missing = [m for m in modules if m != "__main__.py" and m not in named
               and not any(m.startswith(folder) for folder in folders)]
    assert not missing, f"README's layout table lacks {missing}"
    stale = [n for n in named if not (REPO / "mbp_cli" / n).exists()]
    assert not stale, f"README's layout table names what is not there: {stale}"
