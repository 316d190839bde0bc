"""The artifact store (a directory, and S3 through a real moto server on loopback) and the sync layer:
round trips, conditional writes, atomic publish, run snapshots, registry versions across hosts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cltune.artifact_sync import RunSync, pull_registry, push_registry, remote_versions
from cltune.artifacts import (
    ArtifactStore,
    LocalStore,
    S3Store,
    delete_prefix,
    fetch_published,
    get_dir,
    is_published,
    publish,
    put_dir,
)
from cltune.errors import ConflictError, InvalidNameError, NotFoundError
from cltune.registry import Registry


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    s3 = S3Store("cltune-test", f"t-{tmp_path.name}", endpoint_url=endpoint)  # a fresh prefix per test
    s3.create_bucket()
    return s3


class Flaky:
    """A store that dies (like a killed host) on the first write of a key ending in `fail_on`."""

    def __init__(self, inner: ArtifactStore, fail_on: str) -> None:
        self.inner, self.fail_on, self.puts = inner, fail_on, list[str]()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put_file(self, key: str, path: Path, **kw: Any) -> None:
        self._check(key)
        self.inner.put_file(key, path, **kw)

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> None:
        self._check(key)
        self.inner.put_bytes(key, data, **kw)

    def _check(self, key: str) -> None:
        self.puts.append(key)
        if self.fail_on and key.endswith(self.fail_on):
            raise ConnectionError(f"host died while writing {key}")


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_put_get_list_delete_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"\x00weights" * 1000)
    store.put_file("runs/j1/a.bin", src)
    store.put_bytes("runs/j1/sub/b.json", b'{"x": 1}')
    store.put_bytes("runs/j10/c", b"other run")  # prefix 'runs/j1' must not match 'runs/j10'
    assert store.list("runs/j1") == ["runs/j1/a.bin", "runs/j1/sub/b.json"]
    assert store.exists("runs/j1/a.bin") and not store.exists("runs/j1/nope")
    store.get_file("runs/j1/a.bin", tmp_path / "out" / "a.bin")
    assert (tmp_path / "out" / "a.bin").read_bytes() == src.read_bytes()
    assert store.get_bytes("runs/j1/sub/b.json") == b'{"x": 1}'
    store.put_bytes("runs/j1/sub/b.json", b"replaced")  # a plain put overwrites
    assert store.get_bytes("runs/j1/sub/b.json") == b"replaced"
    store.delete("runs/j1/a.bin")
    store.delete("runs/j1/a.bin")  # deleting a missing key is fine
    with pytest.raises(NotFoundError):
        store.get_bytes("runs/j1/a.bin")
    with pytest.raises(NotFoundError):
        store.get_file("runs/j1/a.bin", tmp_path / "x")
    assert delete_prefix(store, "runs/j1") == 1
    assert store.list("runs") == ["runs/j10/c"]


def test_directories_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "d"
    (src / "nested").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "nested" / "y.txt").write_text("y")
    assert put_dir(store, "dirs/one", src) == ["dirs/one/nested/y.txt", "dirs/one/x.txt"]
    get_dir(store, "dirs/one", tmp_path / "copy")
    assert _tree(tmp_path / "copy") == _tree(src)


def test_an_existing_key_is_never_overwritten_by_a_conditional_write(store: ArtifactStore) -> None:
    store.put_bytes("adapters/a/v1/record.json", b"first", if_absent=True)
    with pytest.raises(ConflictError):
        store.put_bytes("adapters/a/v1/record.json", b"second", if_absent=True)
    assert store.get_bytes("adapters/a/v1/record.json") == b"first"


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a\\b"])
def test_keys_that_could_escape_the_store_are_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(InvalidNameError):
        LocalStore(tmp_path).put_bytes(key, b"x")


def test_a_version_without_its_marker_is_invisible(store: ArtifactStore, tmp_path: Path) -> None:
    version = tmp_path / "v1"
    version.mkdir()
    (version / "adapter_model.safetensors").write_bytes(b"w" * 4096)
    (version / "adapter_config.json").write_text("{}")
    (version / "record.json").write_text('{"name": "a", "version": 1}')
    with pytest.raises(ConnectionError):  # the host dies after the files, before the record
        publish(Flaky(store, "record.json"), "adapters/t/a/v1", version)  # type: ignore[arg-type]
    assert store.exists("adapters/t/a/v1/adapter_model.safetensors")  # the files did get there
    assert not is_published(store, "adapters/t/a/v1")
    assert remote_versions(store, "adapters/t") == {}
    with pytest.raises(NotFoundError):
        fetch_published(store, "adapters/t/a/v1", tmp_path / "reader")
    assert pull_registry(store, "adapters/t", tmp_path / "reader_registry") == []
    publish(store, "adapters/t/a/v1", version)  # the retry completes it
    assert remote_versions(store, "adapters/t") == {"a": [1]}
    fetch_published(store, "adapters/t/a/v1", tmp_path / "reader")
    assert _tree(tmp_path / "reader") == _tree(version)
    with pytest.raises(ConflictError):  # published versions are immutable
        publish(store, "adapters/t/a/v1", version)


def _run_dir(d: Path, step: int) -> None:
    (d / "checkpoint" / "method").mkdir(parents=True, exist_ok=True)
    (d / "progress.json").write_text(json.dumps({"completed": 0, "step": step}))
    (d / "checkpoint" / "trainer.pt").write_bytes(f"optimizer at step {step}".encode() * 100)
    (d / "checkpoint" / "adapters.safetensors").write_bytes(f"adapters at step {step}".encode() * 100)
    (d / "tasks" / "00-a").mkdir(parents=True, exist_ok=True)
    (d / "tasks" / "00-a" / "adapters.safetensors").write_bytes(b"finished task, never changes")
    (d / "crash.log").write_text("")  # per host: not shared
    (d / "progress.tmp").write_text("half")  # a write in flight: not shared


def test_run_snapshots_send_only_what_changed_and_restore_on_another_host(
    store: ArtifactStore, tmp_path: Path
) -> None:
    host_a, host_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    _run_dir(host_a, 1)
    counting = Flaky(store, fail_on="")
    sync = RunSync(counting, "runs/j1", host_a)  # type: ignore[arg-type]
    assert sync.push()
    assert not sync.push()  # nothing changed: no write at all
    first = len(counting.puts)
    _run_dir(host_a, 2)  # the checkpoint and progress change; the finished task does not
    assert sync.push()
    assert len(counting.puts) - first == 4  # trainer.pt, adapters, progress.json blobs + the manifest
    assert RunSync(store, "runs/j1", host_b).pull()
    shared = {k: v for k, v in _tree(host_a).items() if k not in ("crash.log", "progress.tmp", ".sync.json")}
    assert {k: v for k, v in _tree(host_b).items() if k != ".sync.json"} == shared
    assert len(store.list("runs/j1/blobs")) == 4  # step-1 blobs were deleted with their manifest


def test_a_crash_mid_snapshot_leaves_the_previous_snapshot_in_force(
    store: ArtifactStore, tmp_path: Path
) -> None:
    host_a = tmp_path / "a"
    _run_dir(host_a, 1)
    RunSync(store, "runs/j1", host_a).push()
    _run_dir(host_a, 2)
    with pytest.raises(ConnectionError):  # dies before the new manifest: step-2 blobs are orphans
        RunSync(Flaky(store, "manifest.json"), "runs/j1", host_a).push()  # type: ignore[arg-type]
    host_b = tmp_path / "b"
    RunSync(store, "runs/j1", host_b).pull()
    assert (host_b / "checkpoint" / "trainer.pt").read_bytes().startswith(b"optimizer at step 1")
    assert (host_b / "checkpoint" / "adapters.safetensors").read_bytes().startswith(b"adapters at step 1")


def test_pull_keeps_a_local_copy_that_is_the_latest_and_replaces_a_stale_one(
    store: ArtifactStore, tmp_path: Path
) -> None:
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    _run_dir(host_a, 1)
    RunSync(store, "j", host_a).push()
    (host_a / "checkpoint" / "trainer.pt").write_bytes(b"newer than the store")  # not pushed yet
    assert not RunSync(store, "j", host_a).pull()  # this host wrote the latest snapshot: keep local
    assert (host_a / "checkpoint" / "trainer.pt").read_bytes() == b"newer than the store"
    RunSync(store, "j", host_b).pull()
    (host_b / "checkpoint" / "trainer.pt").write_bytes(b"step 5 on host b")
    (host_b / "checkpoint" / "adapters.safetensors").unlink()
    RunSync(store, "j", host_b).push()
    assert RunSync(store, "j", host_a).pull()  # host b moved on: a's copy is stale, replace it
    assert (host_a / "checkpoint" / "trainer.pt").read_bytes() == b"step 5 on host b"
    assert not (host_a / "checkpoint" / "adapters.safetensors").exists()


def _fake_version(root: Path, name: str, version: int, created_by: str = "job_1") -> None:
    d = root / name / f"v{version}"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"tensors")
    record = {
        "name": name,
        "version": version,
        "base_model": "tiny-llama",
        "base_fingerprint": "fp",
        "method": "seq_lora",
        "created_by": created_by,
    }
    (d / "record.json").write_text(json.dumps(record))


def test_registry_versions_reach_a_host_that_lacks_them(store: ArtifactStore, tmp_path: Path) -> None:
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    _fake_version(host_a, "sentiment", 1)
    _fake_version(host_a, "sentiment", 2)
    _fake_version(host_a, "french", 1)
    assert push_registry(store, "adapters/t_1", host_a) == ["french@1", "sentiment@1", "sentiment@2"]
    assert push_registry(store, "adapters/t_1", host_a) == []  # already there
    assert pull_registry(store, "adapters/t_1", host_b, name="french") == ["french@1"]
    assert sorted(pull_registry(store, "adapters/t_1", host_b)) == ["sentiment@1", "sentiment@2"]
    reg = Registry(host_b)
    assert reg.names() == ["french", "sentiment"] and reg.versions_of("sentiment") == [1, 2]
    assert reg.get("sentiment@2").created_by == "job_1"
    assert not list(host_b.glob("*/.pull-*"))  # temp directories are cleaned up


def test_two_hosts_registering_the_same_version_conflict(store: ArtifactStore, tmp_path: Path) -> None:
    _fake_version(tmp_path / "a", "x", 1, created_by="job_a")
    _fake_version(tmp_path / "b", "x", 1, created_by="job_b")
    push_registry(store, "adapters/t", tmp_path / "a")
    with pytest.raises(ConflictError, match="x@1"):
        push_registry(store, "adapters/t", tmp_path / "b")
    assert json.loads(store.get_bytes("adapters/t/x/v1/record.json"))["created_by"] == "job_a"


def _tiny_peft() -> Any:
    from cltune.config import LoraConfig
    from cltune.methods.common import attach_adapter, peft_lora_config
    from cltune.models import build_tiny_llama

    model, _, _ = build_tiny_llama(hidden=32, layers=1)
    return attach_adapter(model, "default", peft_lora_config(LoraConfig(r=2)))


def _claiming(store: ArtifactStore, root: Path, owner: str) -> Registry:
    from cltune.artifact_sync import claim_version

    return Registry(root, claim=lambda n, v: claim_version(store, "adapters/t", n, v, owner))


RECORD_FIELDS = {"base_model": "tiny-llama", "base_fingerprint": "fp", "method": "seq_lora"}


def test_hosts_registering_one_name_at_once_get_different_versions(
    store: ArtifactStore, tmp_path: Path
) -> None:
    import threading

    model = _tiny_peft()
    hosts = [_claiming(store, tmp_path / f"host{i}", f"job_{i}") for i in range(3)]
    barrier = threading.Barrier(len(hosts))
    got: dict[int, int] = {}

    def register(i: int) -> None:
        barrier.wait()  # every host allocates at the same moment, none has seen the others' versions
        got[i] = hosts[i].save(model, "default", {"name": "x", **RECORD_FIELDS}).version

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(hosts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got.values()) == [1, 2, 3]
    for h in hosts:  # no ConflictError: each host publishes the number it claimed
        push_registry(store, "adapters/t", h.root)
    assert remote_versions(store, "adapters/t") == {"x": [1, 2, 3]}
    # a host that pulls them gets the adapters, not the claims
    assert sorted(pull_registry(store, "adapters/t", tmp_path / "reader")) == ["x@1", "x@2", "x@3"]
    assert not list((tmp_path / "reader").rglob("claim.json"))


def test_a_deleted_version_number_is_never_given_out_again_on_any_host(
    store: ArtifactStore, tmp_path: Path
) -> None:
    from cltune.artifact_sync import delete_adapter

    model = _tiny_peft()
    a = _claiming(store, tmp_path / "a", "job_a")
    assert a.save(model, "default", {"name": "x", **RECORD_FIELDS}).version == 1
    assert a.save(model, "default", {"name": "x", **RECORD_FIELDS}).version == 2
    push_registry(store, "adapters/t", a.root)
    assert delete_adapter(store, "adapters/t", "x", 2) == [2]
    b = _claiming(store, tmp_path / "b", "job_b")  # a fresh host that never saw v2
    assert b.save(model, "default", {"name": "x", **RECORD_FIELDS}).version == 3
    assert remote_versions(store, "adapters/t") == {"x": [1]}


def test_a_version_published_before_claims_existed_is_not_claimed(
    store: ArtifactStore, tmp_path: Path
) -> None:
    from cltune.artifact_sync import claim_version

    _fake_version(tmp_path / "old", "x", 1)
    push_registry(store, "adapters/t", tmp_path / "old")  # no claim.json: written by an older cltune
    assert claim_version(store, "adapters/t", "x", 1) is False
    assert claim_version(store, "adapters/t", "x", 2) is True
    assert claim_version(store, "adapters/t", "x", 2) is False
