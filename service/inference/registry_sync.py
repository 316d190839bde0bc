"""A tenant's adapters as an inference request sees them when hosts share an artifact store.

Other hosts publish adapter versions to the store; before a request is routed, the tenant's local
registry must hold every version the request may be served by. The API's other routes pull the whole
registry each time (`service.api.deps.tenant_registry`: one listing of every file of every version). An
inference request pulls only what it can use, and only what may have changed:

  * `base`: no adapter, nothing to pull;
  * `name` or `name@N`: one listing of that adapter's keys; versions deleted on another host (a
    tombstone in the store) are deleted here, so they are never served again, and the registry is
    pulled (only the missing versions are fetched) when the store has a version this host lacks;
  * `auto`: the router compares every adapter of the tenant, so the registry is pulled (deletions too).

Concurrent requests share a pull, but only one that started after they arrived: a version published
before a request arrived is always seen by it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from cltune.adapter_files import RECORD, remove_versions
from cltune.artifact_sync import DELETED, pull_registry
from cltune.artifacts import ArtifactStore, join
from cltune.errors import InvalidNameError
from cltune.registry import Registry, parse_ref
from cltune.router import AUTO, BASE


class RegistrySync:
    """Brings tenants' local registries up to date with the shared store for inference. Thread-safe."""

    def __init__(
        self,
        store_for: Callable[[], ArtifactStore | None],
        root_for: Callable[[str], Path],
        prefix_for: Callable[[str], str],
    ) -> None:
        """Args:
        store_for: the shared store, or None on a single host (called once, on first use).
        root_for: tenant id -> the root of its local Registry.
        prefix_for: tenant id -> the key prefix of its adapters in the store.
        """
        self._store_for = store_for
        self._store: ArtifactStore | None = None
        self._store_known = False
        self.root_for = root_for
        self.prefix_for = prefix_for
        self._lock = threading.Lock()
        self._flights: dict[tuple[str, str | None], _Flight] = {}
        self.pulls = 0  # registry pulls made (a listing that found nothing new is not one); for tests

    def store(self) -> ArtifactStore | None:
        if not self._store_known:
            self._store = self._store_for()  # ConfigError (e.g. s3 without a bucket) is raised each time
            self._store_known = True
        return self._store

    def registry(self, tenant: str, model: str) -> Registry:
        """`tenant`'s registry holding every version `model` (a name, name@N, base or auto) may be served
        by. Blocking (store I/O)."""
        root = self.root_for(tenant)
        store = self.store()
        if store is None or model == BASE:
            return Registry(root)
        if model == AUTO:
            self._shared(tenant, None, lambda: self._pull(store, tenant, None))
            return Registry(root)
        try:
            name, version = parse_ref(model)
        except InvalidNameError:  # the router answers it (404)
            return Registry(root)
        registry = Registry(root)
        self._shared(tenant, name, lambda: self._pull_name(store, tenant, name, registry))
        return registry

    def _pull_name(self, store: ArtifactStore, tenant: str, name: str, registry: Registry) -> None:
        prefix = join(self.prefix_for(tenant), name)
        marked: dict[str, set[int]] = {RECORD: set(), DELETED: set()}
        for key in store.list(prefix):
            parts = key[len(prefix) + 1 :].split("/")
            if len(parts) == 2 and parts[1] in marked and parts[0][:1] == "v" and parts[0][1:].isdigit():
                marked[parts[1]].add(int(parts[0][1:]))
        local = set(registry.versions_of(name))
        remove_versions(registry.root, name, sorted(marked[DELETED] & local))  # deleted on another host
        if not marked[RECORD] <= local:
            self._pull(store, tenant, name)

    def _pull(self, store: ArtifactStore, tenant: str, name: str | None) -> None:
        pull_registry(store, self.prefix_for(tenant), self.root_for(tenant), name)
        self.pulls += 1

    def _shared(self, tenant: str, name: str | None, pull: Callable[[], None]) -> None:
        """Run `pull` unless a pull of the same (tenant, name) that started after this call did finish
        meanwhile (concurrent requests wait for one pull instead of each making their own)."""
        arrived = time.monotonic()
        with self._lock:
            flight = self._flights.setdefault((tenant, name), _Flight())
        with flight.lock:
            if flight.done_started >= arrived:
                return
            started = time.monotonic()
            pull()
            flight.done_started = started


class _Flight:
    """One (tenant, name)'s pulls: one at a time, and when the latest successful one started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done_started = float("-inf")
