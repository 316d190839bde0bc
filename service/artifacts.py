"""The service's artifact store: which store the settings name, and the keys the service uses in it.

Keys (under the store's own prefix):
    runs/<job_id>/manifest.json + blobs/<sha256>   run-directory snapshots (cltune.artifact_sync.RunSync)
    adapters/<tenant_id>/<name>/v<N>/...           registry versions, record.json published last
    datasets/<tenant_id>/<file>                    uploaded datasets (same file name as in <data_dir>)

With the default settings (artifact_store="local", no artifact_dir) there is no store: one host keeps
everything in its data dir and nothing is copied.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cltune.artifact_sync import RunSync, claim_version, pull_registry, push_registry
from cltune.artifacts import ArtifactStore, LocalStore, S3Store, join
from cltune.config import check_name
from cltune.errors import ConfigError, DataError, NotFoundError
from service.settings import Settings

T = TypeVar("T")

DATASET_FIELDS = ("train", "eval", "retain")  # TaskConfig fields that name a dataset file
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


def run_prefix(job_id: str) -> str:
    return join("runs", check_name(job_id, "job id"))


def adapters_prefix(tenant_id: str) -> str:
    return join("adapters", check_name(tenant_id, "tenant id"))


def dataset_key(tenant_id: str, path: str | Path) -> str:
    """The key of an uploaded dataset file: its tenant and file name (<data_dir>/datasets/<t>/<file>)."""
    return join("datasets", check_name(tenant_id, "tenant id"), check_name(Path(path).name, "file name"))


def put_dataset(settings: Settings, tenant_id: str, path: str | Path) -> str | None:
    """Copy an uploaded dataset to the shared store (the API calls this after `datasets.publish`), so
    a worker on another host can fetch it. Returns the key, or None on a single host."""
    store = store_from_settings(settings)
    if store is None:
        return None
    key = dataset_key(tenant_id, path)
    store.put_file(key, Path(path))
    return key


def delete_dataset(settings: Settings, tenant_id: str, path: str | Path) -> None:
    """Remove an uploaded dataset from the shared store (after `datasets.delete_dataset`)."""
    store = store_from_settings(settings)
    if store is not None:
        store.delete(dataset_key(tenant_id, path))


def run_files(settings: Settings, job_id: str, wanted: Callable[[str], bool]) -> Path:
    """A job's run directory as the API reads it: the local one when this host shares the worker's
    data dir; with a shared store, a reader's copy of the `wanted` files of the latest snapshot."""
    store = store_from_settings(settings)
    if store is None:
        return settings.runs_dir / job_id
    reader = settings.data_dir / "cache" / "runs" / job_id
    RunSync(store, run_prefix(job_id), reader).fetch(wanted)
    return reader


def register(settings: Settings, tenant_id: str, owner: str, write: Callable[[Any], T]) -> T:
    """Register a new adapter version from the API (a published checkpoint, an imported adapter):
    `write(registry)` writes it. With a shared store its number is claimed through the store, as the
    runners' are, and the new version is pushed so every host serves it."""
    from cltune.registry import Registry  # late: it loads torch and peft

    root = settings.adapters_dir(tenant_id)
    store = store_from_settings(settings)
    if store is None:
        return write(Registry(root))
    prefix = adapters_prefix(tenant_id)
    out = write(Registry(root, claim=lambda n, v: claim_version(store, prefix, n, v, owner)))
    push_registry(store, prefix, root)
    return out


@dataclass
class SharedArtifacts:
    """One job's view of the shared store: restore before it runs, save at quiet points (the runner)."""

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
        run_dir = data_dir / "runs" / job["id"]
        return cls(store, job["tenant_id"], data_dir, RunSync(store, run_prefix(job["id"]), run_dir))

    @property
    def registry_root(self) -> Path:
        return self.data_dir / "adapters" / self.tenant_id

    def registry(self, owner: str) -> Any:
        """The tenant's local cltune Registry, numbering new versions through the store (claims), so
        two hosts registering the same adapter name at once never publish the same name@version."""
        from cltune.registry import Registry  # late: it loads torch and peft

        prefix = adapters_prefix(self.tenant_id)
        return Registry(self.registry_root, claim=lambda n, v: claim_version(self.store, prefix, n, v, owner))

    def restore(self, config: dict[str, Any]) -> dict[str, Any]:
        """Bring this host up to date for the job and return its config with local dataset paths:
        the run directory's latest snapshot, the tenant's adapters (a run continues from them, and new
        versions are numbered after them), and any dataset file missing here."""
        self.run.pull()
        pull_registry(self.store, adapters_prefix(self.tenant_id), self.registry_root)
        config = copy.deepcopy(config)
        for task in config.get("tasks", []):
            for field in DATASET_FIELDS:
                if task.get(field) and not Path(task[field]).exists():
                    task[field] = str(self._fetch_dataset(task[field]))
        self._rebase_progress(config)
        return config

    def save(self) -> None:
        """Adapters first, then the run snapshot that names them: a snapshot never refers to an
        adapter the store lacks."""
        push_registry(self.store, adapters_prefix(self.tenant_id), self.registry_root)
        self.run.push()

    def _fetch_dataset(self, path: str) -> Path:
        dest = self.data_dir / "datasets" / self.tenant_id / Path(path).name
        if not dest.exists():
            try:
                self.store.get_file(dataset_key(self.tenant_id, path), dest)
            except NotFoundError:
                raise DataError(
                    f"dataset file is neither on this host nor in the artifact store ({self.store!r})",
                    file=path,
                ) from None
        return dest.resolve()

    def _rebase_progress(self, config: dict[str, Any]) -> None:
        """A run restored from another host recorded that host's dataset paths in progress.json;
        the same files (same names) live elsewhere here, and resuming compares configs."""
        for path in [self.run.dir / "progress.json", *self.run.dir.glob("rank*/progress.json")]:
            if not path.exists():  # rank*/: the other ranks of a data-parallel run
                continue
            progress = json.loads(path.read_text())
            saved = progress.get("config", {}).get("tasks", [])
            for mine, theirs in zip(config.get("tasks", []), saved, strict=False):
                for field in DATASET_FIELDS:
                    a, b = mine.get(field), theirs.get(field)
                    if a and b and a != b and Path(a).name == Path(b).name:
                        theirs[field] = a
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(progress, indent=1))
            tmp.replace(path)
