"""API load: N concurrent clients create jobs and poll their status against `cltune serve` (a subprocess
on a loopback port, worker disabled so the queue only grows), on SQLite and on PostgreSQL.

Each client loops: POST /v1/jobs, then GET /v1/jobs/{id} `--polls` times, sleeping `--think-ms` between
requests (0: a closed loop at full speed; otherwise clients start at random offsets within one pause).
Reports per endpoint p50/p99/max latency (ms as the client sees it), requests/s and errors, the
server's own timing from /metrics, and counts the jobs in the database afterwards (lost = acknowledged
with 201 but not stored). On a small shared machine the client and the server compete for the CPU:
read the closed-loop numbers as capacity, the paced ones (--think-ms) as latency at a given load.
Targets: p99 < 50 ms for POST /v1/jobs and GET /v1/jobs/{id}, zero errors, zero lost jobs.

    .venv/bin/python bench/api_load.py                      # 50 clients x 30 s, sqlite and postgres
    .venv/bin/python bench/api_load.py --duration 10 --backends sqlite --out out/api_load.json

PostgreSQL: a database of its own (cltune_bench_<hex>) on --pg-server, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.db import JobRow  # noqa: E402

TARGET_P99_MS = 50.0
KEY_RE = re.compile(r"API key for tenant '[^']+' .*?: (clt_\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_side(metrics_text: str) -> dict[str, dict[str, float]]:
    """Upper bucket bounds (ms) holding 50% and 99% of the server's own request timings (from /metrics:
    time inside the app, without the client's or the socket's queueing)."""
    out: dict[str, dict[str, float]] = {}
    for ep, route, method in (
        ("POST /v1/jobs", "/v1/jobs", "POST"),
        ("GET /v1/jobs/{id}", "/v1/jobs/{job_id}", "GET"),
    ):
        head = f'cltune_http_request_duration_seconds_bucket{{le="([^"]+)",method="{method}",route="{re.escape(route)}"'
        pat = re.compile(head + r',status="20[01]"\} (\S+)')
        buckets = [(float(le), float(n)) for le, n in pat.findall(metrics_text)]
        total = max((n for _, n in buckets), default=0.0)
        if not total:
            continue
        bound = {q: next(le for le, n in buckets if n >= q * total) for q in (0.5, 0.99)}
        out[ep] = {"p50_le_ms": bound[0.5] * 1000, "p99_le_ms": bound[0.99] * 1000, "requests": total}
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class PgDatabase:
    """A throwaway database on the PostgreSQL server (created here, dropped in `drop`)."""

    def __init__(self, server: str) -> None:
        self.server, self.name = server, f"cltune_bench_{secrets.token_hex(4)}"
        self.admin = create_engine(server.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = server.rsplit("/", 1)[0] + f"/{self.name}"

    def drop(self) -> None:
        with self.admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


class Server:
    """`cltune serve --no-worker` in a subprocess; reads the first-start API key from its output."""

    def __init__(self, data_dir: Path, db_url: str, port: int, workers: int = 1) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--no-worker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--database-url",
            db_url,
            "--log-level",
            "warning",
            "--workers",
            str(workers),
        ]
        self.log = (data_dir.parent / "server.log").open("w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.key = self._wait()

    def _wait(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        key = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()[-2000:]}")
            key = key or next(iter(KEY_RE.findall(self.output())), None)
            try:
                if key and httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return key
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server did not come up in {timeout} s: {self.output()[-2000:]}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def client_loop(
    c: httpx.AsyncClient,
    config: dict[str, Any],
    stop_at: float,
    polls: int,
    think: float,
    lat: dict[str, list[float]],
    errors: dict[str, list[str]],
    created: list[str],
) -> None:
    async def call(endpoint: str, method: str, path: str, expect: int, **kw: Any) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            r = await c.request(method, path, **kw)
        except httpx.HTTPError as e:
            errors[endpoint].append(f"{type(e).__name__}: {e}")
            return None
        lat[endpoint].append((time.perf_counter() - t0) * 1000)
        if r.status_code != expect:
            errors[endpoint].append(f"HTTP {r.status_code}: {r.text[:200]}")
            return None
        return r

    if think:  # clients start spread over one think time, as independent pollers would, not in lock-step
        await asyncio.sleep(random.uniform(0, think))
    while time.monotonic() < stop_at:
        r = await call("POST /v1/jobs", "POST", "/v1/jobs", 201, json={"config": config})
        if r is None:
            continue
        job_id = r.json()["id"]
        created.append(job_id)
        for _ in range(polls):
            if think:
                await asyncio.sleep(think)
            if time.monotonic() >= stop_at:
                break
            await call("GET /v1/jobs/{id}", "GET", f"/v1/jobs/{job_id}", 200)
        if think:
            await asyncio.sleep(think)


async def load(
    url: str, key: str, clients: int, duration: float, polls: int, think_ms: float
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as c:
        rows = "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(20))
        ds = (await c.post("/v1/datasets", files={"file": ("bench.jsonl", rows.encode())})).json()["id"]
        config = {
            "model": {"name": "tiny-llama"},
            "tasks": [{"name": "t", "train": ds}],
            "train": {"steps": 2},
        }
        lat: dict[str, list[float]] = {"POST /v1/jobs": [], "GET /v1/jobs/{id}": []}
        errors: dict[str, list[str]] = {k: [] for k in lat}
        created: list[str] = []
        start = time.monotonic()
        await asyncio.gather(
            *(
                client_loop(c, config, start + duration, polls, think_ms / 1000, lat, errors, created)
                for _ in range(clients)
            )
        )
        elapsed = time.monotonic() - start
        listed = (await c.get("/v1/jobs", params={"limit": 1})).json()["total"]
        server = server_side((await c.get("/metrics")).text)
    endpoints = {
        k: {
            "requests": len(v),
            "rps": round(len(v) / elapsed, 1),
            "p50_ms": round(pct(v, 0.50), 2),
            "p99_ms": round(pct(v, 0.99), 2),
            "max_ms": round(max(v, default=float("nan")), 2),
            "errors": len(errors[k]),
            "error_samples": errors[k][:3],
        }
        for k, v in lat.items()
    }
    return {
        "seconds": round(elapsed, 2),
        "endpoints": endpoints,
        "server_side": server,
        "created": created,
        "listed_total": listed,
    }


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"cltune-bench-{backend}-"))
    pg = PgDatabase(args.pg_server) if backend == "postgres" else None
    db_url = pg.url if pg else f"sqlite:///{tmp / 'data' / 'cltune.db'}"
    server = None
    try:
        server = Server(tmp / "data", db_url, free_port(), args.api_workers)
        res = asyncio.run(
            load(server.url, server.key, args.clients, args.duration, args.polls, args.think_ms)
        )
        server.stop()
        server = None
        engine = create_engine(db_url)
        with engine.connect() as c:
            stored = set(c.execute(select(JobRow.id)).scalars())
            total = c.execute(select(func.count()).select_from(JobRow)).scalar_one()
        engine.dispose()
        created = res.pop("created")
        lost = sorted(set(created) - stored)
        res.update(
            {
                "backend": backend,
                "jobs_acknowledged": len(created),
                "jobs_in_db": total,
                "lost_jobs": len(lost),
                "lost_samples": lost[:5],
            }
        )
        ok = all(e["p99_ms"] < TARGET_P99_MS and e["errors"] == 0 for e in res["endpoints"].values())
        res["targets_met"] = bool(ok and not lost and total == len(created))
        return res
    finally:
        if server is not None:
            server.stop()
        if pg is not None:
            pg.drop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per backend")
    p.add_argument("--polls", type=int, default=4, help="status polls per created job")
    p.add_argument("--think-ms", type=float, default=0.0, help="pause between a client's requests")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--api-workers", type=int, default=1, help="`cltune serve --workers`: API processes")
    p.add_argument("--pg-server", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    results = {
        "clients": args.clients,
        "duration_s": args.duration,
        "polls_per_job": args.polls,
        "think_ms": args.think_ms,
        "api_workers": args.api_workers,
        "cpu_count": os.cpu_count(),
        "load_avg_before": os.getloadavg(),
        "target_p99_ms": TARGET_P99_MS,
        "backends": {},
    }
    for backend in args.backends.split(","):
        results["backends"][backend] = run_backend(backend, args)
    results["load_avg_after"] = os.getloadavg()
    out = json.dumps(results, indent=1)
    print(out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(out)
    print(
        f"\n{'backend':<10}{'endpoint':<20}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}",
        file=sys.stderr,
    )
    for name, r in results["backends"].items():
        for ep, e in r["endpoints"].items():
            print(
                f"{name:<10}{ep:<20}{e['rps']:>8}{e['p50_ms']:>9}{e['p99_ms']:>9}{e['errors']:>8}",
                file=sys.stderr,
            )
        print(
            f"{name:<10}lost jobs {r['lost_jobs']} of {r['jobs_acknowledged']}; targets met: {r['targets_met']}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
