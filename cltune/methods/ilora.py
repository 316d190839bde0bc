"""ilora: I-LoRA (Ren et al. 2024), dual-memory experience replay with two LoRA adapters.

A fast adapter ("default") is trained; a slow adapter ("slow") follows it by EMA after every optimizer
step; replayed examples from earlier tasks tie the fast learner's hidden states to the slow learner's
(docs/methods.md section 1). Per step, once the buffer holds earlier tasks' examples:

    loss = (CE_current + CE_replay) / 2 + gamma * mean((h_fast - max(h_fast, h_slow))^2)

Fixed here against the reference: the EMA pairs tensors per LoraLayer (the reference matched names
that never match, so its slow adapter never moved), replay batches pad labels with -100 and carry an
attention mask, and "first task" means "the buffer held nothing when the task started".

In a sequence that mixes methods, the buffer and step counter come back from I-LoRA's last task
(`TaskContext.own_state`), but both adapters start from what the previous task served when another
method trained it (after an unlearning task: the unlearned adapter), and buffered copies of unlearned
examples (`TaskContext.forgotten`) are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cltune.data import ReplayBuffer, collate
from cltune.methods.base import (
    LossOutput,
    MethodState,
    TaskContext,
    continues_other,
    example_sha256,
    own_state,
)
from cltune.methods.common import (
    adapter_parameters,
    adapter_state,
    answer_logits,
    attach_adapter,
    ce_loss,
    continue_served,
    copy_adapter,
    ema_,
    load_adapter_state,
    only_train,
    paired_lora_tensors,
    peft_lora_config,
    preserved_training_state,
)

FAST, SLOW = "default", "slow"


class ILoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ema_decay: float = Field(
        0.99, ge=0.0, lt=1.0
    )  # lam: weight kept on the slow copy (reference literal: 0.25)
    gamma: float = Field(1.0, ge=0.0, le=100.0)  # weight of the hidden-state consistency loss
    buffer_size: int = Field(500, ge=1, le=1_000_000)  # replay buffer capacity B, in examples
    serve: Literal["slow", "fast"] = "slow"  # which adapter is registered and served
    seed: int = Field(0, ge=0)  # reservoir sampling and replay draws


def consistency_loss(
    h_fast: list[torch.Tensor], h_slow: list[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """mean over layers, real positions and features of (h_f - max(h_f, h_s))^2.

    h_fast / h_slow: per layer [B, T, H] (embedding output excluded); mask: attention mask [B, T].
    Only positions where the fast learner falls below the slow one are pulled up (the max target).
    """
    m = mask.unsqueeze(-1).float()  # [B, T, 1]; fp32 sums even when the model runs in bf16
    denom = m.sum() * h_fast[0].shape[-1] * len(h_fast)  # real positions x features x layers
    total = m.new_zeros(())
    for hf, hs in zip(h_fast, h_slow, strict=True):
        target = torch.maximum(hf, hs.detach()).float()  # [B, T, H]; no gradient into the target
        total = total + ((hf.float() - target).pow(2) * m).sum()
    return total / denom.clamp(min=1.0)


def ema_decay_at(step: int, lam: float) -> float:
    """lam_t = min(1 - 1/(step + 1), lam): the slow copy follows closely during the first steps."""
    return min(1.0 - 1.0 / (step + 1), lam)


def encode_buffer(buf: ReplayBuffer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A ReplayBuffer as flat int tensors (ids, labels, lengths) + JSON meta (sizes, RNG state)."""
    lengths = [len(x["input_ids"]) for x in buf.items]
    flat_ids = [t for x in buf.items for t in x["input_ids"]]
    flat_labels = [t for x in buf.items for t in x["labels"]]
    tensors = {
        "buffer.input_ids": torch.tensor(flat_ids, dtype=torch.int64),  # [sum(lengths)]
        "buffer.labels": torch.tensor(flat_labels, dtype=torch.int64),
        "buffer.lengths": torch.tensor(lengths, dtype=torch.int64),  # [len(buf)]
    }
    state = buf.state_dict()
    meta = {
        "capacity": state["capacity"],
        "seed": state["seed"],
        "n_seen": state["n_seen"],
        "rng": state["rng"],
    }
    return tensors, meta


def drop_examples(buf: ReplayBuffer, fingerprints: frozenset[str]) -> int:
    """Remove the buffered copies of examples whose example_sha256 is in `fingerprints` (unlearned).
    Returns how many were removed. n_seen is kept: later reservoir draws stay uniform over the stream."""
    if not fingerprints:
        return 0
    keep = [x for x in buf.items if example_sha256(x) not in fingerprints]
    dropped, buf.items = len(buf.items) - len(keep), keep
    return dropped


def decode_buffer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> ReplayBuffer:
    lengths = tensors["buffer.lengths"].tolist()
    ids, labels = tensors["buffer.input_ids"].tolist(), tensors["buffer.labels"].tolist()
    items, pos = [], 0
    for n in lengths:
        items.append({"input_ids": ids[pos : pos + n], "labels": labels[pos : pos + n]})
        pos += n
    return ReplayBuffer.from_state({**meta, "items": items})


class ILora:
    name: ClassVar[str] = "ilora"
    Params: ClassVar[type[BaseModel]] = ILoraParams
    train_defaults: ClassVar[Mapping[str, float]] = {"lr": 1e-3}  # docs/benchmarks.md, "Learning rates"

    def __init__(self, params: ILoraParams | None = None) -> None:
        self.params = params or ILoraParams()
        self.serve_adapter = SLOW if self.params.serve == "slow" else FAST
        self.buffer = ReplayBuffer(self.params.buffer_size, self.params.seed)
        self.global_step = 0  # optimizer steps over all tasks (drives lam_t)
        self.replay = False  # the buffer held earlier tasks' examples when this task started
        self._task: TaskContext | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (fast, slow) per lora_A / lora_B

    # ------------------------------------------------------------ task lifecycle

    def prepare(self, model: nn.Module, task: TaskContext, state: MethodState | None) -> nn.Module:
        config = peft_lora_config(task.lora)
        fresh_slow = not (isinstance(model, PeftModel) and SLOW in model.peft_config)
        model = attach_adapter(model, FAST, config)
        model = attach_adapter(model, SLOW, config)
        own, other = own_state(self.name, task, state), continues_other(self.name, state)
        if own is not None:  # buffer, step counter (the EMA warm-up) and replay flag survive other tasks
            self.load_state_dict(own)
        # after another method's task: fast and slow = what it served (e.g. the unlearned adapter)
        continued = other is not None and self._continue_from(model, other, task)
        if not continued and own is not None:
            self._load_adapters(model, own)
        elif not continued and fresh_slow:  # first I-LoRA task: slow starts as the fast weights
            copy_adapter(model, FAST, SLOW)
        dropped = drop_examples(self.buffer, task.forgotten)
        model.set_adapter(FAST)
        only_train(model, self.trainable_parameters(model))
        self._pairs = paired_lora_tensors(model, FAST, SLOW)  # walked once, not per step
        self._task = task
        self.replay = len(self.buffer) > 0
        task.emit(
            f"ilora: replay {'on' if self.replay else 'off'}, "
            f"buffer {len(self.buffer)}/{self.buffer.capacity}"
            + (f" ({dropped} unlearned examples dropped)" if dropped else ""),
            buffer=len(self.buffer),
            n_seen=self.buffer.n_seen,
            replay=self.replay,
            dropped=dropped,
        )
        return model

    def _continue_from(self, model: PeftModel, source: str, task: TaskContext) -> bool:
        """Start fast AND slow from adapter `source`, which another method's task served last (its
        weights, not I-LoRA's older copies: an unlearning task must not be undone by the EMA pulling the
        slow adapter back to a fast one that never unlearned). Returns False when `source` cannot be
        copied (another target set or rank); refuses then if examples were unlearned in the run."""
        if source in (FAST, SLOW):
            copy_adapter(model, source, SLOW if source == FAST else FAST)
            return True
        return continue_served(model, source, (FAST, SLOW), task, self.name)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return adapter_parameters(model, FAST)  # never the slow adapter: it moves only by EMA

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        if not self.replay:
            self._remember(batch)
            return ce_loss(model, batch)
        assert self._task is not None
        # One fast forward over [current; replay] (2B rows) instead of two: the same FLOPs in fewer,
        # larger calls. Rows are right-padded, so padding never changes a real position's output.
        n = batch["input_ids"].shape[0]
        current = [self._task.train[i] for i in batch["index"].tolist()]
        # data-parallel: every rank draws the same global replay batch and takes its share, so the
        # run replays what one process would (ranks share the buffer's seed and contents)
        world, rank = self._task.world, self._task.rank
        replayed = self.buffer.sample(n * world)[rank::world]
        joint = collate(current + replayed, self._task.pad_id)  # labels padded with -100
        joint = {k: v.to(batch["input_ids"].device) for k, v in joint.items()}
        out = answer_logits(model, joint, hidden_states=True)  # the lm_head runs on answer tokens only
        assert out.hidden_states is not None
        current_rows = out.rows < n  # [N] answer tokens of the current batch
        ce_c, ce_r = out.ce(current_rows), out.ce(~current_rows)
        replay = {"input_ids": joint["input_ids"][n:], "attention_mask": joint["attention_mask"][n:]}
        h_fast = [h[n:] for h in out.hidden_states[1:]]  # [0] is the embedding output: skipped
        l_cons = consistency_loss(h_fast, self.slow_hidden_states(model, replay), replay["attention_mask"])
        total = (ce_c + ce_r) / 2 + self.params.gamma * l_cons
        self._remember(batch)
        return LossOutput(total, {"ce": ce_c.item(), "ce_replay": ce_r.item(), "l_cons": l_cons.item()})

    @torch.no_grad()
    def slow_hidden_states(self, model: Any, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Hidden states of the slow adapter, layers 1..L, each [B, T, H]; flags and mode restored.

        Eval mode: the slow learner is a regression target, so it runs without dropout noise (as NPO's
        reference does), which also skips a dropout mask per LoRA layer.
        """
        with preserved_training_state(model):  # set_adapter flips requires_grad; this puts it back
            assert isinstance(model, PeftModel)
            model.set_adapter(SLOW)
            model.eval()
            # the decoder alone: hidden states need no lm_head (about a fifth of SmolLM2's forward)
            base: Any = model.get_base_model()  # a transformers model: get_decoder() skips the lm_head
            out = base.get_decoder()(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
            )
        return list(out.hidden_states[1:])

    def after_step(self, model: nn.Module, step: int) -> None:
        self.global_step += 1
        ema_(self._pairs, ema_decay_at(self.global_step, self.params.ema_decay))

    def after_task(self, model: nn.Module, task: TaskContext) -> MethodState:
        assert isinstance(model, PeftModel)
        tensors = {f"fast.{k}": v for k, v in adapter_state(model, FAST).items()}
        tensors |= {f"slow.{k}": v for k, v in adapter_state(model, SLOW).items()}
        state = self.state_dict()
        state.tensors |= tensors
        state.meta["notes"] = {
            "serve": self.params.serve,
            "ema_decay": self.params.ema_decay,
            "buffer": len(self.buffer),
            "n_seen": self.buffer.n_seen,
            "global_step": self.global_step,
            "replay_this_task": self.replay,
        }
        return state

    # ------------------------------------------------------------ state

    def state_dict(self) -> MethodState:
        """Buffer, step counter and the replay flag. (Mid-task checkpoints store adapters themselves.)"""
        tensors, buf_meta = encode_buffer(self.buffer)
        meta = {
            "method": self.name,
            "serve_adapter": self.serve_adapter,
            "global_step": self.global_step,
            "replay": self.replay,
            "buffer": buf_meta,
        }
        return MethodState(tensors, meta)

    def load_state_dict(self, state: MethodState) -> None:
        if not state.meta:
            return
        self.global_step = int(state.meta["global_step"])
        self.replay = bool(state.meta["replay"])
        self.buffer = decode_buffer(state.tensors, state.meta["buffer"])
        if self.buffer.capacity != self.params.buffer_size:  # a later job may shrink B: keep B of the items
            self.buffer.capacity = self.params.buffer_size
            self.buffer.items = self.buffer.items[: self.params.buffer_size]

    def _load_adapters(self, model: PeftModel, state: MethodState) -> None:
        """Restore both adapters from I-LoRA's last after_task state."""
        for prefix, adapter in (("fast.", FAST), ("slow.", SLOW)):
            part = {k[len(prefix) :]: v for k, v in state.tensors.items() if k.startswith(prefix)}
            if part:
                load_adapter_state(model, adapter, part)

    def _remember(self, batch: dict[str, torch.Tensor]) -> None:
        """Reservoir-add the batch's examples (unpadded token lists, from the task's data): every rank's
        rows, so that each rank of a data-parallel run keeps the buffer one process would."""
        assert self._task is not None
        rows = batch.get("global_index", batch["index"]).tolist()
        self.buffer.add([self._task.train[i] for i in rows if i >= 0])
