"""Jobs that start from an adapter (`tasks[0].init_adapter`), resolved against the caller's tenant
registry when the job is submitted: the version is fixed then (a later import does not change what
the job trains from), and the lora fields the config leaves out are taken from the adapter."""

from __future__ import annotations

from typing import Any

from cltune.artifact_sync import pull_registry
from service import artifacts
from service.layout import adapters_prefix
from service.settings import Settings


def resolve_init_adapter(settings: Settings, tenant: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Pin `config`'s init_adapter in place (cltune.init_adapter.pin); returns field errors, [] if none.
    With a shared artifact store, versions registered on other hosts are pulled in first."""
    tasks = config.get("tasks")
    if not (
        isinstance(tasks, list) and tasks and isinstance(tasks[0], dict) and tasks[0].get("init_adapter")
    ):
        return []
    from cltune.init_adapter import pin  # late: loads torch and peft
    from cltune.registry import Registry

    root = settings.adapters_dir(tenant)
    store = artifacts.store_from_settings(settings)
    if store is not None:
        pull_registry(store, adapters_prefix(tenant), root)
    return pin(config, Registry(root))
