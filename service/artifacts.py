"""The service's artifact store: which store the settings name, and the keys the service uses in it.

Keys and local paths: service/layout.py (run snapshots, registry versions, uploaded datasets by id).

With the default settings (artifact_store="local", no artifact_dir) there is no store: one host keeps
everything in its data dir and nothing is copied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cltune.artifact_sync import RunSync, claim_version, pull_registry, push_registry
from cltune.artifacts import ArtifactStore, LocalStore, S3Store
from cltune.errors import ConfigError, DataError, NotFoundError
from service import layout
from service.layout import adapters_prefix, dataset_key, run_prefix  # the service's keys, here too
from service.settings import Settings

T = TypeVar("T")

ARTIFACT_SETTINGS = ("artifact_store", "artifact_dir", "s3_endpoint_url", "s3_bucket", "s3_prefix")


def store_from_settings(settings: Settings) -> ArtifactStore | None:
    """The shared store, or None when this deployment is a single host.

    Raises:
        ConfigError: artifact_store="s3" without s3_bucket.
    """
    if settings.artifact_store == "s3":
        if not settings.s3_bucket:
            raise ConfigError(
                "CLTUNE_ARTIFACT_STORE=s3 needs CLTUNE_S3_BUCKET (and CLTUNE_S3_ENDPOINT_URL for MinIO)",
                errors=[{"field": "s3_bucket", "message": "required when artifact_store is s3"}],
            )
        return S3Store(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url)
    if settings.artifact_dir is not None:
        return LocalStore(settings.artifact_dir)
    return None


def artifact_settings(settings: Settings) -> dict[str, Any]:
    """The settings a job process needs to open the same store (sent along with the job)."""
    return settings.model_dump(mode="json", include=set(ARTIFACT_SETTINGS))


def put_dataset(settings: Settings, tenant_id: str, ds_id: str) -> str | None:
    """Copy an uploaded dataset to the shared store (the API calls this after `datasets.publish`), so a
    worker on another host can fetch it. Returns the key, or None on a single host."""
    store = store_from_settings(settings)
    if store is None:
        return None
    key = dataset_key(tenant_id, ds_id)
    store.put_file(key, layout.dataset_path(settings.data_dir, tenant_id, ds_id))
    return key


def delete_dataset(settings: Settings, tenant_id: str, ds_id: str) -> None:
    """Remove an uploaded dataset from the shared store (after `datasets.delete_dataset`)."""
    store = store_from_settings(settings)
    if store is not None:
        store.delete(dataset_key(tenant_id, ds_id))


def run_files(settings: Settings, job_id: str, wanted: Callable[[str], bool]) -> Path:
    """A job's run directory as the API reads it: the local one when this host shares the worker's
    data dir; with a shared store, a reader's copy of the `wanted` files of the latest snapshot."""
    store = store_from_settings(settings)
    if store is None:
        return layout.run_dir(settings.data_dir, job_id)
    reader = layout.run_cache_dir(settings.data_dir, job_id)
    RunSync(store, run_prefix(job_id), reader).fetch(wanted)
    return reader


def register(settings: Settings, tenant_id: str, owner: str, write: Callable[[Any], T]) -> T:
    """Register a new adapter version from the API (a published checkpoint, an imported adapter):
    `write(registry)` writes it. With a shared store its number is claimed through the store, as the
    runners' are, and the new version is pushed so every host serves it."""
    from cltune.registry import Registry  # late: it loads torch and peft

    root = layout.adapters_dir(settings.data_dir, tenant_id)
    store = store_from_settings(settings)
    if store is None:
        return write(Registry(root))
    prefix = adapters_prefix(tenant_id)
    out = write(Registry(root, claim=lambda n, v: claim_version(store, prefix, n, v, owner)))
    push_registry(store, prefix, root)
    return out


@dataclass
class SharedArtifacts:
    """One job's view of the shared store: restore before it runs, fetch the datasets it reads, save at
    quiet points (the runner)."""

    store: ArtifactStore
    tenant_id: str
    data_dir: Path
    run: RunSync

    @classmethod
    def open(cls, job: dict[str, Any], data_dir: Path) -> SharedArtifacts | None:
        """From the job payload's "artifacts" settings (the worker's), else from CLTUNE_* variables."""
        settings = Settings(data_dir=data_dir, **job.get("artifacts", {}))
        store = store_from_settings(settings)
        if store is None:
            return None
        run_dir = layout.run_dir(data_dir, job["id"])
        return cls(store, job["tenant_id"], data_dir, RunSync(store, run_prefix(job["id"]), run_dir))

    @property
    def registry_root(self) -> Path:
        return layout.adapters_dir(self.data_dir, self.tenant_id)

    def registry(self, owner: str) -> Any:
        """The tenant's local cltune Registry, numbering new versions through the store (claims), so
        two hosts registering the same adapter name at once never publish the same name@version."""
        from cltune.registry import Registry  # late: it loads torch and peft

        prefix = adapters_prefix(self.tenant_id)
        return Registry(self.registry_root, claim=lambda n, v: claim_version(self.store, prefix, n, v, owner))

    def restore(self) -> None:
        """Bring this host up to date for the job: the run directory's latest snapshot and the tenant's
        adapters (a run continues from them, and new versions are numbered after them)."""
        self.run.pull()
        pull_registry(self.store, adapters_prefix(self.tenant_id), self.registry_root)

    def save(self) -> None:
        """Adapters first, then the run snapshot that names them: a snapshot never refers to an
        adapter the store lacks."""
        push_registry(self.store, adapters_prefix(self.tenant_id), self.registry_root)
        self.run.push()

    def fetch_dataset(self, ds_id: str, dest: Path) -> None:
        """Copy the tenant's uploaded dataset `ds_id` from the store to `dest` (layout.dataset_path).

        Raises:
            DataError: the store lacks it too.
        """
        try:
            self.store.get_file(dataset_key(self.tenant_id, ds_id), dest)
        except NotFoundError:
            raise DataError(
                f"dataset {ds_id!r} is neither on this host nor in the artifact store ({self.store!r})",
                file=ds_id,
            ) from None
