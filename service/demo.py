"""`cltune demo` as a user would run it: start the embedded service (API + one worker) on a loopback
port, upload the demo datasets, submit the continual job over REST, follow its events (SSE) with a
progress bar, print the R matrix from the job's result, then ask the routed endpoint (`model="auto"`)
one held-out question per task."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from cltune.config import load_config
from cltune.demo_data import ensure_demo_data, write_demo_data
from cltune.errors import CLTuneError
from cltune.evaluate import format_matrix
from cltune.task_data import read_task_data

DEMO_TENANT = ("demo", "t_demo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedService:
    """The API (uvicorn in a thread) and one worker (in a thread; each job in a child process)."""

    def __init__(self, data_dir: Path, model: str) -> None:
        import uvicorn

        from service import auth
        from service.api.app import create_app
        from service.db import init_db, make_engine
        from service.settings import Settings
        from service.worker import Worker

        self.settings = Settings(
            data_dir=data_dir, host="127.0.0.1", port=_free_port(), engine_model=model, embedded_worker=False
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(self.settings.db_url)
        init_db(engine)
        tenant = auth.ensure_tenant(engine, *DEMO_TENANT)
        self.key = auth.create_key(engine, tenant.id).key
        self.url = f"http://127.0.0.1:{self.settings.port}"
        config = uvicorn.Config(
            create_app(self.settings, engine),
            host="127.0.0.1",
            port=self.settings.port,
            log_level="warning",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.worker = Worker(self.settings, worker_id="demo-worker")
        self._threads = [
            threading.Thread(target=self.server.run, daemon=True),
            threading.Thread(target=self.worker.run, daemon=True),
        ]

    def __enter__(self) -> EmbeddedService:
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the embedded API did not start within 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()
        self.server.should_exit = True
        for t in self._threads:
            t.join(timeout=15)


def _follow(client: httpx.Client, job_id: str) -> None:
    """Print the job's events as they arrive (SSE), with a tqdm bar per task."""
    from tqdm import tqdm

    bar: Any = None
    with client.stream("GET", f"/v1/jobs/{job_id}/events/stream", timeout=None) as resp:
        kind = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if kind == "end":
                    break
                if kind == "progress":
                    p = data["data"]
                    if bar is None or bar.desc != p["task"]:
                        if bar is not None:
                            bar.close()
                        bar = tqdm(total=p["total_steps"], desc=p["task"], unit="step", file=sys.stderr)
                    bar.n = p["step"]
                    bar.set_postfix(loss=f"{p['loss']:.3f}", refresh=False)
                    bar.refresh()
                else:
                    if bar is not None:
                        bar.close()
                        bar = None
                    print(f"[job] {data['message']}", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()


def run_demo(config_path: str, overrides: list[str], data_dir: Path, methods: list[str] | None = None) -> int:
    """Run the demo sequence once per method (seq_lora, then a continual-learning method) as jobs of
    one service, print each R matrix and the two side by side, then ask the routed endpoint."""
    started = time.perf_counter()
    write_demo_data(data_dir / "demo")
    cfg = load_config(config_path, overrides)  # validated here so mistakes show before anything starts
    ensure_demo_data(t.train for t in cfg.tasks)  # the config's paths, wherever CLTUNE_DATA_DIR points
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    methods = methods or [cfg.method.name]
    with EmbeddedService(data_dir, cfg.model.name) as svc:
        print(f"cltune service: {svc.url} (tenant {DEMO_TENANT[0]!r}, API key {svc.key})", flush=True)
        client = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {svc.key}"}, timeout=120)
        job_config = cfg.model_dump(mode="json", exclude_unset=False)
        for task in job_config["tasks"]:
            with open(task["train"], "rb") as f:
                r = client.post("/v1/datasets", files={"file": (Path(task["train"]).name, f)})
            r.raise_for_status()
            ds = r.json()
            print(
                f"uploaded {task['name']}: {ds['id']} ({ds['examples']} examples, sha256 {ds['sha256'][:12]})"
            )
            task["train"] = ds["id"]
        results = {}
        for method in methods:
            job_config["name"] = f"{raw.get('name', cfg.name)}-{method}"
            job_config["method"] = {"name": method, "params": {}}
            res = _run_job(client, job_config)
            if res is None:
                return 1
            results[method] = res
        if len(results) > 1:
            print("\n" + side_by_side(results))
        _ask_router(svc, cfg)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return 0


def _run_job(client: httpx.Client, job_config: dict[str, Any]) -> dict[str, Any] | None:
    """Submit one job, follow it, print its R matrix; its result, or None if it did not succeed."""
    method = job_config["method"]["name"]
    r = client.post("/v1/jobs", json={"config": job_config})
    if r.status_code >= 400:
        raise CLTuneError(f"the service refused the job: {r.text}")
    job = r.json()
    print(f"\nsubmitted job {job['id']} ({method}); following its events", flush=True)
    _follow(client, job["id"])
    job = client.get(f"/v1/jobs/{job['id']}").json()
    if job["status"] != "succeeded":
        print(f"job {job['id']} ended {job['status']}: {job.get('error')}", file=sys.stderr)
        return None
    res: dict[str, Any] = job["result"]
    general = {k: v["values"] for k, v in (res.get("general") or {}).items()}
    print(f"\n[{method}] accuracy matrix R (rows: after training; columns: evaluated task)")
    print(format_matrix(res["R"], res["tasks"], general))
    m = res["metrics"]
    print(
        f"AP  = {m['ap']:.3f}\nBWT = {m['bwt']:.3f}  (normaliser {m['bwt_normalizer']}; TRACE 1/T: "
        f"{m['bwt_T']:.3f})\nFWT = {m['fwt']:.3f}\nForgetting = {m['forgetting']:.3f}"
    )
    for t in res.get("train", []):
        print(f"  {t['task']}: {t['steps']} steps ({t.get('stop_reason')}), {t['seconds']:.0f} s")
    print("adapters: " + ", ".join(a["ref"] for a in res["adapters"]))
    print(f"results, heatmap and learning curves: {res['run_dir']}")
    return res


def side_by_side(results: dict[str, dict[str, Any]]) -> str:
    """One line per method: AP, BWT, forgetting, each task's final score and general-ability retention."""
    first = next(iter(results.values()))
    probes = list(first.get("general") or {})
    head = ["method", "AP", "BWT", "forgetting", *first["tasks"], *(f"{p} kept" for p in probes)]
    lines = ["".join(h.rjust(16) if i else h.ljust(12) for i, h in enumerate(head))]
    for method, res in results.items():
        m, general = res["metrics"], res.get("general") or {}
        kept = [general[p]["retention"] for p in probes]
        cells = [m["ap"], m["bwt"], m["forgetting"], *res["R"][-1], *kept]
        lines.append(method.ljust(12) + "".join(f"{v:16.3f}" for v in cells))
    note = (
        "one run each (one seed): the intervals over seeds and which differences are real are in the "
        "README's continual-learning table (bench/continual.py --seeds 0 1 2)"
    )
    return "after the last task, side by side\n" + "\n".join(lines) + "\n" + note


def _ask_router(svc: EmbeddedService, cfg: Any) -> None:
    """One held-out question per task through the OpenAI-compatible endpoint with model="auto"."""
    from openai import OpenAI

    client = OpenAI(base_url=svc.url + "/v1", api_key=svc.key, timeout=300)
    print('\nRouted answers (model="auto"): held-out questions, one per task')
    for task in cfg.tasks:
        ex = read_task_data(task, cfg.train.seed).eval[0]
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": ex.instruction}], max_tokens=16, temperature=0
        )
        resp = raw.parse()
        score = raw.headers.get("x-cltune-route-score")
        answer = (resp.choices[0].message.content or "").strip().replace("\n", " ")
        print(
            f"- [{task.name}] {ex.instruction[:70]!r}\n    -> adapter {resp.model} (score {score}): "
            f"{answer!r} (reference {ex.answer!r})"
        )
