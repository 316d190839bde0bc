"""Export an adapter for serving elsewhere: `vllm` writes the directory that
`vllm serve BASE --enable-lora --lora-modules NAME=DIR` loads.

vLLM reads peft's files (adapter_config.json + adapter_model.safetensors) through its PEFTHelper, which
keeps only r, lora_alpha, target_modules, bias, modules_to_save, use_rslora, use_dora and context_length
and ignores every other field. What it refuses or would get wrong, checked here before it gets that far:
  - use_dora: true                 refused ("vLLM does not yet support DoRA")
  - modules_to_save (non-empty)    refused ("vLLM only supports modules_to_save being None")
  - bias != "none"                 refused unless vLLM runs with --enable-lora-bias
  - rank_pattern / alpha_pattern   ignored by vLLM: per-module ranks or scales would be served wrong
  - r > 16                         needs `--max-lora-rank` >= r (vLLM's default maximum is 16)
  - tensors other than lora_A / lora_B (method-specific layers, e.g. widened blocks) cannot be loaded
  - target_modules "all-linear"    written out as the module names the weights actually hold
  - layers_to_transform            ignored by vLLM; harmless, since only layers with weights get LoRA
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cltune.adapter_files import CONFIG, RECORD, WEIGHTS
from cltune.errors import ExportError, NotFoundError

VLLM_DEFAULT_MAX_RANK = 16


@dataclass
class Export:
    path: Path
    name: str
    base_model: str | None
    max_lora_rank: int
    notes: list[str] = field(default_factory=list)

    @property
    def serve_command(self) -> str:
        rank = f" --max-lora-rank {self.max_lora_rank}" if self.max_lora_rank > VLLM_DEFAULT_MAX_RANK else ""
        return (
            f"vllm serve {self.base_model or 'BASE_MODEL_DIR'} --enable-lora{rank} "
            f"--lora-modules {self.name}={self.path}"
        )


def _tensor_names(weights: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return list(f.keys())


def vllm_adapter_config(config: dict[str, Any], tensors: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The adapter_config vLLM loads, and notes for the user.

    Raises:
        ExportError: every feature vLLM would refuse or serve wrongly, at once.
    """
    problems, notes = [], []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r}: vLLM serves LoRA adapters only")
    if config.get("use_dora"):
        problems.append("use_dora: vLLM does not support DoRA adapters")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: vLLM supports none")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} {config[key]}: vLLM ignores it and would scale those modules wrongly")
    other = sorted({n for n in tensors if "lora_A" not in n and "lora_B" not in n})
    if other:
        problems.append(
            f"{len(other)} tensors are not LoRA A/B matrices (e.g. {other[0]}): vLLM cannot load them"
        )
    if problems:
        raise ExportError("this adapter cannot be served by vLLM: " + "; ".join(problems), problems=problems)
    out = dict(config)
    modules = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in tensors})  # [..].q_proj.lora_A.weight
    if isinstance(out.get("target_modules"), str) or not out.get("target_modules"):
        notes.append(f"target_modules {out.get('target_modules')!r} written as the trained modules {modules}")
        out["target_modules"] = modules
    if out.get("bias", "none") != "none":
        notes.append(f"bias={out['bias']!r}: start vLLM with --enable-lora-bias")
    if out.get("layers_to_transform") is not None:
        notes.append("layers_to_transform is ignored by vLLM; the saved weights cover only those layers")
    if int(out["r"]) > VLLM_DEFAULT_MAX_RANK:
        notes.append(f"r={out['r']} > {VLLM_DEFAULT_MAX_RANK}: start vLLM with --max-lora-rank {out['r']}")
    out["inference_mode"] = True
    return out, notes


def export_vllm(src: str | Path, out: str | Path, name: str, base_model: str | None = None) -> Export:
    """Write adapter directory `src` (peft format) as a vLLM LoRA module into `out` (created; must be
    empty or absent). The record.json, when present, is kept beside it for provenance.

    Raises:
        NotFoundError: `src` lacks the peft files.
        ExportError: vLLM cannot load this adapter (see the module docstring).
    """
    src, out = Path(src), Path(out)
    if not (src / CONFIG).is_file() or not (src / WEIGHTS).is_file():
        raise NotFoundError(f"{str(src)!r} has no {CONFIG} and {WEIGHTS}", path=str(src))
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory {str(out)!r} is not empty", path=str(out))
    config, notes = vllm_adapter_config(json.loads((src / CONFIG).read_text()), _tensor_names(src / WEIGHTS))
    record = json.loads((src / RECORD).read_text()) if (src / RECORD).is_file() else {}
    base = base_model or config.get("base_model_name_or_path") or None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:  # written beside `out`, then renamed: a half-written export never looks complete
        shutil.copyfile(src / WEIGHTS, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if record:
            (tmp / "cltune_record.json").write_text(json.dumps(record, indent=1))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Export(out.resolve(), name, base, int(config["r"]), notes)


def base_model_dir(record: dict[str, Any], models_dir: str | Path | None) -> str | None:
    """The Hugging Face directory vLLM can load as this adapter's base: the model directory the
    record names, or the shipped SmolLM2 as cltune converted it into `models_dir` (same fingerprint)."""
    base = str(record.get("base_model") or "")
    if base and Path(base).is_dir():
        return str(Path(base).resolve())
    fp = str(record.get("base_fingerprint") or "")
    if models_dir is not None and base == "smollm2-135m" and fp.startswith("gguf-sha256:"):
        d = Path(models_dir) / f"smollm2-135m-{fp.split(':')[1][:12]}"  # cltune.models._smollm2_dir
        if (d / "config.json").is_file():
            return str(d.resolve())
    return None


def export_from_registry(
    root: str | Path, ref: str, out: str | Path, models_dir: str | Path | None = None
) -> Export:
    """Export `name[@version]` of the registry at `root` (latest version when none is given)."""
    from cltune.registry import Registry, parse_ref  # late: loads torch and peft

    name, version = parse_ref(ref)
    src = Registry(root).path(name, version)
    record = json.loads((src / RECORD).read_text())
    base = base_model_dir(record, models_dir)
    result = export_vllm(src, out, name, base)
    if base is None:
        result.notes.append(
            f"base model {record.get('base_model')!r}: pass vLLM its Hugging Face directory (for smollm2-135m, "
            "<data_dir>/models/smollm2-135m-<fingerprint>, written on the first load)"
        )
    return result
