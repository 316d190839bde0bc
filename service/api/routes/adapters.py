"""Adapters of the caller's tenant: list (latest), versions, record, download (peft format), delete."""

from __future__ import annotations

import os
import tarfile
import tempfile
import zipfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from cltune.artifact_sync import delete_adapter as delete_shared
from cltune.config import NAME_RE
from service import artifacts
from service.api.deps import RegistryDep, SettingsDep, TenantDep
from service.api.schemas import AdapterList, AdapterPublic, ErrorResponse

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
ERRORS: dict[int | str, dict] = {c: {"model": ErrorResponse} for c in (401, 404, 422)}
Version = Annotated[int | None, Query(ge=1, description="default: the latest version")]
Name = Annotated[  # the pattern is stated for clients; check_name refuses other names with 422
    str, PathParam(description="an adapter name", json_schema_extra={"pattern": NAME_RE.pattern})
]


class ArchiveFormat(StrEnum):
    TAR_GZ = "tar.gz"
    ZIP = "zip"


@router.get("", response_model=AdapterList, responses=ERRORS)
def list_adapters(registry: RegistryDep) -> AdapterList:
    """The latest version of each of your adapters."""
    return AdapterList(items=[AdapterPublic.of(r) for r in registry.list()])


@router.get("/{name}", response_model=AdapterPublic, responses=ERRORS)
def get_adapter(name: Name, registry: RegistryDep, version: Version = None) -> AdapterPublic:
    return AdapterPublic.of(registry.get(name, version))


@router.get("/{name}/versions", response_model=AdapterList, responses=ERRORS)
def list_versions(name: Name, registry: RegistryDep) -> AdapterList:
    """Every version of one adapter, oldest first (404 if there is none)."""
    registry.path(name)  # raises NotFoundError when the name has no versions
    records = registry.history(name)  # Registry.list (a method) shadows `list` in its annotations for mypy
    return AdapterList(items=[AdapterPublic.of(r) for r in records])  # type: ignore[attr-defined]


@router.get("/{name}/versions/{version}", response_model=AdapterPublic, responses=ERRORS)
def get_version(name: Name, version: int, registry: RegistryDep) -> AdapterPublic:
    return AdapterPublic.of(registry.get(name, version))


@router.get(
    "/{name}/download",
    response_class=FileResponse,
    responses={200: {"content": {"application/gzip": {}, "application/zip": {}}}, **ERRORS},
)
async def download_adapter(
    name: Name, registry: RegistryDep, version: Version = None, format: ArchiveFormat = ArchiveFormat.TAR_GZ
) -> FileResponse:
    """An archive of one version in peft format: `<name>-v<N>/adapter_config.json`,
    `adapter_model.safetensors` (load the folder with `PeftModel.from_pretrained`), plus `record.json`."""
    src = await run_in_threadpool(registry.path, name, version)
    archive = await run_in_threadpool(_archive, src, f"{name}-{src.name}", format)
    media = "application/gzip" if format is ArchiveFormat.TAR_GZ else "application/zip"
    return FileResponse(
        archive,
        media_type=media,
        filename=f"{name}-{src.name}.{format.value}",
        background=BackgroundTask(os.unlink, archive),
    )


def _archive(src: Path, root: str, fmt: ArchiveFormat) -> Path:
    fd, tmp = tempfile.mkstemp(suffix="." + fmt.value)
    os.close(fd)
    files = sorted(p for p in src.iterdir() if p.is_file())
    if fmt is ArchiveFormat.TAR_GZ:
        with tarfile.open(tmp, "w:gz") as tar:
            for p in files:
                tar.add(p, arcname=f"{root}/{p.name}")
    else:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, arcname=f"{root}/{p.name}")
    return Path(tmp)


@router.delete("/{name}", status_code=204, responses=ERRORS)
def delete_adapter(
    name: Name, registry: RegistryDep, settings: SettingsDep, tenant: TenantDep, version: Version = None
) -> Response:
    """Delete one version, or every version of the adapter when `version` is omitted."""
    registry.delete(name, version)
    store = artifacts.store_from_settings(settings)
    if store is not None:  # else another host's copy would be pulled back in
        delete_shared(store, artifacts.adapters_prefix(tenant), name, version)
    return Response(status_code=204)
