"""`cltune adapters export --format vllm`: the directory vLLM's --lora-modules loads, and a clear refusal
of what vLLM cannot serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from cltune.errors import ExportError, NotFoundError
from cltune.export import export_from_registry, export_vllm, vllm_adapter_config
from cltune.models import LoadedModel, build_tiny_llama
from cltune.registry import Registry
from service.cli import main as cltune_main


def _registered(tiny: LoadedModel, root: Path, **lora: object) -> Registry:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora)  # type: ignore[arg-type]
    model = get_peft_model(tiny.model, cfg)
    with torch.no_grad():  # non-zero B so the export's weights are not trivially equal
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    reg = Registry(root)
    record = {"name": "capitals", "base_model": "tiny-llama", "base_fingerprint": "fp", "method": "seq_lora"}
    reg.save(model, "default", record)
    return reg


def test_an_exported_adapter_is_a_vllm_lora_module_and_loads_back_in_peft(
    tiny: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = _registered(tiny, tmp_path / "reg")
    assert (
        cltune_main(
            [
                "adapters",
                "export",
                "capitals@1",
                "--format",
                "vllm",
                "--out",
                str(tmp_path / "out"),
                "--registry",
                str(tmp_path / "reg"),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["serve"].endswith(f"--enable-lora --lora-modules capitals={tmp_path / 'out'}")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    # what vLLM's PEFTHelper requires, and nothing it refuses
    assert (
        config["r"] == 4
        and config["lora_alpha"] == 8
        and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    )
    assert config["peft_type"] == "LORA" and not config.get("use_dora") and not config.get("modules_to_save")
    assert config.get("bias", "none") == "none"
    src = load_file(reg.path("capitals") / "adapter_model.safetensors")
    out = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)
    # vLLM parses names of the form base_model.model.<module path>.lora_{A,B}.weight
    assert all(
        k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in out
    )
    base = build_tiny_llama(0)[0]
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "out"))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(loaded(ids).logits, reg_model_logits(reg, ids), atol=1e-5)


def reg_model_logits(reg: Registry, ids: torch.Tensor) -> torch.Tensor:
    return PeftModel.from_pretrained(build_tiny_llama(0)[0], str(reg.path("capitals")))(ids).logits


def test_what_vllm_cannot_serve_is_refused_with_every_reason() -> None:
    tensors = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.extra.weight",
    ]
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "use_dora": True,
        "modules_to_save": ["lm_head"],
        "rank_pattern": {"q_proj": 8},
    }
    with pytest.raises(ExportError) as e:
        vllm_adapter_config(config, tensors)
    assert len(e.value.details["problems"]) == 4
    for word in ("DoRA", "modules_to_save", "rank_pattern", "not LoRA A/B"):
        assert word in e.value.message


def test_a_high_rank_all_linear_adapter_exports_with_its_serve_flags(tmp_path: Path) -> None:
    tensors = {
        f"base_model.model.model.layers.0.{m}.lora_{ab}.weight": torch.zeros(32, 8)
        for m in ("self_attn.q_proj", "mlp.down_proj")
        for ab in "AB"
    }
    (tmp_path / "src").mkdir()
    save_file(tensors, tmp_path / "src" / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 32, "lora_alpha": 64, "target_modules": "all-linear", "bias": "none"}
    (tmp_path / "src" / "adapter_config.json").write_text(json.dumps(config))
    res = export_vllm(tmp_path / "src", tmp_path / "out", "big", base_model="/models/base")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj",
        "q_proj",
    ]
    assert "--max-lora-rank 32" in res.serve_command and res.serve_command.startswith(
        "vllm serve /models/base"
    )
    with pytest.raises(ExportError, match="not empty"):
        export_vllm(tmp_path / "src", tmp_path / "out", "big")


def test_exporting_a_missing_adapter_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no adapter named 'nope'"):
        export_from_registry(tmp_path, "nope", tmp_path / "out")
