"""Liveness and Prometheus metrics (both without auth: they reveal no tenant's data)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from service.api.deps import DbDep
from service.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(db: DbDep) -> Response:
    """200 when the API can reach its database, else 503."""
    try:
        with db.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # any database failure means "not healthy", never a 500
        return JSONResponse(
            Health(status="unavailable", database=type(e).__name__).model_dump(), status_code=503
        )
    return JSONResponse(Health(status="ok", database="ok").model_dump())


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format: cltune_jobs{status}, cltune_queue_depth, cltune_job_duration_seconds,
    cltune_http_request_duration_seconds{method,route,status}."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
