"""Training-step cost of `seq_lora` through the library's own loop (cltune.train.train_task).

Run:  .venv/bin/python bench/train_step.py                       # tiny-llama and smollm2-135m
      .venv/bin/python bench/train_step.py --models tiny-llama --steps 8

Per model (each in its own child process, so peak RSS is that model's): batch 8 x 128 tokens of fixed-length
synthetic token ids (every token labelled), LoRA r=8 on q_proj/v_proj, fp32. Prints one JSON document:
median s/step over the measured steps after warm-up, tokens/s, peak RSS, and the model FLOP utilisation
  mfu = (4 x matmul_params x tokens per step / s_per_step) / fp32 matmul FLOP/s of this machine,
where 4 = 2 (forward) + 2 (gradient w.r.t. activations); frozen base weights need no weight gradient, and the
LoRA weights' own gradients and the attention-score matmuls are left out (small at r=8, 128 tokens).
The matmul FLOP/s is measured in the same process right before training (median of several 1024^3 fp32
torch.matmul calls), so the ratio is taken side by side under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = ("tiny-llama", "smollm2-135m")


def matmul_flops(device: Any, n: int = 1024, repeats: int = 10) -> tuple[float, list[float]]:
    """Median fp32 FLOP/s of an n x n by n x n torch.matmul (2 n^3 FLOPs each)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: thread pool start, allocator
        torch.matmul(a, b)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times), times


def matmul_params(model: Any) -> int:
    """Weights of every nn.Linear of the base model (lm_head included, tied or not; the embedding lookup,
    norms and the attention-score matmuls are not counted): the weights each token is multiplied by."""
    from torch import nn

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cltune.config import LoraConfig, ModelConfig, TrainConfig
    from cltune.methods import build_method
    from cltune.methods.base import TaskContext
    from cltune.models import load_model
    from cltune.train import Callbacks, Progress, train_task

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model(
        ModelConfig(name=name, device=args.device, dtype="float32"), Path(args.data_dir) / "models"
    )
    load_s = time.perf_counter() - t0
    model = loaded.model
    n_total = sum(p.numel() for p in model.parameters())
    n_matmul = matmul_params(model)
    vocab = model.config.vocab_size

    g = torch.Generator().manual_seed(0)
    n_examples = args.batch_size * (args.warmup + args.steps)  # every step sees new rows
    ids = torch.randint(3, vocab, (n_examples, args.seq_len), generator=g).tolist()
    rows = [{"input_ids": x, "labels": x, "index": i} for i, x in enumerate(ids)]
    lora = LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    cfg = TrainConfig(
        steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        lr=2e-4,
        schedule="constant",
        max_len=args.seq_len,
    )
    task = TaskContext(0, "bench", rows, [], lora, cfg, loaded.tokenizer.pad_token_id, loaded.device)
    method = build_method("seq_lora")
    torch.manual_seed(0)
    model = method.prepare(model, task, None)
    n_trainable = sum(p.numel() for p in method.trainable_parameters(model))

    peak, peak_samples = matmul_flops(loaded.device)
    stamps: list[float] = []
    tokens: list[float] = []

    def on_progress(p: Progress) -> None:
        stamps.append(time.perf_counter())
        tokens.append(p.tokens_per_s)

    t_start = time.perf_counter()
    result = train_task(model, method, task, cfg, callbacks=Callbacks(on_progress=on_progress))
    # step i's duration = time between its progress callback and the previous one (or the loop start)
    durations = [b - a for a, b in zip([t_start, *stamps[:-1]], stamps, strict=True)][args.warmup :]
    s_step = statistics.median(durations)
    tok_step = args.batch_size * args.seq_len
    achieved = 4 * n_matmul * tok_step / s_step
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "model": name,
        "method": "seq_lora",
        "lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": lora.target_modules},
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_step": tok_step,
        "warmup_steps": args.warmup,
        "steps_measured": len(durations),
        "s_per_step_median": s_step,
        "s_per_step_all": durations,
        "tokens_per_s": tok_step / s_step,
        "final_loss": result.final_loss,
        "load_s": load_s,
        "peak_rss_mb": rss_kb / 1024,
        "params_total": n_total,
        "params_trainable": n_trainable,
        "flops_param_count": n_matmul,
        "flops_param_count_is": "weights of all nn.Linear layers of the base model (incl. lm_head), "
        "no embedding lookup, no LoRA, no attention-score matmuls",
        "flops_per_step": 4 * n_matmul * tok_step,
        "achieved_flops_per_s": achieved,
        "matmul_fp32_flops_per_s": peak,
        "matmul_fp32_s_all": peak_samples,
        "matmul_size": 1024,
        "mfu": achieved / peak,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--steps", type=int, default=6, help="measured steps (median over them), >= 5")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    ap.add_argument(
        "--data-dir", default=os.environ.get("CLTUNE_DATA_DIR", "data"), help="model cache is DATA_DIR/models"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 5:
        ap.error("--steps must be >= 5")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.child:
        print(json.dumps(bench_model(models[0], args)))
        return 0
    results = []
    for m in models:  # one child per model: its own peak RSS and a clean allocator
        cmd = [sys.executable, __file__, "--child", "--models", m] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "models")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            results.append({"model": m, "error": out.stderr.strip().splitlines()[-1:] or ["failed"]})
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    doc = {
        "bench": "train_step",
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "load_avg_1m": os.getloadavg()[0],
        "results": results,
    }
    import torch

    doc["host"]["torch"] = torch.__version__
    print(json.dumps(doc, indent=1))
    print(f"{'model':14} {'s/step':>8} {'tok/s':>8} {'RSS MB':>8} {'MFU':>7}", file=sys.stderr)
    for r in results:
        if "error" not in r:
            print(
                f"{r['model']:14} {r['s_per_step_median']:8.3f} {r['tokens_per_s']:8.0f} "
                f"{r['peak_rss_mb']:8.0f} {r['mfu']:7.1%}",
                file=sys.stderr,
            )
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
