"""Sequences that mix methods: each method's state survives other methods' tasks, unlearning reaches
I-LoRA's adapters and replay buffer, and the R matrix and metrics score what is served."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import torch
from conftest import TASK_A, TASK_B, pc_rows

from cltune.config import MethodConfig, RunConfig, parse_config
from cltune.continual import run_continual
from cltune.data import tokenize
from cltune.errors import ConfigError, StopRequested
from cltune.evaluate import cl_metrics
from cltune.methods.base import MethodState
from cltune.methods.common import adapter_state, preserved_training_state
from cltune.methods.dema import Dema
from cltune.methods.ilora import FAST, SLOW, ILora
from cltune.methods.npo import Npo, dataset_nll
from cltune.models import load_model
from cltune.router import RouterParams, route_group
from cltune.train import Callbacks

FORGET, RETAIN = TASK_A[:6], TASK_A[6:]


def _ids_sha(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


@pytest.fixture
def unlearn_cfg(write_jsonl) -> RunConfig:
    """learn A (ilora) -> forget 6 of A's examples (npo_rt) -> learn B (ilora)."""
    learn, forget, retain, later = (
        write_jsonl(pc_rows(p), f)
        for p, f in ((TASK_A, "a.jsonl"), (FORGET, "f.jsonl"), (RETAIN, "r.jsonl"), (TASK_B, "b.jsonl"))
    )
    ilora = {"name": "ilora", "params": {"ema_decay": 0.9}}
    return parse_config(
        {
            "model": {"name": "tiny-llama", "device": "cpu"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "tasks": [
                {"name": "learn", "train": str(learn), "eval": str(learn), "max_eval": 2, "method": ilora},
                {
                    "name": "forget",
                    "train": str(forget),
                    "retain": str(retain),
                    "max_eval": 2,
                    "method": {"name": "npo_rt", "params": {"beta": 0.5}},
                },
                {"name": "later", "train": str(later), "eval": str(later), "max_eval": 2, "method": ilora},
            ],
            "train": {"steps": 4, "batch_size": 4, "max_len": 64, "lr": 1e-2, "schedule": "constant"},
            "eval": {"max_new_tokens": 2, "heatmap": False},
        }
    )


def _forget_nll(model: Any, tokens: list[dict[str, Any]], adapter: str) -> float:
    """Mean summed NLL of the forget set under `adapter` (flags and active adapter restored)."""
    with preserved_training_state(model):
        model.set_adapter(adapter)
        return float(dataset_nll(model, tokens, 0, torch.device("cpu")).mean())


def _spy(monkeypatch: pytest.MonkeyPatch, tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """Record I-LoRA's buffer and adapters right after each prepare, the unlearned adapter, and the
    forget-set NLL of the served (slow) adapter after each I-LoRA step."""
    seen: dict[str, Any] = {"prepared": [], "nll": []}
    prepare, after_step, npo_after = ILora.prepare, ILora.after_step, Npo.after_task

    def spy_prepare(self: ILora, model: Any, task: Any, state: Any) -> Any:
        model = prepare(self, model, task, state)
        fast, slow = adapter_state(model, FAST), adapter_state(model, SLOW)
        buffer = [list(x["input_ids"]) for x in self.buffer.items]
        seen["prepared"].append({"buffer": buffer, "fast": fast, "slow": slow})
        seen["nll"].append([_forget_nll(model, tokens, SLOW)])
        return model

    def spy_step(self: ILora, model: Any, step: int) -> None:
        after_step(self, model, step)
        seen["nll"][-1].append(_forget_nll(model, tokens, SLOW))

    def spy_npo_after(self: Npo, model: Any, task: Any) -> Any:
        out = npo_after(self, model, task)
        seen["unlearned"] = adapter_state(model, self.serve_adapter)
        seen["unlearned_adapter"] = self.serve_adapter
        return out

    monkeypatch.setattr(ILora, "prepare", spy_prepare)
    monkeypatch.setattr(ILora, "after_step", spy_step)
    monkeypatch.setattr(Npo, "after_task", spy_npo_after)
    return seen


@pytest.mark.parametrize("restart", [False, True])
def test_ilora_after_unlearning_continues_from_the_unlearned_adapter_without_the_forget_set(
    unlearn_cfg, tmp_path, monkeypatch, restart
):
    loaded = load_model(unlearn_cfg.model)
    forget = tokenize(_task_examples(unlearn_cfg, 1), loaded.tokenizer, unlearn_cfg.train.max_len)[0]
    seen = _spy(monkeypatch, forget)
    if restart:  # stop as task 3 starts; a new process resumes from the finished tasks on disk
        stop = Callbacks(should_stop=lambda: len(seen["prepared"]) == 2)
        with pytest.raises(StopRequested):
            run_continual(unlearn_cfg, tmp_path / "run", loaded=loaded, callbacks=stop)
        loaded = load_model(unlearn_cfg.model)
    res = run_continual(unlearn_cfg, tmp_path / "run", loaded=loaded)
    assert set(res.metrics["unlearning"]) == {"forget"} and res.metrics["learning_tasks"] == 2
    assert seen["unlearned_adapter"] == SLOW  # npo_rt unlearned what I-LoRA served
    forget_ids = {_ids_sha(x["input_ids"]) for x in forget}
    learned = MethodState.load(tmp_path / "run" / "tasks" / "00-learn" / "state")
    assert learned is not None and forget_ids & {_ids_sha(x["input_ids"]) for x in _buffer(learned)}
    start = seen["prepared"][-1]  # task 3 (of the resumed process, with restart)
    assert start["buffer"], "the replay buffer was dropped by the unlearning task"
    assert not {_ids_sha(ids) for ids in start["buffer"]} & forget_ids  # unlearned examples are gone
    for adapter in ("fast", "slow"):
        for k, v in seen["unlearned"].items():
            assert torch.equal(start[adapter][k], v), (adapter, k)
    nll = seen["nll"][-1]  # forget-set NLL of the served adapter at the start and after steps 1-3
    # before the fix: 12.5 -> 11.2, 10.9, 10.7 (the slow adapter pulled back to the old fast one)
    assert min(nll[1:4]) >= nll[0] - 0.5, nll


def _buffer(state: MethodState) -> list[dict[str, Any]]:
    from cltune.methods.ilora import decode_buffer

    return decode_buffer(state.tensors, state.meta["buffer"]).items


def _task_examples(cfg: RunConfig, t: int) -> list[Any]:
    from cltune.task_data import read_task_data

    return read_task_data(cfg.tasks[t], cfg.train.seed, unlearning=True).train


def _cfg(tasks: list[dict[str, Any]], steps: int = 3, **lora: Any) -> RunConfig:
    return parse_config(
        {
            "model": {"name": "tiny-llama", "device": "cpu"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, **lora},
            "tasks": tasks,
            "train": {"steps": steps, "batch_size": 4, "max_len": 64, "lr": 1e-2, "schedule": "constant"},
            "eval": {"max_new_tokens": 2, "heatmap": False},
        }
    )


@pytest.fixture
def files(write_jsonl) -> dict[str, str]:
    a2 = [(f"add one to {i}", str(i + 1)) for i in range(40, 52)]  # task A's template, new numbers
    pairs = {"a": TASK_A, "b": TASK_B, "a2": a2, "forget": FORGET, "retain": RETAIN}
    return {k: str(write_jsonl(pc_rows(p), f"{k}.jsonl")) for k, p in pairs.items()}


def _forget_task(files: dict[str, str]) -> dict[str, Any]:
    return {
        "name": "forget",
        "train": files["forget"],
        "retain": files["retain"],
        "max_eval": 2,
        "method": {"name": "npo_rt", "params": {"beta": 0.5}},
    }


def test_dema_keeps_its_groups_across_unlearning_and_retrains_the_unlearned_group(
    files, tmp_path, monkeypatch
):
    dema = {"name": "dema"}
    cfg = _cfg(
        [
            {"name": "add", "train": files["a"], "max_eval": 2, "method": dema},
            _forget_task(files),
            {"name": "add2", "train": files["a2"], "max_eval": 2, "method": dema},
        ]
    )
    seen: dict[str, Any] = {}
    prepare, npo_after = Dema.prepare, Npo.after_task

    def spy_prepare(self: Dema, model: Any, task: Any, state: Any) -> Any:
        model = prepare(self, model, task, state)
        seen[task.name] = (self.decision, [dict(g) for g in self.groups], adapter_state(model, "g0"))
        return model

    def spy_npo_after(self: Npo, model: Any, task: Any) -> Any:
        seen["unlearned"] = (self.serve_adapter, adapter_state(model, self.serve_adapter))
        return npo_after(self, model, task)

    monkeypatch.setattr(Dema, "prepare", spy_prepare)
    monkeypatch.setattr(Npo, "after_task", spy_npo_after)
    res = run_continual(cfg, tmp_path / "run", loaded=load_model(cfg.model))
    assert "routed" in res.scored_with["forget"]["how"]  # the unlearned group is served through routing
    decision, groups, g0 = seen["add2"]
    # before the fix the groups were dropped by the unlearning task: "expand" into a fresh group list
    assert decision.action == "retrain" and decision.group == "add"
    assert [g["name"] for g in groups] == ["add"] and groups[0]["tasks"] == ["add", "add2"]
    assert groups[0]["unlearned"] == ["forget"]
    adapter, unlearned = seen["unlearned"]
    assert adapter == "g0" and all(torch.equal(g0[k], v) for k, v in unlearned.items())


def test_unlearning_after_dema_unlearns_the_group_its_forget_set_is_routed_to(files, tmp_path, monkeypatch):
    from cltune.registry import Registry

    dema = {"name": "dema"}
    cfg = _cfg(
        [
            {"name": "add", "train": files["a"], "max_eval": 2, "method": dema},  # group g0
            {"name": "rev", "train": files["b"], "max_eval": 2, "method": dema},  # group g1, served last
            _forget_task(files),  # "add one to ..." prompts: routed to g0
        ]
    )
    seen: dict[str, Any] = {}
    npo_prepare, npo_after = Npo.prepare, Npo.after_task

    def spy_npo_prepare(self: Npo, model: Any, task: Any, state: Any) -> Any:
        seen["g1_before"] = adapter_state(model, "g1")
        return npo_prepare(self, model, task, state)

    def spy_npo_after(self: Npo, model: Any, task: Any) -> Any:
        seen["unlearned"], seen["g1_after"] = self.serve_adapter, adapter_state(model, "g1")
        return npo_after(self, model, task)

    monkeypatch.setattr(Npo, "prepare", spy_npo_prepare)
    monkeypatch.setattr(Npo, "after_task", spy_npo_after)
    reg = Registry(tmp_path / "reg")
    res = run_continual(cfg, tmp_path / "run", registry=reg, loaded=load_model(cfg.model))
    # before the fix: g1, the most recently served group, which never saw the forget set
    assert seen["unlearned"] == "g0"
    assert all(torch.equal(seen["g1_before"][k], v) for k, v in seen["g1_after"].items())
    forget = reg.get("forget")
    assert forget.group == "add" and not {q for q, _ in FORGET} & set(forget.codebook)
    assert res.scored_with["forget"]["columns"]["forget"] == {"g0": 2}  # scored with what unlearned


def test_unlearning_after_dema_refuses_a_forget_set_routed_to_several_groups(files, write_jsonl, tmp_path):
    dema = {"name": "dema"}
    mixed = str(write_jsonl(pc_rows(TASK_A[:4] + TASK_B[:4]), "mixed.jsonl"))
    cfg = _cfg(
        [
            {"name": "add", "train": files["a"], "max_eval": 2, "method": dema},
            {"name": "rev", "train": files["b"], "max_eval": 2, "method": dema},
            {**_forget_task(files), "train": mixed},
        ]
    )
    with pytest.raises(ConfigError, match="routed to 2 DEMA groups") as e:
        run_continual(cfg, tmp_path / "run", loaded=load_model(cfg.model))
    assert e.value.details["errors"][0]["groups"] == {"add": 4, "rev": 4}


def test_dema_rows_of_r_score_each_prompt_with_its_routed_group(files, tmp_path, monkeypatch):
    import cltune.evaluate as evaluate

    cfg = _cfg(
        [
            {"name": "a", "train": files["a"], "max_eval": 3},
            {"name": "b", "train": files["b"], "max_eval": 3},
        ]
    ).model_copy(update={"method": MethodConfig(name="dema")})
    used: list[str | None] = []
    generate = evaluate.generate

    def spy_generate(*args: Any, adapter: str | None = None, **kwargs: Any) -> list[str]:
        used.append(adapter)
        return generate(*args, adapter=adapter, **kwargs)

    monkeypatch.setattr(evaluate, "generate", spy_generate)
    res = run_continual(cfg, tmp_path / "run", loaded=load_model(cfg.model))
    assert set(used[-2:]) == {"g0", "g1"}  # the last row: task a's prompts on g0, b's on g1
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["scored_with"]
    assert saved["b"]["columns"] == {"a": {"g0": 3}, "b": {"g1": 3}} and "routed" in saved["b"]["how"]
    assert saved["base"]["columns"]["a"] == {"base": 3} and res.scored_with == saved


def test_router_falls_back_to_the_most_recent_group_when_asked():
    books = {"geo": ["What is the capital of Chile?"], "fr": ["Write the number 3 in French words."]}
    below = "Tell me a joke about cats."
    assert route_group(below, books, RouterParams()).group is None
    fell = route_group(below, books, RouterParams(fallback="recent"), recent="fr")
    assert fell.group == "fr" and fell.reason == "auto_fallback_recent"
    matched = route_group("What is the capital of Peru?", books, RouterParams(fallback="recent"), "fr")
    assert matched.group == "geo" and matched.reason == "auto_match"


CONTROL = {"name": "control_llm", "params": {"num_expanded": 1}}


def test_control_llm_records_the_trained_vs_served_gap_and_scores_the_served_adapter(files, tmp_path):
    from cltune.registry import Registry

    cfg = _cfg([{"name": "a", "train": files["a"], "max_eval": 3, "method": CONTROL}])
    reg = Registry(tmp_path / "reg")
    res = run_continual(cfg, tmp_path / "run", registry=reg, loaded=load_model(cfg.model))
    gap = res.train[0]["served_gap"]
    assert set(gap) >= {"trained_ce", "served_ce", "ce_gap", "trained_score", "served_score", "score_gap"}
    assert gap["ce_gap"] == pytest.approx(gap["served_ce"] - gap["trained_ce"]) and gap["trained_ce"] > 0
    assert reg.get("a").notes["served_gap"] == gap
    how = res.scored_with["a"]["how"]
    assert "merged-back lerp, w=0.5" in how and res.scored_with["a"]["columns"]["a"] == {"control": 3}


@pytest.mark.parametrize("restart", [False, True])
def test_control_llm_after_unlearning_continues_from_the_unlearned_served_weights(
    files, tmp_path, monkeypatch, restart
):
    from cltune.methods.control_llm import ADAPTER, ControlLlm, InterpolatedForward
    from cltune.models import decoder_layers

    cfg = _cfg(
        [
            {"name": "a", "train": files["a"], "max_eval": 2, "method": CONTROL},
            _forget_task(files),
            {"name": "b", "train": files["b"], "max_eval": 2, "method": CONTROL},
        ]
    )
    seen: dict[str, Any] = {"wrapped_while_unlearning": []}
    prepare, npo_prepare, npo_after = ControlLlm.prepare, Npo.prepare, Npo.after_task

    def spy_prepare(self: ControlLlm, model: Any, task: Any, state: Any) -> Any:
        model = prepare(self, model, task, state)
        seen[task.name] = adapter_state(model, ADAPTER)
        return model

    def spy_npo_prepare(self: Npo, model: Any, task: Any, state: Any) -> Any:
        wrapped = [isinstance(x.__dict__.get("forward"), InterpolatedForward) for x in decoder_layers(model)]
        seen["wrapped_while_unlearning"].append(any(wrapped))
        return npo_prepare(self, model, task, state)

    def spy_npo_after(self: Npo, model: Any, task: Any) -> Any:
        seen["unlearned"] = adapter_state(model, self.serve_adapter)
        return npo_after(self, model, task)

    monkeypatch.setattr(ControlLlm, "prepare", spy_prepare)
    monkeypatch.setattr(Npo, "prepare", spy_npo_prepare)
    monkeypatch.setattr(Npo, "after_task", spy_npo_after)
    if restart:  # stop at task 3; the new process restores tasks 1-2 from disk
        stop = Callbacks(should_stop=lambda: "b" in seen)
        with pytest.raises(StopRequested):
            run_continual(cfg, tmp_path / "run", loaded=load_model(cfg.model), callbacks=stop)
    run_continual(cfg, tmp_path / "run", loaded=load_model(cfg.model))
    assert not any(seen["wrapped_while_unlearning"])  # npo_rt unlearns the served (unwrapped) form
    w = 0.5  # sigmoid(init_logit 0)
    for k, v in seen["unlearned"].items():  # task b starts from the unlearned weights, unscaled
        torch.testing.assert_close(seen["b"][k], v / w if "lora_B" in k else v, rtol=0, atol=1e-6)


def test_cl_metrics_leave_unlearning_columns_out_and_report_them_apart():
    # learn, forget (a forget-set column: lower is better), learn
    R = [
        [0.1, 0.8, 0.0],
        [0.9, 0.9, 0.1],
        [0.7, 0.1, 0.2],
        [0.5, 0.2, 0.8],
    ]
    m = cl_metrics(R, unlearning=[False, True, False], names=["a", "f", "b"])
    assert m["ap"] == pytest.approx((0.5 + 0.8) / 2) and m["learning_tasks"] == 2
    assert m["bwt"] == pytest.approx(0.5 - 0.9)  # only task a has a later task; f's column is not in it
    assert m["bwt_T"] == pytest.approx((0.5 - 0.9) / 2)
    assert m["fwt"] == pytest.approx(0.2 - 0.0)  # task b only
    assert m["forgetting_per_task"] == pytest.approx([0.9 - 0.5])
    assert m["unlearning"] == {"f": {"before": 0.9, "right_after": 0.1, "after": 0.2}}
    assert cl_metrics(R)["ap"] == pytest.approx(0.5)  # without the flags: every column, as before


def test_an_unlearned_adapter_takes_its_parents_routing_group_without_the_forgotten_instructions(
    files, tmp_path
):
    from cltune.registry import Registry
    from cltune.router import route_auto

    cfg = _cfg([{"name": "learn", "train": files["a"], "max_eval": 2}, _forget_task(files)], steps=1)
    reg = Registry(tmp_path / "reg")
    run_continual(cfg, tmp_path / "run", registry=reg, loaded=load_model(cfg.model))
    learn, forget = reg.get("learn"), reg.get("forget")
    assert forget.group == learn.group  # before the fix: its own group, with the forget set as codebook
    assert set(forget.codebook) == set(learn.codebook) - {q for q, _ in FORGET}
    assert not {q for q, _ in FORGET} & set(forget.codebook)  # the forgotten text is not stored
    assert route_auto(RETAIN[0][0], reg).served_by == "forget@1"  # not the pre-unlearning parent
