"""Inference's pull of a tenant's adapters from the shared store (service/inference/registry_sync.py):
a request asks the store only about the adapter it can use, a version published on another host is served
by the next request that can use it, one deleted on another host is never served again, and concurrent
requests share a pull."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cltune.artifact_sync import delete_adapter, push_registry, remote_versions
from cltune.artifacts import LocalStore
from cltune.registry import Registry
from service.inference.registry_sync import RegistrySync

TENANT = "t1"
PREFIX = f"adapters/{TENANT}"


class CountingStore(LocalStore):
    """A LocalStore that counts listings (what every check and pull starts with)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lists: list[str] = []

    def list(self, prefix: str = "") -> list[str]:
        self.lists.append(prefix)
        return super().list(prefix)


def publish(other_host: Path, store: LocalStore, name: str, version: int) -> None:
    """Register `name@version` on another host and push it to the store."""
    d = other_host / name / f"v{version}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"weights %d" % version)
    (d / "record.json").write_text(f'{{"name": "{name}", "version": {version}}}')
    push_registry(store, PREFIX, other_host)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[RegistrySync, CountingStore, Path]:
    store = CountingStore(tmp_path / "store")
    sync = RegistrySync(lambda: store, lambda t: tmp_path / "here" / t, lambda t: f"adapters/{t}")
    return sync, store, tmp_path / "there"


def test_only_what_the_request_can_use_is_pulled_and_only_when_it_changed(
    setup: tuple[RegistrySync, CountingStore, Path],
) -> None:
    sync, store, there = setup
    publish(there, store, "capitals", 1)
    publish(there, store, "french", 1)
    store.lists.clear()
    assert sync.registry(TENANT, "base").names() == [] and store.lists == []  # base: nothing to pull
    assert sync.registry(TENANT, "capitals@1").versions_of("capitals") == [1]  # not here: pulled
    assert sync.registry(TENANT, "capitals@1").names() == ["capitals"] and sync.pulls == 1  # only that name
    n = len(store.lists)
    assert sync.registry(TENANT, "capitals@1").versions_of("capitals") == [1]
    assert store.lists[n:] == [f"{PREFIX}/capitals"] and sync.pulls == 1  # here: one listing (deleted?)
    sync.registry(TENANT, "capitals")  # the latest: one listing of that adapter, nothing new to fetch
    assert store.lists[n + 1 :] == [f"{PREFIX}/capitals"] and sync.pulls == 1
    publish(there, store, "capitals", 2)  # another host publishes a new version
    assert sync.registry(TENANT, "capitals").versions_of("capitals") == [1, 2] and sync.pulls == 2
    assert sync.registry(TENANT, "capitals@2").versions_of("capitals") == [1, 2] and sync.pulls == 2
    assert sync.registry(TENANT, "auto").names() == ["capitals", "french"]  # auto: every adapter
    assert sync.registry(TENANT, "no such/name").names() == ["capitals", "french"]  # the router's 404


def test_a_version_deleted_on_another_host_is_not_served_here_nor_pushed_back(
    setup: tuple[RegistrySync, CountingStore, Path],
) -> None:
    sync, store, there = setup
    publish(there, store, "capitals", 1)
    publish(there, store, "capitals", 2)
    publish(there, store, "french", 1)
    assert sync.registry(TENANT, "auto").versions_of("capitals") == [1, 2]  # both pulled here
    assert delete_adapter(store, PREFIX, "capitals", 2) == [2]  # DELETE on another host
    assert sync.registry(TENANT, "capitals@2").versions_of("capitals") == [1]  # the router answers 404
    here = sync.root_for(TENANT)
    assert push_registry(store, PREFIX, here) == []  # this host's old copy is never published again
    assert remote_versions(store, PREFIX) == {"capitals": [1], "french": [1]}
    delete_adapter(store, PREFIX, "french")
    assert sync.registry(TENANT, "auto").names() == ["capitals"]  # `auto` pulls deletions too
    assert Registry(here).versions_of("capitals") == [1]
    publish(there, store, "capitals", 3)  # numbers are never reused: a new version is 3, not 2
    assert sync.registry(TENANT, "capitals").versions_of("capitals") == [1, 3]


def test_concurrent_requests_share_a_pull_that_started_after_they_arrived(
    setup: tuple[RegistrySync, CountingStore, Path],
) -> None:
    sync, store, there = setup
    publish(there, store, "capitals", 1)
    gate, entered = threading.Event(), threading.Event()
    real = sync._pull

    def slow_pull(*a: object) -> None:
        entered.set()
        gate.wait(10)
        real(*a)  # type: ignore[arg-type]

    sync._pull = slow_pull  # type: ignore[method-assign, assignment]
    first = threading.Thread(target=sync.registry, args=(TENANT, "auto"))
    first.start()
    assert entered.wait(10)
    # these arrive while the first pull runs: it may have listed before their version was published,
    # so they need a pull of their own, and share one
    publish(there, store, "french", 1)
    late = [threading.Thread(target=sync.registry, args=(TENANT, "auto")) for _ in range(4)]
    for t in late:
        t.start()
    time.sleep(0.5)  # they are waiting for the first pull
    gate.set()
    for t in [first, *late]:
        t.join(10)
    assert sync.pulls == 2 and sync.registry(TENANT, "french@1").names() == ["capitals", "french"]
