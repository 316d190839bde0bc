"""Admin (CLTUNE_ADMIN_KEY): tenants and their API keys."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service import auth
from service.api.deps import AdminDep, DbDep
from service.api.schemas import ApiKeyCreated, ApiKeyPublic, ErrorResponse, TenantCreate, TenantPublic

router = APIRouter(prefix="/v1/admin", tags=["admin"])
ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 403, 404, 409, 415, 422)
}


@router.post("/tenants", status_code=201, response_model=TenantPublic, responses=ERRORS)
def create_tenant(body: TenantCreate, db: DbDep, _: AdminDep) -> TenantPublic:
    return TenantPublic.model_validate(auth.create_tenant(db, body.name))


@router.get("/tenants", response_model=list[TenantPublic], responses=ERRORS)
def list_tenants(db: DbDep, _: AdminDep) -> list[TenantPublic]:
    return [TenantPublic.model_validate(t) for t in auth.list_tenants(db)]


@router.post("/tenants/{tenant}/keys", status_code=201, response_model=ApiKeyCreated, responses=ERRORS)
def create_key(tenant: str, db: DbDep, _: AdminDep) -> ApiKeyCreated:
    """A new API key for the tenant (by id or name). The key is in this response only."""
    key = auth.create_key(db, auth.find_tenant(db, tenant).id)
    assert key.key is not None
    return ApiKeyCreated(**ApiKeyPublic.model_validate(key).model_dump(), key=key.key)


@router.get("/tenants/{tenant}/keys", response_model=list[ApiKeyPublic], responses=ERRORS)
def list_keys(tenant: str, db: DbDep, _: AdminDep) -> list[ApiKeyPublic]:
    return [ApiKeyPublic.model_validate(k) for k in auth.list_keys(db, auth.find_tenant(db, tenant).id)]


@router.post("/keys/{key_id}/revoke", response_model=ApiKeyPublic, responses=ERRORS)
def revoke_key(key_id: str, request: Request, db: DbDep, _: AdminDep) -> ApiKeyPublic:
    """Revoke a key: at once in this process; other API processes stop trusting it within
    CLTUNE_AUTH_CACHE_SECONDS."""
    key = auth.revoke_key(db, key_id)
    request.app.state.key_cache.clear()
    return ApiKeyPublic.model_validate(key)
