"""The README says what the code does: its architecture section names every module of both packages and
nothing that is gone, and its learning-rate table is what the methods declare."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def architecture_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Architecture", 1)[1]
    return section.split("```", 2)[1]


def test_the_readme_tree_names_every_module_and_package() -> None:
    """A package's own modules as `name.py`, a sub-package's as a word after its folder."""
    block = architecture_block()
    files, words = set(re.findall(r"[\w]+\.py", block)), set(re.findall(r"\w+", block))
    missing = []
    for pkg in ("cltune", "service"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO / pkg)
            if rel.parts[0] == "migrations" or rel.name == "__init__.py":
                continue  # Alembic's files; a package is named by its folder
            if (rel.name not in files) if len(rel.parts) == 1 else (path.stem not in words):
                missing.append(f"{pkg}/{rel}")
        missing += [
            f"{pkg}/{d.name}/"
            for d in (REPO / pkg).iterdir()
            if d.is_dir() and (d / "__init__.py").exists() and f"{d.name}/" not in block
        ]
    assert missing == []


def test_the_readme_tree_names_no_module_that_is_gone() -> None:
    files = {p.name for pkg in ("cltune", "service") for p in (REPO / pkg).rglob("*.py")}
    gone = [f for f in re.findall(r"[\w]+\.py", architecture_block()) if f not in files]
    assert gone == []


def test_the_readme_learning_rate_table_is_what_the_methods_declare() -> None:
    from cltune.methods import METHODS

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("**Learning rate and epochs per method.**", 1)[1].split("\n\n", 2)[1]
    said: dict[str, tuple[float, float]] = {}
    for row in re.findall(r"^\| ([a-z_, ]+) \| ([\d.e-]+) \| ([\d.]+) \|", section, flags=re.M):
        for name in row[0].split(", "):
            said[name] = (float(row[1]), float(row[2]))
    declared = {n: (c.train_defaults["lr"], c.train_defaults.get("epochs", 1.0)) for n, c in METHODS.items()}
    assert said == declared
