"""cltune: continual, parameter-efficient fine-tuning of LLMs.

The public API, importable from here (each loads its module on first use, so `import cltune` and the
errors stay cheap: torch and transformers load only when a model, method or run is asked for):

    from cltune import load_config, run_continual, Registry
    cfg = load_config("configs/demo.yaml")
    results = run_continual(cfg, "runs/demo", registry=Registry("data/registry"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "cltune.config",
    "TaskConfig": "cltune.config",
    "MethodConfig": "cltune.config",
    "LoraConfig": "cltune.config",
    "TrainConfig": "cltune.config",
    "EvalConfig": "cltune.config",
    "ModelConfig": "cltune.config",
    "load_config": "cltune.config",
    "parse_config": "cltune.config",
    "run_continual": "cltune.continual",
    "Registry": "cltune.registry",
    "AdapterRecord": "cltune.registry",
    "load_model": "cltune.models",
    "METHODS": "cltune.methods",
    "build_method": "cltune.methods",
    "cl_metrics": "cltune.evaluate",
    "export_vllm": "cltune.export",
    "CLTuneError": "cltune.errors",
    "ConfigError": "cltune.errors",
    "DataError": "cltune.errors",
    "NotFoundError": "cltune.errors",
    "UnknownNameError": "cltune.errors",
}

__all__ = [  # written out (not derived from _EXPORTS) so that linters and type checkers read it
    "AdapterRecord",
    "CLTuneError",
    "ConfigError",
    "DataError",
    "EvalConfig",
    "LoraConfig",
    "METHODS",
    "MethodConfig",
    "ModelConfig",
    "NotFoundError",
    "Registry",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "UnknownNameError",
    "__version__",
    "build_method",
    "cl_metrics",
    "export_vllm",
    "load_config",
    "load_model",
    "parse_config",
    "run_continual",
]

if TYPE_CHECKING:
    from cltune.config import (
        EvalConfig,
        LoraConfig,
        MethodConfig,
        ModelConfig,
        RunConfig,
        TaskConfig,
        TrainConfig,
        load_config,
        parse_config,
    )
    from cltune.continual import run_continual
    from cltune.errors import CLTuneError, ConfigError, DataError, NotFoundError, UnknownNameError
    from cltune.evaluate import cl_metrics
    from cltune.export import export_vllm
    from cltune.methods import METHODS, build_method
    from cltune.models import load_model
    from cltune.registry import AdapterRecord, Registry


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cltune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
