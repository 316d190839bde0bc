"""RunConfig: defaults, range checks reported all at once, registry names, overrides, YAML loading."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cltune.config import (
    EvalConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    check_name,
    load_config,
    parse_config,
)
from cltune.errors import ConfigError, InvalidNameError
from cltune.evaluate import SCORERS
from cltune.methods import METHODS

REPO = Path(__file__).resolve().parent.parent
TASK = {"name": "a", "train": "a.jsonl"}


def errors_of(data: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    return {e["field"]: e["message"] for e in ei.value.details["errors"]}


def test_every_default_is_valid():
    cfg = parse_config({"tasks": [TASK]})
    # Re-validating each section's dump proves the defaults pass their own constraints.
    for section in (ModelConfig, LoraConfig, TrainConfig, EvalConfig):
        assert section.model_validate(section().model_dump()) == section()
    assert RunConfig.model_validate(cfg.model_dump()) == cfg
    assert cfg.method.name == "seq_lora" and cfg.model.name == "smollm2-135m"


def test_a_config_needs_at_least_one_task():
    assert "tasks" in errors_of({})


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("train", "lr", 0),
        ("train", "lr", -1e-3),
        ("train", "batch_size", 0),
        ("train", "grad_accum", 0),
        ("train", "max_len", 4),
        ("train", "steps", 0),
        ("train", "schedule", "exponential"),
        ("train", "max_grad_norm", 0),
        ("lora", "r", 0),
        ("lora", "alpha", 0),
        ("lora", "dropout", 1.0),
        ("lora", "dropout", -0.1),
        ("model", "dtype", "int3"),
        ("model", "device", "tpu"),
        ("model", "quantization", "2bit"),
        ("eval", "bwt_normalizer", "T+1"),
        ("eval", "max_new_tokens", 0),
    ],
)
def test_out_of_range_value_is_rejected_naming_the_field(section, field, value):
    errs = errors_of({"tasks": [TASK], section: {field: value}})
    assert f"{section}.{field}" in errs


def test_all_errors_are_reported_at_once():
    data = {
        "tasks": [{**TASK, "eval_fraction": 1.5}],
        "train": {"lr": 0, "batch_size": 0},
        "lora": {"r": 0, "dropout": 1.0},
    }
    errs = errors_of(data)
    expected = {"tasks.0.eval_fraction", "train.lr", "train.batch_size", "lora.r", "lora.dropout"}
    assert expected <= set(errs)
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    for f in expected:  # the one-line message names every field too
        assert f in ei.value.message


def test_unknown_field_is_rejected():
    assert "train.learning_rate" in errors_of({"tasks": [TASK], "train": {"learning_rate": 1e-3}})


def test_unknown_method_lists_the_valid_choices():
    msg = errors_of({"tasks": [TASK], "method": {"name": "ewc"}})["method"]
    assert "'ewc'" in msg
    for name in METHODS:
        assert name in msg


def test_unknown_scorer_lists_the_valid_choices():
    msg = errors_of({"tasks": [{**TASK, "scorer": "bleu"}]})["tasks.0.scorer"]
    assert "'bleu'" in msg
    for name in SCORERS:
        assert name in msg


def test_unknown_method_params_are_rejected():
    with pytest.raises(ConfigError, match="foo"):
        parse_config({"tasks": [TASK], "method": {"name": "seq_lora", "params": {"foo": 1}}})


def test_method_param_errors_arrive_one_per_param_with_their_valid_range():
    """A method's params are reported as structured field errors (no message to parse back), on the run's
    method and on a task's own method alike, each with the range its Params model declares."""
    task = {**TASK, "method": {"name": "npo", "params": {"beta": 1000, "retain_weight": 1}}}
    with pytest.raises(ConfigError) as e:
        parse_config({"tasks": [task], "method": {"name": "ilora", "params": {"ema_decay": 2, "gamma": -1}}})
    errors = {x["field"]: x for x in e.value.details["errors"]}
    assert set(errors) == {
        "method.params.ema_decay",
        "method.params.gamma",
        "tasks.0.method.params.beta",
        "tasks.0.method.params.retain_weight",
    }
    assert errors["method.params.ema_decay"]["valid"] == "0.0 <= ema_decay < 1.0"
    assert errors["method.params.ema_decay"]["input"] == 2
    assert errors["tasks.0.method.params.beta"]["valid"] == "0.0 < beta <= 100.0"
    assert errors["tasks.0.method.params.retain_weight"]["valid"] == "beta"  # npo's only param
    assert "method.params.gamma" in e.value.message and "(valid: 0.0 <= ema_decay < 1.0)" in e.value.message


def test_an_unknown_field_error_lists_the_fields_of_its_section():
    with pytest.raises(ConfigError) as e:
        parse_config({"tasks": [TASK], "lora": {"rank": 8}})
    (err,) = e.value.details["errors"]
    assert err["field"] == "lora.rank"
    assert err["valid"] == "r, alpha, dropout, target_modules, layers_to_transform"


@pytest.mark.parametrize(
    "bad", ["../x", "/abs", "a/b", "a\\b", "..", "", "a\nb", "a\x00b", ".hidden", "x" * 65]
)
def test_bad_task_names_are_rejected(bad):
    errs = errors_of({"tasks": [{**TASK, "name": bad}]})
    assert "tasks.0.name" in errs


def test_repeated_task_names_are_rejected():
    with pytest.raises(ConfigError, match="repeated: a"):
        parse_config({"tasks": [TASK, TASK]})


@pytest.mark.parametrize("good", ["a", "task_1", "v1.2-x", "X" * 64])
def test_safe_names_are_accepted(good):
    assert check_name(good) == good


def test_check_name_raises_invalid_name_error():
    with pytest.raises(InvalidNameError):
        check_name("../etc")


def test_overrides_set_nested_values_parsed_as_yaml():
    data = {"train": {"steps": 4}, "tasks": [{"name": "a", "train": "a.jsonl"}]}
    apply_overrides(
        data,
        [
            "train.steps=20",
            "train.lr=1e-3",
            "lora.target_modules=[q_proj, k_proj]",
            "tasks.0.scorer=choice",
            "name=run2",
        ],
    )
    cfg = parse_config(data)
    assert cfg.train.steps == 20 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.tasks[0].scorer == "choice" and cfg.name == "run2"


def test_override_without_equals_is_a_config_error():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.steps"])


def test_load_config_applies_overrides_to_the_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name: tiny-llama}\ntrain: {steps: 3}\ntasks:\n  - {name: a, train: a.jsonl}\n")
    cfg = load_config(p, ["train.steps=7"])
    assert cfg.model.name == "tiny-llama" and cfg.train.steps == 7


def test_load_config_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(REPO / "configs" / name)
    assert len(cfg.tasks) == 3


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("model", "seed", 2**70),
        ("model", "seed", -1),
        ("lora", "layers_to_transform", [-1]),
        ("lora", "target_modules", []),
        ("lora", "target_modules", [""]),
    ],
)
def test_model_and_lora_fields_are_bounded(section, field, value):
    assert f"{section}.{field}" in " ".join(errors_of({"tasks": [TASK], section: {field: value}}))


def test_train_seed_and_grad_norm_are_bounded_and_finite():
    for bad in (
        {"seed": -5},
        {"seed": 2**31},
        {"max_grad_norm": float("inf")},
        {"max_grad_norm": float("nan")},
    ):
        with pytest.raises(ValidationError):
            TrainConfig(**bad)
    assert TrainConfig(seed=2**31 - 1, max_grad_norm=None).seed == 2**31 - 1
