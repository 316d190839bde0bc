"""Bring your own adapter over REST: POST /v1/adapters takes the archive `download` gives (tar.gz or zip,
in a folder or at the root), refuses unsafe archives and adapters that do not fit the base model with
the one error shape, serves the import like any adapter, and a job can start from it (init_adapter)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, load_file, save_file

from cltune.config import parse_config
from cltune.continual import run_continual
from cltune.registry import Registry
from service import store
from service.layout import resolve_datasets
from service.settings import Settings

from .api_support import Api, job_config, make_adapters, make_api, upload

LIMIT = 256 * 1024  # the tiny adapters are a few KB


@dataclass
class World:
    client: TestClient
    settings: Settings
    tenant: str  # A: owns `orig`
    a: dict[str, str]
    b: dict[str, str]

    def files(self, name: str = "orig", version: int = 1) -> dict[str, bytes]:
        d = self.settings.adapters_dir(self.tenant) / name / f"v{version}"
        return {p.name: p.read_bytes() for p in d.iterdir()}

    def post(self, body: bytes, name: str | None = "copy", filename: str = "a.tar.gz", **fields: str):
        data = {**({"name": name} if name else {}), **fields}
        return self.client.post("/v1/adapters", files={"file": (filename, body)}, data=data, headers=self.a)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    api = make_api(
        tmp_path_factory.mktemp("import"),
        engine_model="tiny-llama",
        engine_device="cpu",
        engine_max_wait_ms=1,
        max_adapter_upload_bytes=LIMIT,
    )
    tenant, a = api.tenant("acme")
    _, b = api.tenant("other")
    make_adapters(Registry(api.settings.adapters_dir(tenant)), ["orig"])  # r=2 on q_proj, v_proj
    yield World(api.client, api.settings, tenant, a, b)


def tar_gz(files: dict[str, bytes], root: str = "orig-v1") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{root}/{name}" if root else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def with_member(files: dict[str, bytes], info: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        tar.addfile(info)
    return buf.getvalue()


def weights(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    return load(files["adapter_model.safetensors"])


def tensors_bytes(tensors: dict[str, torch.Tensor], tmp: Path) -> bytes:
    save_file(tensors, tmp / "w.safetensors")
    return (tmp / "w.safetensors").read_bytes()


def error(r, status: int, *words: str) -> dict:
    """The one error shape, with `words` in its message."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"]), body
    for w in words:
        assert w in body["error"]["message"], (w, body["error"]["message"])
    return body["error"]


def test_download_then_import_gives_the_same_tensors_and_an_imported_record(world: World) -> None:
    archive = world.client.get("/v1/adapters/orig/download", headers=world.a)
    assert archive.status_code == 200
    r = world.post(archive.content, "copy", "orig-v1.tar.gz")
    assert r.status_code == 201, r.text
    rec = r.json()
    assert (rec["ref"], rec["method"], rec["base_model"], rec["parent"], rec["task"]) == (
        "copy@1",
        "imported",
        "tiny-llama",
        None,
        None,
    )
    assert rec["lora"]["r"] == 2 and rec["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert (rec["group"], rec["codebook_size"], rec["method_params"], rec["created_by"]) == (
        "copy",
        0,
        {},
        "import",
    )
    assert rec["notes"] == {
        "imported_from": "orig-v1.tar.gz",
        "sha256": hashlib.sha256(archive.content).hexdigest(),
        "source_record": "orig@1 (seq_lora)",
    }
    original, copied = weights(world.files("orig")), weights(world.files("copy"))
    assert original.keys() == copied.keys() and all(torch.equal(original[k], copied[k]) for k in original)
    assert world.client.get("/v1/adapters/copy", headers=world.a).json()["method"] == "imported"
    again = world.post(archive.content, "copy")
    assert again.status_code == 201 and again.json()["ref"] == "copy@2"  # a new version, never overwritten


def test_zip_files_at_the_root_and_a_raw_body_are_accepted(world: World) -> None:
    z = world.client.get("/v1/adapters/orig/download?format=zip", headers=world.a)
    r = world.post(z.content, "zipped", "orig-v1.zip")
    assert r.status_code == 201, r.text
    files = world.files("orig")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ("adapter_config.json", "adapter_model.safetensors"):  # no record.json, no folder
            zf.writestr(name, files[name])
    assert world.post(buf.getvalue(), "zip-root", "a.zip").status_code == 201
    root = tar_gz({n: files[n] for n in ("adapter_config.json", "adapter_model.safetensors")}, root="")
    raw = world.client.post(
        "/v1/adapters?name=raw&base_model=tiny-llama",
        content=root,
        headers={**world.a, "content-type": "application/gzip"},
    )
    assert raw.status_code == 201, raw.text
    assert raw.json()["notes"]["source_record"] is None and raw.json()["notes"]["imported_from"] is None


def test_unsafe_members_are_refused(world: World) -> None:
    files = world.files("orig")
    config = files["adapter_config.json"]
    traversal = tar_gz({"../adapter_config.json": config}, root="")
    error(world.post(traversal), 422, "'..'", "relative paths")
    absolute = tar_gz({"/etc/adapter_config.json": config}, root="")
    error(world.post(absolute), 422, "absolute path")
    link = tarfile.TarInfo("orig-v1/adapter_model.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    error(
        world.post(with_member({"orig-v1/adapter_config.json": config}, link)), 422, "symbolic or hard link"
    )
    hard = tarfile.TarInfo("orig-v1/adapter_model.safetensors")
    hard.type, hard.linkname = tarfile.LNKTYPE, "orig-v1/adapter_config.json"
    error(world.post(with_member({"orig-v1/adapter_config.json": config}, hard)), 422, "link")
    device = tarfile.TarInfo("orig-v1/dev")
    device.type = tarfile.CHRTYPE
    error(world.post(with_member({"orig-v1/adapter_config.json": config}, device)), 422, "device")
    many = tar_gz({f"readme{i}.txt": b"x" for i in range(20)})
    error(world.post(many), 422, "more than 16 members")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_model.safetensors", b"\0" * (LIMIT + 1))  # a few hundred bytes compressed
    assert len(zbuf.getvalue()) < LIMIT
    error(world.post(zbuf.getvalue(), filename="bomb.zip"), 422, "declares", "over the limit")
    split = tar_gz(
        {"a/adapter_config.json": config, "b/adapter_model.safetensors": files["adapter_model.safetensors"]},
        root="",
    )
    error(world.post(split), 422, "different folders")


def test_an_upload_over_the_limit_answers_413(world: World) -> None:
    body = b"\x1f\x8b" + bytes(LIMIT + 10)
    err = error(world.post(body), 413, "CLTUNE_MAX_ADAPTER_UPLOAD_BYTES")
    assert err["type"] == "payload_too_large" and err["limit_bytes"] == LIMIT
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))  # no Content-Length
    raw = world.client.post(
        "/v1/adapters?name=big", content=chunks, headers={**world.a, "content-type": "application/zip"}
    )
    error(raw, 413, "exceeds the limit")
    assert not any((world.settings.data_dir / "incoming").iterdir())  # nothing of it stays


def test_not_an_archive_or_without_the_peft_files_is_refused(world: World) -> None:
    error(world.post(b'{"prompt": "not an archive"}\n'), 422, "not a tar.gz or zip archive")
    error(world.post(gzip.compress(b"plain text, gzipped")), 422, "tar.gz archive cannot be read")
    files = world.files("orig")
    only_config = tar_gz({"adapter_config.json": files["adapter_config.json"]})
    error(world.post(only_config), 422, "no adapter_model.safetensors")
    bin_only = tar_gz({"adapter_config.json": files["adapter_config.json"], "adapter_model.bin": b"\x80\x04"})
    error(world.post(bin_only), 422, "no adapter_model.safetensors (adapter_model.bin is a pickle")
    pickled = tar_gz({**files, "adapter_model.safetensors": b"\x80\x04\x95 a pickle, never loaded"})
    error(world.post(pickled), 422, "not a safetensors file")
    error(world.post(tar_gz(files), name=None), 422, "name the adapter")
    err = error(world.post(tar_gz(files), name="../up"), 422, "invalid adapter name")
    assert err["type"] == "invalid_name"
    r = world.client.post(
        "/v1/adapters?name=x", content=b"x", headers={**world.a, "content-type": "text/csv"}
    )
    error(r, 415, "multipart/form-data")


def test_weights_that_do_not_fit_the_base_model_are_refused_naming_the_problem(
    world: World, tmp_path: Path
) -> None:
    files = world.files("orig")
    config = json.loads(files["adapter_config.json"])
    wrong_r = {**files, "adapter_config.json": json.dumps({**config, "r": 4}).encode()}
    err = error(world.post(tar_gz(wrong_r)), 422, "does not fit base model 'tiny-llama'", "expected [4, 128]")
    assert err["type"] == "invalid_adapter" and err["problems"]
    tensors = weights(files)
    moved = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    elsewhere = {**files, "adapter_model.safetensors": tensors_bytes(moved, tmp_path)}
    error(
        world.post(tar_gz(elsewhere)),
        422,
        "model.layers.7.self_attn.q_proj' is no Linear layer of 'tiny-llama'",
    )
    narrow = {**files, "adapter_config.json": json.dumps({**config, "target_modules": ["q_proj"]}).encode()}
    error(world.post(tar_gz(narrow)), 422, "v_proj' is not selected by target_modules ['q_proj']")
    nan = dict(tensors)
    key = next(iter(nan))
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    poisoned = {**files, "adapter_model.safetensors": tensors_bytes(nan, tmp_path)}
    error(world.post(tar_gz(poisoned)), 422, "NaN or infinite")


def test_configs_the_engine_cannot_serve_are_refused_by_name(world: World) -> None:
    files = world.files("orig")
    config = json.loads(files["adapter_config.json"])

    def post_config(**changes: object):
        return world.post(
            tar_gz({**files, "adapter_config.json": json.dumps({**config, **changes}).encode()})
        )

    error(post_config(use_dora=True), 422, "use_dora: DoRA")
    error(post_config(peft_type="IA3"), 422, "peft_type 'IA3' is not supported", "only LoRA")
    error(post_config(bias="all", use_rslora=True), 422, "bias 'all'", "use_rslora", "alpha * sqrt(r)")
    error(post_config(modules_to_save=["lm_head"]), 422, "modules_to_save")
    error(post_config(r=0), 422, "r: Input should be greater than or equal to 1")


def test_the_base_model_must_be_served_and_its_fingerprint_must_match(world: World) -> None:
    files = world.files("orig")
    record = json.loads(files["record.json"])
    other = {**files, "record.json": json.dumps({**record, "base_fingerprint": "tiny-llama:other"}).encode()}
    err = error(world.post(tar_gz(other)), 409, "fingerprint tiny-llama:other", "other weights")
    assert err["type"] == "conflict"
    error(
        world.post(tar_gz(files), base_model="llama-70b"),
        422,
        "'llama-70b' (asked for) is not served here",
        "tiny-llama",
    )
    foreign = {**files, "record.json": json.dumps({"base_model": "mistral-7b"}).encode()}
    error(world.post(tar_gz(foreign)), 422, "named by the archive's record.json", "pass base_model")


def test_another_tenant_cannot_see_an_import(world: World) -> None:
    archive = tar_gz(world.files("orig"))
    assert world.post(archive, "mine").status_code == 201
    c, b = world.client, world.b
    assert "mine" not in [x["name"] for x in c.get("/v1/adapters", headers=b).json()["items"]]
    error(c.get("/v1/adapters/mine", headers=b), 404, "mine")
    error(c.get("/v1/adapters/mine/download", headers=b), 404)
    theirs = c.post("/v1/adapters", files={"file": ("a.tar.gz", archive)}, data={"name": "mine"}, headers=b)
    assert theirs.status_code == 201 and theirs.json()["ref"] == "mine@1"  # their own registry
    models = [m["id"] for m in c.get("/v1/models", headers=b).json()["data"]]
    assert "mine@1" in models and len([m for m in models if m.startswith("mine")]) == 2


def test_an_imported_adapter_serves_the_original_adapters_greedy_output(world: World) -> None:
    archive = world.client.get("/v1/adapters/orig/download?format=zip", headers=world.a).content
    assert world.post(archive, "served", "orig.zip").status_code == 201

    def complete(model: str) -> str:
        body = {"model": model, "prompt": "add one to 41", "max_tokens": 8, "temperature": 0}
        r = world.client.post("/v1/completions", json=body, headers=world.a)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        return r.json()["choices"][0]["text"]

    assert complete("served@1") == complete("orig@1") != complete("base")
    auto = {"model": "auto", "prompt": "add one to 41", "max_tokens": 2}
    r = world.client.post("/v1/completions", json=auto, headers=world.a)  # imports have no codebook
    assert r.status_code == 200 and r.headers["x-cltune-adapter"] in ("base", "orig@1")


def test_a_job_starts_from_an_imported_adapter_and_records_it_as_parent(world: World, tmp_path: Path) -> None:
    assert world.post(tar_gz(world.files("orig")), "seed").status_code == 201
    c, h = world.client, world.a
    ds = upload(Api(c, world.settings), h)
    cfg = job_config(ds, steps=1, eval={"heatmap": False, "general": [], "max_new_tokens": 2})
    cfg["train"]["keep_checkpoints"] = 0
    cfg["tasks"][0].update(init_adapter="seed", max_eval=2)
    r = c.post("/v1/jobs", json={"config": cfg}, headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["config"]["tasks"][0]["init_adapter"] == "seed"  # as sent
    stored = store.load_job(c.app.state.db, r.json()["id"]).config
    assert stored["tasks"][0]["init_adapter"] == "seed@1"  # pinned at submit
    assert (stored["lora"]["r"], stored["lora"]["alpha"], stored["lora"]["target_modules"]) == (
        2,
        4.0,
        ["q_proj", "v_proj"],
    )

    def refused(config: dict, field: str, *words: str) -> None:
        err = error(c.post("/v1/jobs", json={"config": config}, headers=h), 422, *words)
        assert field in [e["field"] for e in err["errors"]], err

    unknown = json.loads(json.dumps(cfg))
    unknown["tasks"][0]["init_adapter"] = "nope"
    refused(unknown, "tasks.0.init_adapter", "unknown adapter 'nope'")
    other_r = {**cfg, "lora": {"r": 8}}
    refused(other_r, "lora.r", "differs from init_adapter seed@1's 2")
    kappa = {**cfg, "method": {"name": "kappatune"}}
    refused(kappa, "(root)", "method 'kappatune' chooses its own LoRA layout")

    registry = Registry(world.settings.adapters_dir(world.tenant))
    local = resolve_datasets(stored, world.settings.data_dir, world.tenant)  # as the runner does
    res = run_continual(parse_config(local), tmp_path / "run", registry=registry, created_by="test")
    assert [a["parent"] for a in res.adapters] == ["seed@1"]
    trained = load_file(
        registry.path(res.adapters[0]["name"], res.adapters[0]["version"]) / "adapter_model.safetensors"
    )
    start = weights(world.files("seed"))
    assert trained.keys() == start.keys() and not all(torch.equal(trained[k], start[k]) for k in start)


def test_the_cli_imports_into_a_registry_directory(world: World, tmp_path: Path, capsys) -> None:
    from service.cli import main

    archive = tmp_path / "orig-v1.tar.gz"
    archive.write_bytes(tar_gz(world.files("orig")))
    reg = tmp_path / "adapters"
    assert main(["adapters", "import", str(archive), "--name", "local", "--registry", str(reg)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["name"], out["version"], out["method"], out["base_model"]) == (
        "local",
        1,
        "imported",
        "tiny-llama",
    )
    assert Registry(reg).get("local").notes["imported_from"] == "orig-v1.tar.gz"
    assert main(["adapters", "import", str(archive), "--name", "../x", "--registry", str(reg)]) == 2
    assert "invalid adapter name" in capsys.readouterr().err


def test_with_a_shared_artifact_store_the_import_is_pushed_for_other_hosts(tmp_path: Path) -> None:
    from cltune.artifact_sync import remote_versions
    from cltune.artifacts import LocalStore
    from service.layout import adapters_prefix

    api = make_api(tmp_path, engine_model="tiny-llama", artifact_dir=tmp_path / "store")
    tenant, h = api.tenant("acme")
    make_adapters(Registry(tmp_path / "source"), ["orig"])
    files = {p.name: p.read_bytes() for p in (tmp_path / "source" / "orig" / "v1").iterdir()}
    r = api.client.post(
        "/v1/adapters", files={"file": ("a.tar.gz", tar_gz(files))}, data={"name": "shared"}, headers=h
    )
    assert r.status_code == 201, r.text
    assert remote_versions(LocalStore(tmp_path / "store"), adapters_prefix(tenant)) == {"shared": [1]}
