"""`cltune adapters export NAME[@VERSION] --format vllm --out DIR`: an adapter as a vLLM LoRA module.

The adapter comes from a running server (CLTUNE_URL, CLTUNE_API_KEY; the download route), or with
`--registry DIR` straight from a registry directory (e.g. <data_dir>/adapters/<tenant_id>). The
conversion and its checks are cltune.export's.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import tempfile
from pathlib import Path

from cltune.adapter_files import RECORD
from cltune.errors import CLTuneError
from cltune.export import base_model_dir, export_from_registry, export_vllm
from cltune.registry import parse_ref
from service import layout


def _download(ref: str, into: Path) -> Path:
    """Fetch `name[@version]` through the API's download route; return the extracted adapter folder."""
    import httpx

    name, version = parse_ref(ref)
    url = os.environ.get("CLTUNE_URL", "http://127.0.0.1:8000")
    key = os.environ.get("CLTUNE_API_KEY")
    params = {"format": "tar.gz", **({"version": str(version)} if version else {})}
    archive = into / "adapter.tar.gz"
    try:
        with (
            httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=120
            ) as c,
            c.stream("GET", f"/v1/adapters/{name}/download", params=params) as r,
        ):
            if r.status_code >= 400:
                raise CLTuneError(
                    f"HTTP {r.status_code} from {url}: {r.read().decode(errors='replace')[:300]}"
                )
            with archive.open("wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
    except httpx.HTTPError as e:
        raise CLTuneError(
            f"cannot reach the server at {url}: {e}; set CLTUNE_URL or use --registry DIR"
        ) from None
    with tarfile.open(archive) as t:
        t.extractall(into / "x", filter="data")  # "data": no absolute paths, links or devices
    folders = [p for p in (into / "x").iterdir() if p.is_dir()]
    if len(folders) != 1:
        raise CLTuneError(f"unexpected archive layout from the server: {[p.name for p in folders]}")
    return folders[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cltune adapters export",
        description="write an adapter in the layout a serving engine loads (vLLM: --lora-modules NAME=DIR)",
    )
    p.add_argument("ref", help="NAME or NAME@VERSION (default: the latest version)")
    p.add_argument("--format", choices=["vllm"], default="vllm")
    p.add_argument("--out", required=True, help="output directory (created; must be empty)")
    p.add_argument("--registry", help="read a registry directory instead of a running server")
    p.add_argument(
        "--models-dir",
        default=str(layout.models_dir(Path(os.environ.get("CLTUNE_DATA_DIR", "data")))),
        help="where cltune keeps converted base models (to name vLLM's base model directory)",
    )
    args = p.parse_args(argv)
    try:
        if args.registry:
            res = export_from_registry(args.registry, args.ref, args.out, args.models_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="cltune-export-") as tmp:
                src = _download(args.ref, Path(tmp))
                record = json.loads((src / RECORD).read_text()) if (src / RECORD).exists() else {}
                res = export_vllm(
                    src, args.out, parse_ref(args.ref)[0], base_model_dir(record, args.models_dir)
                )
    except CLTuneError as e:
        print(f"error: {e.message}", flush=True)
        return 2
    print(
        json.dumps(
            {
                "path": str(res.path),
                "name": res.name,
                "base_model": res.base_model,
                "notes": res.notes,
                "serve": res.serve_command,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
