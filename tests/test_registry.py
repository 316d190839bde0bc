"""Adapter registry: peft round trip with identical logits, immutable monotonic versions, lineage,
delete, method state, and names that could escape the registry directory."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import TASK_A, make_task
from peft import PeftModel

from cltune.adapter_files import PEFT_FILES
from cltune.config import LoraConfig, ModelConfig, TrainConfig
from cltune.errors import InvalidNameError, NotFoundError
from cltune.methods import build_method
from cltune.methods.base import MethodState
from cltune.methods.common import attach_adapter, peft_lora_config
from cltune.models import build_tiny_llama, load_model
from cltune.registry import Registry, parse_ref
from cltune.train import train_task

BAD_NAMES = ["../x", "/abs", "a/b", "a\\b", "a\nb", "tab\there", "nul\x00", "..", "", ".", "x/../y"]
IDS = torch.tensor([[5, 60, 70, 80, 90, 100, 110], [7, 8, 9, 10, 11, 12, 13]])


@pytest.fixture(scope="module")
def trained():
    """A tiny model with a seq_lora adapter trained a few steps (so the adapter is not a no-op)."""
    loaded = load_model(ModelConfig(name="tiny-llama", device="cpu"))
    model, fp = loaded.model, loaded.fingerprint
    task = make_task(
        loaded,
        TASK_A,
        lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
        train=TrainConfig(steps=3, batch_size=4, lr=1e-2, max_len=64),
    )
    method = build_method("seq_lora")
    torch.manual_seed(0)
    model = method.prepare(model, task, None)
    train_task(model, method, task, task.train_cfg)
    model.eval()
    return model, fp


def record(name: str = "capitals", **kw) -> dict:
    return {"name": name, "base_model": "tiny-llama", "base_fingerprint": "fp", "method": "seq_lora", **kw}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def digest(path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_stored_adapter_loads_in_peft_with_identical_logits(trained, tmp_path):
    model, fp = trained
    reg = Registry(tmp_path)
    rec = reg.save(model, "default", record(base_fingerprint=fp))
    path = reg.path("capitals", rec.version)
    assert all((path / f).exists() for f in PEFT_FILES)
    fresh_base, _, fresh_fp = build_tiny_llama(seed=0)
    assert fresh_fp == fp == reg.get("capitals").base_fingerprint
    base_logits = logits(fresh_base)
    loaded = PeftModel.from_pretrained(fresh_base, str(path))
    assert torch.equal(logits(loaded), logits(model))
    assert not torch.allclose(logits(loaded), base_logits)  # the adapter really changes the output


def test_a_non_default_adapter_is_stored_under_peft_default_names(trained, tmp_path):
    model, _ = trained
    base, _, _ = build_tiny_llama(seed=0)
    two = attach_adapter(base, "fast", peft_lora_config(LoraConfig(r=2, alpha=4)))
    two = attach_adapter(two, "slow", peft_lora_config(LoraConfig(r=2, alpha=4)))
    with torch.no_grad():
        for n, p in two.named_parameters():
            if "lora_B.slow" in n:
                p.fill_(0.3)
    two.set_adapter("slow")
    two.eval()
    reg = Registry(tmp_path)
    reg.save(two, "slow", record("ilora"))
    loaded = PeftModel.from_pretrained(build_tiny_llama(seed=0)[0], str(reg.path("ilora")))
    assert torch.equal(logits(loaded), logits(two))


def test_versions_are_monotonic_and_earlier_versions_never_change(trained, tmp_path):
    model, _ = trained
    reg = Registry(tmp_path)
    v1 = reg.save(model, "default", record())
    before = digest(reg.path("capitals", 1))
    with torch.no_grad():  # train "more": change the adapter, save again
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    try:
        v2 = reg.save(model, "default", record(parent=v1.ref))
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.sub_(0.01)
    assert (v1.version, v2.version) == (1, 2)
    assert reg.versions_of("capitals") == [1, 2]
    assert digest(reg.path("capitals", 1)) == before
    assert digest(reg.path("capitals", 2))["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert reg.get("capitals").version == 2  # latest by default
    assert reg.get("capitals@1").version == 1 and reg.get("capitals", 1).version == 1


def test_lineage_records_the_parent_version(trained, tmp_path):
    model, _ = trained
    reg = Registry(tmp_path)
    a = reg.save(model, "default", record("capitals", task="capitals"))
    b = reg.save(model, "default", record("numbers", task="numbers", parent=a.ref))
    c = reg.save(model, "default", record("numbers", parent=b.ref))
    assert reg.get("numbers@1").parent == "capitals@1"
    assert reg.get("numbers").parent == "numbers@1" == b.ref
    assert [r.version for r in reg.history("numbers")] == [1, 2]
    assert {r.ref for r in reg.list()} == {"capitals@1", c.ref}
    assert reg.names() == ["capitals", "numbers"]


def test_metadata_and_method_state_round_trip(trained, tmp_path):
    model, _ = trained
    reg = Registry(tmp_path)
    state = MethodState({"fisher": torch.arange(6.0).reshape(2, 3)}, {"n_seen": 40, "group": "g1"})
    rec = reg.save(
        model,
        "default",
        record(
            metrics={"score": 0.75, "R_row": [0.75, 0.1]},
            datasets=[{"task": "capitals", "role": "train", "sha256": "ab"}],
            codebook=["what is the capital of France?"],
        ),
        state,
    )
    got = reg.get(rec.ref)
    assert got == rec and got.metrics["R_row"] == [0.75, 0.1] and got.created_at
    back = reg.method_state(rec.ref)
    assert back.meta == {"n_seen": 40, "group": "g1"}
    assert torch.equal(back.tensors["fisher"], state.tensors["fisher"])


def test_delete_one_version_then_all(trained, tmp_path):
    model, _ = trained
    reg = Registry(tmp_path)
    for _ in range(3):
        reg.save(model, "default", record())
    assert reg.delete("capitals", 2) == [2]
    assert reg.versions_of("capitals") == [1, 3]
    with pytest.raises(NotFoundError):
        reg.get("capitals@2")
    assert reg.delete("capitals") == [1, 3]
    assert reg.names() == [] and reg.list() == []
    with pytest.raises(NotFoundError):
        reg.delete("capitals")
    with pytest.raises(NotFoundError):
        reg.path("never-saved")


def test_version_numbers_are_not_reused_after_delete(trained, tmp_path):
    model, _ = trained
    reg = Registry(tmp_path)
    reg.save(model, "default", record())
    reg.save(model, "default", record())
    reg.delete("capitals", 2)
    assert reg.save(model, "default", record()).version == 3  # capitals@2 keeps meaning the deleted one
    reg.delete("capitals")
    assert reg.save(model, "default", record()).version == 4


def test_no_temporary_files_are_left_behind(trained, tmp_path):
    model, _ = trained
    reg = Registry(tmp_path)
    reg.save(model, "default", record())
    reg.delete("capitals", 1)
    reg.save(model, "default", record())
    assert sorted(p.name for p in (tmp_path / "capitals").iterdir() if not p.name.startswith(".deleted")) == [
        "v2"
    ]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_path_trick_names_are_rejected(trained, tmp_path, bad):
    model, _ = trained
    reg = Registry(tmp_path / "reg")
    with pytest.raises(InvalidNameError):
        reg.save(model, "default", record(bad))
    for call in (
        lambda: reg.versions_of(bad),
        lambda: reg.path(bad),
        lambda: reg.get(bad),
        lambda: reg.delete(bad),
        lambda: parse_ref(bad),
    ):
        with pytest.raises(InvalidNameError):
            call()
    assert list(tmp_path.rglob("*")) == []  # nothing was written anywhere


def test_extra_file_names_are_checked(trained, tmp_path):
    model, _ = trained
    with pytest.raises(InvalidNameError):
        Registry(tmp_path).save(model, "default", record(), extra_files={"../evil": b"x"})


def test_parse_ref():
    assert parse_ref("capitals") == ("capitals", None)
    assert parse_ref("capitals@3") == ("capitals", 3)
    for bad in ["capitals@0", "capitals@x", "capitals@-1", "capitals@", "../x@1", "@2"]:
        with pytest.raises(InvalidNameError):
            parse_ref(bad)


def test_save_files_publishes_a_copy_and_refuses_an_incomplete_folder(trained, tmp_path):
    model, _ = trained
    reg = Registry(tmp_path / "reg")
    first = reg.save(model, "default", record("a"))
    copy = reg.save_files(reg.path("a", first.version), record("b", notes={"checkpoint_step": 7}))
    assert (copy.name, copy.version, copy.notes) == ("b", 1, {"checkpoint_step": 7})
    assert digest(reg.path("a")).pop("adapter_model.safetensors") == digest(reg.path("b")).pop(
        "adapter_model.safetensors"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotFoundError, match="adapter_config.json"):
        reg.save_files(empty, record("c"))
    assert reg.versions_of("c") == []
