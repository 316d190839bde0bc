"""The FastAPI application factory: routers under /v1, /healthz, /metrics, one error shape."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy import Engine

from service import auth
from service import datasets as dataset_store
from service.api import errors
from service.api.metrics import LatencyMiddleware, Metrics
from service.api.routes import adapters, admin, datasets, health, job_outputs, jobs, openai, webhooks
from service.db import init_db, make_engine
from service.settings import Settings, get_settings

DESCRIPTION = """Continual, parameter-efficient fine-tuning as a service.

Authenticate with `Authorization: Bearer <API key>`; every dataset, job, event and adapter belongs to
the key's tenant, and another tenant's resources answer 404. Errors have one shape:
`{"error": {"type": ..., "message": ..., ...details}}`."""


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app: open (and migrate) the database, mount the routers, install error handlers."""
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    dataset_store.clean_staging(settings)  # uploads a crashed process left half-written
    engine = engine or make_engine(settings.db_url)
    init_db(engine)
    if settings.auth_disabled:
        auth.ensure_tenant(engine, auth.LOCAL_TENANT_NAME, auth.LOCAL_TENANT_ID)
    app = FastAPI(title="cltune", version="0.1.0", description=DESCRIPTION)
    app.state.settings, app.state.engine = settings, engine
    app.state.metrics = Metrics(engine)
    app.state.key_cache = auth.KeyCache(settings.auth_cache_seconds)
    for module in (datasets, jobs, job_outputs, adapters, admin, health, openai, webhooks):
        app.include_router(module.router)
    errors.install(app)
    app.add_middleware(LatencyMiddleware, metrics=app.state.metrics)
    return app
