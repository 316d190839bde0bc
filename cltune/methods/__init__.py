"""Continual-learning methods by registry name. Each is one file, one params model, one line here."""

from __future__ import annotations

from typing import Any

from cltune.errors import UnknownNameError
from cltune.methods.base import LossOutput, Method, MethodState, TaskContext
from cltune.methods.seq_lora import SeqLora

METHODS: dict[str, Any] = {
    "seq_lora": SeqLora,
}


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Instantiate a method by registry name with validated params."""
    if name not in METHODS:
        raise UnknownNameError("method", name, list(METHODS))
    cls = METHODS[name]
    return cls(cls.Params.model_validate(params or {}))


__all__ = ["METHODS", "LossOutput", "Method", "MethodState", "TaskContext", "build_method"]
