"""Webhooks: the tenant's signing secret (created or rotated, shown once) and its delivery log.

A job names its URL in `webhook_url` (POST /v1/jobs); the workers send the deliveries (service/webhooks.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from service import store, webhooks
from service.api.deps import DbDep, SettingsDep, TenantDep
from service.api.schemas import (
    MAX_LIMIT,
    MAX_OFFSET,
    ErrorResponse,
    WebhookDeliveryList,
    WebhookDeliveryPublic,
    WebhookSecretCreated,
    WebhookSecretPublic,
)
from service.webhooks import DeliveryStatus

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 404, 415, 422)}


@router.post("/secret", status_code=201, response_model=WebhookSecretCreated, responses=ERRORS)
def rotate_secret(db: DbDep, settings: SettingsDep, tenant: TenantDep) -> WebhookSecretCreated:
    """Create your tenant's webhook signing secret, or replace it. The secret is in this response only
    (it is stored, to sign, but no GET returns it). A replaced secret keeps signing, as a second `v1=`,
    for CLTUNE_WEBHOOK_SECRET_GRACE_SECONDS (24 h), so receivers can switch without rejecting events."""
    made = webhooks.rotate_secret(db, tenant, settings.webhook_secret_grace_seconds)
    assert made.secret is not None
    return WebhookSecretCreated(**WebhookSecretPublic.model_validate(made).model_dump(), secret=made.secret)


@router.get("/secret", response_model=WebhookSecretPublic, responses=ERRORS)
def get_secret(db: DbDep, tenant: TenantDep) -> WebhookSecretPublic:
    """When your secret was made, and until when the one it replaced still signs; never the secret.
    404 if you have none (deliveries are sent unsigned until then)."""
    return WebhookSecretPublic.model_validate(webhooks.get_secret(db, tenant))


@router.get("/deliveries", response_model=WebhookDeliveryList, responses=ERRORS)
def list_deliveries(
    db: DbDep,
    tenant: TenantDep,
    job_id: Annotated[str | None, Query(max_length=64, description="one of your jobs")] = None,
    status: DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> WebhookDeliveryList:
    """Your webhook deliveries, newest first: each with its attempts, the receiver's last answer, the
    error and when the next attempt is due. Filter by `job_id` (404 if it is not your job) or `status`."""
    if job_id is not None:
        store.get_job(db, tenant, job_id)  # another tenant's job answers 404, like a missing one
    items, total = webhooks.list_deliveries(db, tenant, job_id, status, limit, offset)
    return WebhookDeliveryList(
        items=[WebhookDeliveryPublic.model_validate(d) for d in items],
        total=total,
        limit=limit,
        offset=offset,
    )
