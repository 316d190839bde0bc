"""The README's architecture section names every module of both packages, and nothing that is gone."""

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
