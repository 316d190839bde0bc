"""The FastAPI application factory: routers under /v1, /healthz, /metrics, one error shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import Engine

from service import auth
from service import datasets as dataset_store
from service.api import errors
from service.api.metrics import LatencyMiddleware, Metrics
from service.api.routes import adapters, admin, datasets, health, job_outputs, jobs, openai, webhooks
from service.db import init_db, make_engine
from service.inference import Inference
from service.settings import Settings, get_settings

DESCRIPTION = """Continual, parameter-efficient fine-tuning as a service.

Authenticate with `Authorization: Bearer <API key>`; every dataset, job, event and adapter belongs to
the key's tenant, and another tenant's resources answer 404. Errors have one shape:
`{"error": {"type": ..., "message": ..., ...details}}`."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start inference (CLTUNE_ENGINE_PRELOAD loads the base model now) and close it at shutdown."""
    inference: Inference = app.state.inference
    await inference.start()
    try:
        yield
    finally:
        await inference.aclose()


def create_app(settings: Settings | None = None, db: Engine | None = None) -> FastAPI:
    """Build the app: open (and migrate) the database, mount the routers, install error handlers."""
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    dataset_store.clean_staging(settings)  # uploads a crashed process left half-written
    db = db or make_engine(settings.db_url)
    init_db(db)
    if settings.auth_disabled:
        auth.ensure_tenant(db, auth.LOCAL_TENANT_NAME, auth.LOCAL_TENANT_ID)
    app = FastAPI(title="cltune", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.db = settings, db
    app.state.metrics = Metrics(db)
    app.state.key_cache = auth.KeyCache(settings.auth_cache_seconds)
    # nothing is loaded yet: the lifespan starts it, or the first inference request does (InferenceDep)
    app.state.inference = Inference(settings)
    for module in (datasets, jobs, job_outputs, adapters, admin, health, openai, webhooks):
        app.include_router(module.router)
    errors.install(app)
    app.add_middleware(LatencyMiddleware, metrics=app.state.metrics)
    return app
