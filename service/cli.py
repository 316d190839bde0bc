"""The `cltune` console command: the library commands (train | eval | demo) plus the service's:

serve                      the API + one embedded worker on SQLite (prints the URL and the API key)
worker [--burst] ...       claim and run jobs (settings from CLTUNE_* variables)
tenants create|list        admin, straight to the database of CLTUNE_DATABASE_URL / CLTUNE_DATA_DIR
keys create|revoke         admin: a new API key is printed once; only its hash is stored
datasets|jobs|adapters     thin HTTP clients of a running server (CLTUNE_URL, CLTUNE_API_KEY);
                           `adapters import FILE --name N --registry DIR` imports into a registry directory
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from cltune.cli import main as library_main
from cltune.errors import CLTuneError
from cltune.registry import parse_ref
from service import layout

DEFAULT_TENANT = "default"


def _settings(args: argparse.Namespace) -> Any:
    from service.settings import Settings

    overrides: dict[str, Any] = {}
    for name in ("data_dir", "database_url", "host", "port"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    return Settings(**overrides)


def _engine(settings: Any) -> Any:
    from service.db import init_db, make_engine

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    init_db(engine)
    return engine


# ---------------------------------------------------------------- serve / worker


def first_start_key(engine: Any) -> str | None:
    """On the first start, create the `default` tenant and a key for it; return that key (else None)."""
    from service import auth

    try:
        tenant = auth.create_tenant(engine, DEFAULT_TENANT)
    except CLTuneError:  # it exists: not the first start, and its key was shown back then
        return None
    key = auth.create_key(engine, tenant.id).key
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app

    settings = _settings(args)
    if args.no_worker:
        settings.embedded_worker = False
    engine = _engine(settings)
    url = f"http://{settings.host}:{settings.port}"
    print(f"cltune API: {url}  (OpenAPI docs: {url}/docs)", flush=True)
    if settings.auth_disabled:
        print("auth: DISABLED (CLTUNE_AUTH_DISABLED=1); every request acts as tenant 'local'", flush=True)
    elif (key := first_start_key(engine)) is not None:
        print(
            f"API key for tenant '{DEFAULT_TENANT}' (shown once; only its hash is stored): {key}", flush=True
        )
        print(f"  export CLTUNE_URL={url} CLTUNE_API_KEY={key}", flush=True)
    else:
        print(
            f"API key: the one printed on the first start; make another with `cltune keys create "
            f"{DEFAULT_TENANT}`",
            flush=True,
        )
    worker = thread = None
    if settings.embedded_worker:
        from service.worker import Worker

        worker = Worker(settings, worker_id=f"embedded-{os.getpid()}")
        thread = threading.Thread(target=worker.run, name="embedded-worker", daemon=True)
        thread.start()
        print("worker: one embedded worker (add more with `cltune worker`)", flush=True)
    else:
        print("worker: none (--no-worker); jobs stay queued until a `cltune worker` runs", flush=True)
    run: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": args.log_level,
        "access_log": args.access_log,
        "timeout_keep_alive": 30,  # s; clients that poll every few seconds keep their connection
    }
    try:
        if args.workers > 1:  # API processes import the app themselves: pass the settings on by environment
            os.environ.update(
                {"CLTUNE_DATA_DIR": str(settings.data_dir), "CLTUNE_DATABASE_URL": settings.db_url}
            )
            uvicorn.run("service.api.app:create_app", factory=True, workers=args.workers, **run)
        else:
            uvicorn.run(create_app(settings, engine), **run)
    finally:
        if worker is not None and thread is not None:
            worker.stop()  # running jobs checkpoint and go back to the queue
            thread.join(timeout=settings.cancel_grace_seconds + 5)
    return 0


def cmd_worker(argv: list[str]) -> int:
    from service.worker import main as worker_main

    return worker_main(argv)


# ---------------------------------------------------------------- admin (database)


def cmd_tenants(args: argparse.Namespace) -> int:
    from service import auth

    engine = _engine(_settings(args))
    if args.action == "create":
        t = auth.create_tenant(engine, args.name)
        _print({"id": t.id, "name": t.name})
    else:
        _print(
            [
                {"id": t.id, "name": t.name, "created_at": t.created_at.isoformat()}
                for t in auth.list_tenants(engine)
            ]
        )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from service import auth

    engine = _engine(_settings(args))
    if args.action == "create":
        k = auth.create_key(engine, auth.find_tenant(engine, args.ref).id)
        _print({"id": k.id, "tenant_id": k.tenant_id, "key": k.key})
        print("(the key is shown only now; only its hash is stored)", file=sys.stderr)
    else:
        k = auth.revoke_key(engine, args.ref)
        _print({"id": k.id, "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None})
    return 0


# ---------------------------------------------------------------- thin HTTP clients


def _client() -> Any:
    import httpx

    url = os.environ.get("CLTUNE_URL", "http://127.0.0.1:8000")
    key = os.environ.get("CLTUNE_API_KEY")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)


def _call(method: str, path: str, **kw: Any) -> Any:
    import httpx

    try:
        with _client() as c:
            r = c.request(method, path, **kw)
    except httpx.HTTPError as e:
        raise CLTuneError(
            f"cannot reach the server at {os.environ.get('CLTUNE_URL', 'http://127.0.0.1:8000')}: "
            f"{e}; start it with `cltune serve` or set CLTUNE_URL"
        ) from None
    if r.status_code >= 400:
        err = r.json().get("error", {}) if "json" in r.headers.get("content-type", "") else {}
        raise CLTuneError(
            f"HTTP {r.status_code}: {err.get('message', r.text[:200])}", errors=err.get("errors")
        )
    return r.json() if r.content and "json" in r.headers.get("content-type", "") else None


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=1, ensure_ascii=False, default=str))


def cmd_datasets(args: argparse.Namespace) -> int:
    if args.action == "upload":
        path = Path(args.ref)
        with path.open("rb") as f:
            _print(_call("POST", "/v1/datasets", files={"file": (args.name or path.name, f)}))
    elif args.action == "list":
        _print(_call("GET", "/v1/datasets", params={"limit": 1000}))
    else:
        _call("DELETE", f"/v1/datasets/{args.ref}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.action == "submit":
        import yaml

        config = yaml.safe_load(Path(args.ref).read_text())
        _print(_call("POST", "/v1/jobs", json={"config": config, "priority": args.priority}))
    elif args.action == "list":
        _print(_call("GET", "/v1/jobs", params={k: v for k, v in {"status": args.status}.items() if v}))
    elif args.action == "events":
        with _client() as c, c.stream("GET", f"/v1/jobs/{args.ref}/events/stream", timeout=None) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    ev = json.loads(line[6:])
                    print(
                        f"{ev.get('ts', '')} {ev.get('type', 'end')}: {ev.get('message', ev.get('status'))}"
                    )
    elif args.action in ("cancel", "retry"):
        _print(_call("POST", f"/v1/jobs/{args.ref}/{args.action}"))
    elif args.action == "checkpoints":
        _print(_call("GET", f"/v1/jobs/{args.ref}/checkpoints"))
    elif args.action == "publish":  # a kept checkpoint as a new adapter version
        if args.task is None or args.step is None:
            raise CLTuneError(
                "jobs publish JOB: name the checkpoint with --task TASK --step N (see `jobs checkpoints`)"
            )
        body = {"task": args.task, "step": args.step, **({"name": args.name} if args.name else {})}
        _print(_call("POST", f"/v1/jobs/{args.ref}/checkpoints/publish", json=body))
    elif args.action == "metrics":  # CSV, one row per step: to stdout or -o FILE
        with _client() as c:
            r = c.get(f"/v1/jobs/{args.ref}/metrics", params={"format": "csv"})
        if r.status_code >= 400:
            raise CLTuneError(f"HTTP {r.status_code}: {r.text[:300]}")
        if args.output:
            Path(args.output).write_text(r.text)
        else:
            print(r.text, end="")
    elif args.action == "summary":  # ref: comma-separated job ids (one config, several seeds)
        params = {"ids": args.ref.split(","), "baseline": args.baseline.split(",") if args.baseline else []}
        _print(_call("GET", "/v1/jobs/summary", params=params))
    else:
        _print(_call("GET", f"/v1/jobs/{args.ref}"))
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    if args.action == "list":
        _print(_call("GET", "/v1/adapters"))
    elif args.action == "versions":
        _print(_call("GET", f"/v1/adapters/{args.ref}/versions"))
    elif args.action == "download":
        name, version = parse_ref(args.ref)  # name@N: the route takes the version as ?version=N
        query = f"?version={version}" if version is not None else ""
        out = Path(args.output or f"{name}{'-v' + str(version) if version else ''}.tar.gz")
        url = f"/v1/adapters/{name}/download{query}"
        with _client() as c, c.stream("GET", url) as r, out.open("wb") as f:
            if r.status_code >= 400:
                raise CLTuneError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
            for chunk in r.iter_bytes():
                f.write(chunk)
        print(out)
    elif args.action == "import":
        _print(_import_adapter(args))
    else:
        _call("DELETE", f"/v1/adapters/{args.ref}")
    return 0


def _import_adapter(args: argparse.Namespace) -> Any:
    """`adapters import FILE --name N [--base-model M]`: through the server, or with `--registry DIR`
    straight into a registry directory (what `cltune train` reads: <data_dir>/adapters)."""
    path = Path(args.ref)
    if not path.is_file():
        raise CLTuneError(f"adapters import: {str(path)!r} is not a file; pass a tar.gz or zip of peft files")
    if not args.name:
        raise CLTuneError("adapters import: name the adapter with --name NAME")
    if args.registry:
        from cltune.adapter_import import import_adapter
        from cltune.registry import Registry

        base = args.base_model or "smollm2-135m"
        rec = import_adapter(
            Registry(args.registry),
            path,
            args.name,
            limit=1 << 40,  # a local file: the caller's own
            base_model=args.base_model,
            default_base=base,
            cache_dir=layout.models_dir(Path(os.environ.get("CLTUNE_DATA_DIR", "data"))),
            filename=path.name,
        )
        return rec.model_dump(mode="json", exclude={"codebook"})
    fields = {"name": args.name, **({"base_model": args.base_model} if args.base_model else {})}
    with path.open("rb") as f:
        return _call("POST", "/v1/adapters", files={"file": (path.name, f)}, data=fields)


# ---------------------------------------------------------------- wiring


def _db_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="default: CLTUNE_DATA_DIR or ./data")
    p.add_argument("--database-url", help="default: CLTUNE_DATABASE_URL or SQLite in the data dir")


def add_service_commands(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the API with one embedded worker")
    _db_flags(p)
    p.add_argument("--host", help="default: CLTUNE_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: CLTUNE_PORT or 8000")
    p.add_argument("--no-worker", action="store_true", help="do not start the embedded worker")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes (uvicorn workers); training workers "
        "are separate: the embedded one plus any `cltune worker`",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)
    sub.add_parser("worker", help="claim and run jobs (`cltune worker --help`)", add_help=False)

    p = sub.add_parser("tenants", help="admin: create or list tenants")
    p.add_argument("action", choices=["create", "list"])
    p.add_argument("name", nargs="?", default="")
    _db_flags(p)
    p.set_defaults(func=cmd_tenants)
    p = sub.add_parser("keys", help="admin: create a key for a tenant (id or name), or revoke a key id")
    p.add_argument("action", choices=["create", "revoke"])
    p.add_argument("ref")
    _db_flags(p)
    p.set_defaults(func=cmd_keys)

    clients = {
        "datasets": (cmd_datasets, ["upload", "list", "delete"]),
        "jobs": (
            cmd_jobs,
            [
                "submit",
                "list",
                "get",
                "events",
                "cancel",
                "retry",
                "summary",
                "checkpoints",
                "publish",
                "metrics",
            ],
        ),
        "adapters": (cmd_adapters, ["list", "versions", "download", "delete", "export", "import"]),
    }
    for name, (func, actions) in clients.items():
        p = sub.add_parser(
            name, help=f"{name} of a running server ({', '.join(actions)}); CLTUNE_URL, CLTUNE_API_KEY"
        )
        p.add_argument("action", choices=actions)
        p.add_argument("ref", nargs="?", default="", help="file, id or name")
        p.add_argument(
            "--name", help="datasets upload: dataset name; adapters import, jobs publish: adapter name"
        )
        p.add_argument("--status", help="jobs list: filter")
        p.add_argument("--priority", type=int, default=0, help="jobs submit")
        p.add_argument("--baseline", help="jobs summary: comma-separated job ids to compare against")
        p.add_argument("-o", "--output", help="adapters download: archive path; jobs metrics: CSV path")
        if name == "jobs":
            p.add_argument("--task", help="jobs publish: the task of the kept checkpoint")
            p.add_argument("--step", type=int, help="jobs publish: its step")
        if name == "adapters":
            p.add_argument("--base-model", help="adapters import: the base model it was trained on")
            p.add_argument("--registry", help="adapters import: into this registry directory, not a server")
        p.set_defaults(func=func)

    demo = sub.choices["demo"]  # the library's demo, here run through the service as a user would
    demo.add_argument("--direct", action="store_true", help="train in-process with the library only")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from cltune import cli as library

    if args.direct or args.data_only:
        return library.cmd_demo(args)
    from service.demo import run_demo

    return run_demo(args.config, args.overrides, library.data_dir(), args.methods)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:  # the worker parses its own flags
        return cmd_worker(argv[1:])
    if argv[:2] == ["adapters", "export"]:  # so does the export (service/adapter_export.py)
        from service.adapter_export import main as export_main

        return export_main(argv[2:])
    return library_main(argv, extend=add_service_commands)


if __name__ == "__main__":
    raise SystemExit(main())
