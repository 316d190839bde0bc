"""Datasets: upload JSONL (multipart `file` or a raw body), list, get, delete."""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service import artifacts, datasets
from service.api.deps import DbDep, SettingsDep, TenantDep
from service.api.errors import ApiError
from service.api.schemas import MAX_LIMIT, MAX_OFFSET, DatasetList, DatasetPublic, ErrorResponse
from service.api.uploads import RAW_TYPES, Received, receive_multipart, receive_raw, too_large, upload_doc

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 404, 409, 413, 415, 422)
}
UPLOAD_DOC = upload_doc({"name": {"type": "string"}}, ("application/x-ndjson",))


@router.post("", status_code=201, response_model=DatasetPublic, responses=ERRORS, openapi_extra=UPLOAD_DOC)
async def upload_dataset(
    request: Request,
    settings: SettingsDep,
    db: DbDep,
    tenant: TenantDep,
    name: Annotated[
        str | None,
        Query(
            description="display name, e.g. 'my data.jsonl' (1-255 characters; no '/', '\\', control "
            "characters or leading '.'); default: the uploaded file's name"
        ),
    ] = None,
) -> DatasetPublic:
    """Upload a JSONL dataset (chat, alpaca or prompt/completion records), validated before it is stored.

    Send `multipart/form-data` with a `file` part (`curl -F file=@train.jsonl`), or the raw JSONL with
    Content-Type application/x-ndjson and `?name=`. The body is streamed to disk; over
    CLTUNE_MAX_UPLOAD_BYTES it is refused with 413.
    """
    limit = settings.max_upload_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + 64 * 1024:  # multipart framing adds a few hundred bytes
        raise too_large(limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    ds_id, staged = await run_in_threadpool(datasets.staging_path, settings, tenant)
    lock = await run_in_threadpool(datasets.hold_staged, staged)  # held until published or refused
    try:
        if ctype == "multipart/form-data":
            got: Received = await receive_multipart(
                request.stream(), request.headers["content-type"], staged, limit
            )
        elif ctype in RAW_TYPES:
            got = await receive_raw(request.stream(), staged, limit)
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {ctype or '(none)'!r} is not accepted; "
                f"send multipart/form-data with a 'file' part, or one of: {', '.join(RAW_TYPES)}",
            )
        ds_name = name or got.fields.get("name") or got.filename
        if not ds_name:
            raise ApiError(
                422,
                "invalid_request",
                "name the dataset: ?name=... (raw bodies have no file name)",
                field="name",
            )
        ds = await run_in_threadpool(
            datasets.publish, db, settings, tenant, ds_id, ds_name, staged, got.size, got.sha256
        )
    except BaseException:  # refused, or the client went away: nothing of it stays
        staged.unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)
    await run_in_threadpool(artifacts.put_dataset, settings, tenant, ds.id)  # for workers on other hosts
    return DatasetPublic.model_validate(ds)


@router.get("", response_model=DatasetList, responses=ERRORS)
def list_datasets(
    db: DbDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> DatasetList:
    items, total = datasets.list_datasets(db, tenant, limit, offset)
    return DatasetList(
        items=[DatasetPublic.model_validate(d) for d in items], total=total, limit=limit, offset=offset
    )


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=ERRORS)
def get_dataset(dataset_id: str, db: DbDep, tenant: TenantDep) -> DatasetPublic:
    return DatasetPublic.model_validate(datasets.get_dataset(db, tenant, dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=ERRORS)
def delete_dataset(dataset_id: str, db: DbDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """Delete a dataset and its file (409 while a queued or running job uses it)."""
    ds = datasets.delete_dataset(db, tenant, dataset_id)
    artifacts.delete_dataset(settings, tenant, ds.id)
    return Response(status_code=204)
