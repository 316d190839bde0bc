"""Request dependencies as Annotated aliases: settings, db, inference, the caller's tenant, admin,
registry."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from cltune.artifact_sync import pull_registry
from cltune.registry import Registry
from service import artifacts, auth
from service.api.errors import ApiError
from service.inference.serving import Inference
from service.layout import adapters_prefix
from service.settings import Settings

_bearer = HTTPBearer(
    auto_error=False, description="an API key of your tenant (admin routes: CLTUNE_ADMIN_KEY)"
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
CHALLENGE = {"WWW-Authenticate": "Bearer"}


# async: FastAPI runs sync dependencies in the thread pool, a hop per dependency per request
async def get_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)  # set by create_app


async def get_db(request: Request) -> Engine:
    return cast(Engine, request.app.state.db)


async def get_inference(request: Request) -> Inference:
    """The app's inference backend (made by create_app, started and closed by its lifespan)."""
    return cast(Inference, request.app.state.inference)


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Engine, Depends(get_db)]
InferenceDep = Annotated[Inference, Depends(get_inference)]


def _key(creds: HTTPAuthorizationCredentials | None) -> str:
    if creds is None or not creds.credentials:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send 'Authorization: Bearer <key>' (create keys with "
            "`cltune keys create TENANT` or POST /v1/admin/tenants/{id}/keys)",
            CHALLENGE,
        )
    return creds.credentials


async def current_tenant(request: Request, settings: SettingsDep, db: DbDep, creds: Credentials) -> str:
    """The tenant id of the bearer key; the fixed local tenant when auth is disabled.
    A recently verified key is answered from the cache without leaving the event loop."""
    if settings.auth_disabled:
        return auth.LOCAL_TENANT_ID
    key, cache = _key(creds), cast(auth.KeyCache, request.app.state.key_cache)
    tenant = cache.get(auth.hash_key(key)) or await run_in_threadpool(auth.authenticate, db, key, cache)
    if tenant is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", CHALLENGE)
    return tenant


async def require_admin(settings: SettingsDep, creds: Credentials) -> None:
    if not settings.admin_key:
        raise ApiError(
            403, "forbidden", "the admin API is off: set CLTUNE_ADMIN_KEY on the server to enable it"
        )
    if not auth.is_admin(_key(creds), settings.admin_key):
        raise ApiError(
            403, "forbidden", "admin routes need the admin key (CLTUNE_ADMIN_KEY), not a tenant key"
        )


TenantDep = Annotated[str, Depends(current_tenant)]
AdminDep = Annotated[None, Depends(require_admin)]


async def tenant_registry(settings: SettingsDep, tenant: TenantDep) -> Registry:
    """The caller's own adapter registry (one directory per tenant, so names never collide);
    with a shared artifact store, versions registered on other hosts are pulled in first."""
    root = settings.adapters_dir(tenant)
    store = artifacts.store_from_settings(settings)
    if store is not None:
        await run_in_threadpool(pull_registry, store, adapters_prefix(tenant), root)
    return Registry(root)


RegistryDep = Annotated[Registry, Depends(tenant_registry)]
