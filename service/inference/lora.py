"""The gathered LoRA layer: many adapters in one Linear, each batch row using its own (punica / S-LoRA
style, no Python loop over adapters).

Every LoRA target Linear of the base model is replaced by a `GatheredLoRALinear` that keeps the base
Linear plus the stacked weights of all resident adapters, A: [S, r, in] and B: [S, out, r] (S slots,
ranks zero-padded to the largest r, the adapter's scaling folded into B). Slot 0 is all zeros: "no
adapter", so base-model requests share the batch. Each forward gathers one (A, B) per row by the rows'
slot ids (`BatchRows`, shared by every layer) and does two batched matmuls, so the cost does not grow with
the number of distinct adapters in the batch. `read_lora` turns a peft adapter directory into the
(A, scaled B) pairs the layers hold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn

from cltune.adapter_files import CONFIG, WEIGHTS
from cltune.errors import EngineError


class BatchRows:
    """Per-forward routing shared by every GatheredLoRALinear: the slot id of each batch row."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # [B] long; None: every row is the base model
        self.version = 0  # bumped when `slots` changes: layers re-gather their per-row weights

    def set(self, slots: torch.Tensor | None) -> None:
        self.slots = slots
        self.version += 1


class GatheredLoRALinear(nn.Module):
    """base(x) + per-row LoRA: y[b] = x[b] A[s_b]^T B[s_b]^T, with s_b the row's slot."""

    def __init__(self, base: nn.Linear, rows: BatchRows, n_slots: int) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        w = base.weight
        self.A: torch.Tensor
        self.B: torch.Tensor
        self.register_buffer("A", torch.zeros(n_slots, 1, base.in_features, dtype=w.dtype, device=w.device))
        self.register_buffer("B", torch.zeros(n_slots, base.out_features, 1, dtype=w.dtype, device=w.device))
        # The rows' slots stay fixed for a whole generation (until a row finishes), so the gathered
        # weights are made once per batch composition, not once per decode step.
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (rows.version, a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, in]
        y: torch.Tensor = self.base(x)  # [B, T, out]
        s = self.rows.slots
        if s is None:
            return y
        if self._gathered is None or self._gathered[0] != self.rows.version:
            a = self.A.index_select(0, s).transpose(1, 2).contiguous()  # [B, in, r]
            b = self.B.index_select(0, s).transpose(1, 2).contiguous()  # [B, r, out]
            self._gathered = (self.rows.version, a, b)
        _, a, b = self._gathered
        return torch.baddbmm(y, torch.bmm(x, a), b)  # y + (x a) b: [B, T, r] then [B, T, out]

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write one adapter's A [r, in] and scaled B [out, r] into `slot` (None: zeros)."""
        r = 0 if a is None else a.shape[0]
        if r > self.A.shape[1]:  # grow the padded rank; zero padding adds exact zeros
            pad = r - self.A.shape[1]
            self.A = torch.cat([self.A, self.A.new_zeros(self.A.shape[0], pad, self.A.shape[2])], 1)
            self.B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], self.B.shape[1], pad)], 2)
        self._gathered = None
        self.A[slot].zero_()
        self.B[slot].zero_()
        if a is not None and b is not None:
            self.A[slot, :r] = a.to(self.A)
            self.B[slot, :, :r] = b.to(self.B)


def read_lora(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A peft-format LoRA directory -> {module name in the base model: (A [r, in], scaling * B [out, r])}.

    Raises:
        EngineError: a variant the gathered forward cannot serve (DoRA, embedding targets, modules_to_save).
    """
    cfg = json.loads((path / CONFIG).read_text())
    if cfg.get("use_dora"):
        raise EngineError(f"adapter {path} uses DoRA, which cannot be served in mixed batches")
    if cfg.get("modules_to_save"):
        raise EngineError(f"adapter {path} has modules_to_save {cfg['modules_to_save']}: not servable here")
    tensors = load_file(str(path / WEIGHTS))
    alpha, alpha_pattern = float(cfg.get("lora_alpha", 8)), cfg.get("alpha_pattern") or {}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if ".lora_B." not in key:
                raise EngineError(
                    f"adapter {path} has tensor {key!r}: only Linear LoRA (lora_A/lora_B) is servable"
                )
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        al = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), alpha))
        scale = al / math.sqrt(r) if cfg.get("use_rslora") else al / r
        if cfg.get("fan_in_fan_out"):
            raise EngineError(f"adapter {path} uses fan_in_fan_out (Conv1D bases): not servable here")
        out[module] = (a, b * scale)
    return out
