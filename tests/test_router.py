"""Router: explicit > group similarity (`auto`) > base, on registry records of three distinct tasks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from peft import get_peft_model

from cltune.config import LoraConfig
from cltune.demo_data import BUILDERS, SEQUENCES
from cltune.errors import NotFoundError
from cltune.methods.common import peft_lora_config
from cltune.models import build_tiny_llama
from cltune.registry import Registry
from cltune.router import RouterParams, choose, route_auto

UNRELATED = [
    "Tell me a joke about cats.",
    "How do I bake sourdough bread?",
    "Explain quantum computing simply.",
    "What is the best way to learn Python?",
    "Write a haiku about autumn.",
    "Who won the world cup in 1998?",
    "What is the weather like today?",
    "Translate hello into Spanish.",
    "What is 2 plus 2?",
    "Summarize the plot of Hamlet.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "What is the meaning of life?",  # shares "What is the ... of" with the capitals template
]


def save(registry: Registry, name: str, codebook: list[str], group: str | None = None) -> None:
    model, _, fp = build_tiny_llama(hidden=64, layers=1)
    peft_model = get_peft_model(model, peft_lora_config(LoraConfig(r=2)), adapter_name=name)
    registry.save(
        peft_model,
        name,
        {
            "name": name,
            "base_model": "tiny-llama",
            "base_fingerprint": fp,
            "method": "seq_lora",
            "group": group,
            "codebook": codebook,
        },
    )


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, dict[str, list[str]]]:
    """A registry with one adapter per demo task (200-instruction codebooks); held-out instructions."""
    registry = Registry(tmp_path_factory.mktemp("router") / "adapters")
    held: dict[str, list[str]] = {}
    for task in SEQUENCES["demo"]:
        prompts = [r["prompt"] for r in BUILDERS[task]()]
        random.Random(0).shuffle(prompts)
        save(registry, task, prompts[:200], group=task)
        held[task] = prompts[200:220]
    return registry, held


def test_auto_sends_held_out_instructions_to_their_task_adapter(
    tasks: tuple[Registry, dict[str, list[str]]],
) -> None:
    registry, held = tasks
    hits = total = 0
    for task, prompts in held.items():
        for p in prompts:
            route = route_auto(p, registry)
            hits += route.record is not None and route.record.name == task
            total += 1
    assert hits / total >= 0.95, f"{hits}/{total} held-out instructions reached their task's adapter"


def test_auto_sends_unrelated_prompts_to_the_base_model(tasks: tuple[Registry, dict[str, list[str]]]) -> None:
    registry, _ = tasks
    routes = {p: route_auto(p, registry) for p in UNRELATED}
    to_base = [p for p, r in routes.items() if r.record is None]
    # TF-IDF is lexical: a prompt that copies a template's wording ("What is the ... of ...?") can pass.
    assert len(to_base) >= len(UNRELATED) - 1, {p: (r.served_by, r.score) for p, r in routes.items()}
    assert all(
        r.reason == "auto_below_threshold" and r.score is not None for p, r in routes.items() if p in to_base
    )


def test_explicit_names_resolve_latest_or_exact_version_and_base_skips_adapters(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    save(registry, "qa", ["x"])
    save(registry, "qa", ["y"])
    assert choose("qa", "", registry).served_by == "qa@2"
    assert choose("qa@1", "", registry).served_by == "qa@1"
    assert choose("base", "anything", registry).record is None
    with pytest.raises(NotFoundError):
        choose("qa@3", "", registry)
    with pytest.raises(NotFoundError):
        choose("nope", "", registry)


def test_auto_uses_the_newest_adapter_of_a_group_and_base_without_adapters(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert route_auto("What is the capital of Peru?", registry).reason == "auto_no_adapters"
    save(
        registry,
        "capitals_v1",
        ["What is the capital of Chile?", "What is the capital of Spain?"],
        group="geo",
    )
    save(registry, "capitals_v2", ["What is the capital of France?"], group="geo")
    save(registry, "french", ["Write the number 3 in French words."], group="fr")
    route = route_auto("What is the capital of Peru?", registry)
    assert route.served_by == "capitals_v2@1" and route.group == "geo"
    assert set(route.scores) == {"geo", "fr"} and route.scores["geo"] > route.scores["fr"]


@pytest.mark.slow
def test_minilm_routes_held_out_and_unrelated_prompts(tasks: tuple[Registry, dict[str, list[str]]]) -> None:
    registry, held = tasks
    params = RouterParams(backend="minilm")
    right = sum(route_auto(p, registry, params).served_by == f"{t}@1" for t, ps in held.items() for p in ps)
    assert right / sum(map(len, held.values())) >= 0.95
    assert all(route_auto(p, registry, params).record is None for p in UNRELATED)
