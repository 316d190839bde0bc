"""Adapters of the caller's tenant: import (an archive of peft files trained elsewhere), list (latest),
versions, record, download (peft format), delete."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from cltune.adapter_import import import_adapter as import_archive
from cltune.artifact_sync import claim_version, push_registry
from cltune.artifact_sync import delete_adapter as delete_shared
from cltune.config import NAME_RE, check_name
from cltune.models import CATALOG
from cltune.registry import AdapterRecord, Registry
from service import artifacts
from service.api.deps import InferenceDep, RegistryDep, SettingsDep, TenantDep
from service.api.errors import ApiError
from service.api.schemas import AdapterList, AdapterPublic, ErrorResponse
from service.api.uploads import Received, receive_multipart, receive_raw, too_large, upload_doc
from service.layout import adapters_prefix
from service.settings import Settings

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (401, 404, 422)}
Version = Annotated[int | None, Query(ge=1, description="default: the latest version")]
Name = Annotated[  # the pattern is stated for clients; check_name refuses other names with 422
    str, PathParam(description="an adapter name", json_schema_extra={"pattern": NAME_RE.pattern})
]


class ArchiveFormat(StrEnum):
    TAR_GZ = "tar.gz"
    ZIP = "zip"


ARCHIVE_TYPES = (  # raw bodies; the format is read from the archive's first bytes
    "application/gzip",
    "application/x-gzip",
    "application/x-tar",
    "application/zip",
    "application/x-zip-compressed",
    "application/octet-stream",
)
IMPORT_ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 409, 413, 415, 422)
}
IMPORT_HINT = "an adapter archive holds its peft files; raise CLTUNE_MAX_ADAPTER_UPLOAD_BYTES for larger ones"
IMPORT_EXAMPLE = "send the archive as -F file=@adapter.tar.gz -F name=NAME"
IMPORT_DOC = upload_doc(
    {"name": {"type": "string", "pattern": NAME_RE.pattern}, "base_model": {"type": "string"}},
    ("application/gzip", "application/zip"),
)


@router.post(
    "", status_code=201, response_model=AdapterPublic, responses=IMPORT_ERRORS, openapi_extra=IMPORT_DOC
)
async def import_adapter(
    request: Request,
    settings: SettingsDep,
    tenant: TenantDep,
    registry: RegistryDep,  # pulls versions registered on other hosts first: numbering continues after them
    name: Annotated[
        str | None,
        Query(
            description="the adapter's name (or the form field `name`)",
            json_schema_extra={"pattern": NAME_RE.pattern},
        ),
    ] = None,
    base_model: Annotated[
        str | None,
        Query(
            description="the base model it was trained on (or the form field `base_model`); default: the one "
            "the archive's record.json names, else the model this server serves"
        ),
    ] = None,
) -> AdapterPublic:
    """Import an adapter trained elsewhere: a tar.gz or zip of peft's `adapter_config.json` and
    `adapter_model.safetensors` (what `download` gives; at the root or in one folder; a `record.json`
    is read for the base model's fingerprint). It is checked against the base model (LoRA only, every
    tensor a Linear layer of the base with A [r, in] and B [out, r], finite values, no variant the
    engine cannot serve) and published as the next version of `name` with method `imported`.

    Send `multipart/form-data` (`-F file=@adapter.tar.gz -F name=NAME`) or the raw archive with `?name=`.
    Over CLTUNE_MAX_ADAPTER_UPLOAD_BYTES: 413. It has no codebook: `model="auto"` does not route to it.
    """
    if name is not None:
        check_name(name, "adapter name")  # before the upload, not after it
    limit = settings.max_adapter_upload_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + 64 * 1024:  # multipart framing adds a few hundred bytes
        raise too_large(limit, IMPORT_HINT)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    incoming = settings.data_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=incoming, prefix="adapter-"))
    try:
        archive = scratch / "upload"
        if ctype == "multipart/form-data":
            got: Received = await receive_multipart(
                request.stream(), request.headers["content-type"], archive, limit, IMPORT_HINT, IMPORT_EXAMPLE
            )
        elif ctype in ARCHIVE_TYPES:
            got = await receive_raw(request.stream(), archive, limit, IMPORT_HINT)
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {ctype or '(none)'!r} is not accepted; send multipart/form-data with a "
                f"'file' part, or the archive as one of: {', '.join(ARCHIVE_TYPES)}",
            )
        adapter = name or got.fields.get("name")
        if not adapter:
            raise ApiError(422, "invalid_request", "name the adapter: ?name=... or -F name=...", field="name")
        asked = base_model or got.fields.get("base_model") or None
        record = await run_in_threadpool(
            _import, settings, tenant, registry, archive, adapter, asked, got, scratch
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return AdapterPublic.model_validate(record)


def _import(
    settings: Settings,
    tenant: str,
    registry: Registry,
    archive: Path,
    name: str,
    base_model: str | None,
    got: Received,
    scratch: Path,
) -> AdapterRecord:
    """Check and publish; with a shared artifact store the version number is claimed there and the new
    version pushed, as the runner does after registering, so every host serves it."""
    store = artifacts.store_from_settings(settings)
    prefix = adapters_prefix(tenant)
    if store is not None:
        registry = Registry(registry.root, claim=lambda n, v: claim_version(store, prefix, n, v, "import"))
    record = import_archive(
        registry,
        archive,
        name,
        limit=settings.max_adapter_upload_bytes,
        base_model=base_model,
        default_base=settings.engine_model,
        served={*CATALOG, settings.engine_model},
        cache_dir=settings.models_dir,
        filename=got.filename,
        sha256=got.sha256,
        created_by="import",
        scratch=scratch,
    )
    if store is not None:
        push_registry(store, prefix, registry.root)
    return record


@router.get("", response_model=AdapterList, responses=ERRORS)
def list_adapters(registry: RegistryDep) -> AdapterList:
    """The latest version of each of your adapters."""
    return AdapterList(items=[AdapterPublic.model_validate(r) for r in registry.list()])


@router.get("/{name}", response_model=AdapterPublic, responses=ERRORS)
def get_adapter(name: Name, registry: RegistryDep, version: Version = None) -> AdapterPublic:
    return AdapterPublic.model_validate(registry.get(name, version))


@router.get("/{name}/versions", response_model=AdapterList, responses=ERRORS)
def list_versions(name: Name, registry: RegistryDep) -> AdapterList:
    """Every version of one adapter, oldest first (404 if there is none)."""
    registry.path(name)  # raises NotFoundError when the name has no versions
    records = registry.history(name)
    return AdapterList(items=[AdapterPublic.model_validate(r) for r in records])


@router.get("/{name}/versions/{version}", response_model=AdapterPublic, responses=ERRORS)
def get_version(name: Name, version: int, registry: RegistryDep) -> AdapterPublic:
    return AdapterPublic.model_validate(registry.get(name, version))


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
    name: Name,
    registry: RegistryDep,
    settings: SettingsDep,
    tenant: TenantDep,
    inference: InferenceDep,
    version: Version = None,
) -> Response:
    """Delete one version, or every version of the adapter when `version` is omitted."""
    deleted = registry.delete(name, version)
    if (vllm := inference.vllm()) is not None:  # CLTUNE_ENGINE_BACKEND=vllm: unload it there
        vllm.drop(tenant, name, deleted)
    store = artifacts.store_from_settings(settings)
    if store is not None:  # else another host's copy would be pulled back in
        delete_shared(store, adapters_prefix(tenant), name, version)
    return Response(status_code=204)
