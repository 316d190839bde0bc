"""Continual-learning methods by registry name. Each is one file, one params model, one line here."""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel

from cltune.errors import UnknownNameError
from cltune.methods.base import LossOutput, Method, MethodState, TaskContext
from cltune.methods.control_llm import ControlLlm
from cltune.methods.dema import Dema
from cltune.methods.ilora import ILora
from cltune.methods.kappatune import KappaTune
from cltune.methods.npo import GradAscent, Npo, NpoKL, NpoRetain
from cltune.methods.seq_lora import SeqLora


class MethodClass(Protocol):
    """A method class as METHODS holds it: its params model, and a constructor that takes them."""

    Params: type[BaseModel]

    def __call__(self, params: Any) -> Method: ...


METHODS: dict[str, MethodClass] = {
    "seq_lora": SeqLora,
    "control_llm": ControlLlm,
    "kappatune": KappaTune,
    "ilora": ILora,
    "dema": Dema,
    "npo": Npo,
    "npo_rt": NpoRetain,
    "npo_kl": NpoKL,
    "grad_ascent": GradAscent,
}


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Instantiate a method by registry name with validated params."""
    if name not in METHODS:
        raise UnknownNameError("method", name, list(METHODS))
    cls = METHODS[name]
    return cls(cls.Params.model_validate(params or {}))


__all__ = ["METHODS", "LossOutput", "Method", "MethodState", "TaskContext", "build_method"]
