"""Prometheus metrics: HTTP latency (measured in this process) and job-store gauges (read from the
database at scrape time, so they are right with any number of API processes and remote workers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import store
from service.db import TERMINAL, JobRow, session

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)  # seconds
STORE_CACHE_SECONDS = 5.0  # scrapes within this window reuse the last database read


class StoreCollector(Collector):
    """jobs by state, queue depth and the duration of finished jobs, from the job table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] = (0.0, [])

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            at, metrics = self._cached
            if time.monotonic() - at > STORE_CACHE_SECONDS:
                metrics = self._read()
                self._cached = (time.monotonic(), metrics)
        yield from metrics

    def _read(self) -> list[Metric]:
        counts = store.count_by_status(self.engine)
        jobs = GaugeMetricFamily("cltune_jobs", "Jobs by state", labels=["status"])
        for status, n in counts.items():
            jobs.add_metric([status], n)
        depth = GaugeMetricFamily("cltune_queue_depth", "Jobs waiting to be claimed", value=counts["queued"])
        return [jobs, depth, self._durations()]

    def _durations(self) -> Metric:
        q = select(JobRow.status, JobRow.started_at, JobRow.finished_at).where(
            JobRow.status.in_([s.value for s in TERMINAL]),
            JobRow.started_at.is_not(None),
            JobRow.finished_at.is_not(None),
        )
        per: dict[str, list[float]] = {s.value: [] for s in TERMINAL}
        with session(self.engine) as s:
            for status, started, finished in s.execute(q):
                if started is not None and finished is not None:  # the query excludes NULLs; mypy cannot know
                    per[status].append((finished - started).total_seconds())
        fam = HistogramMetricFamily(
            "cltune_job_duration_seconds",
            "Wall time from first claim to the end of finished jobs",
            labels=["status"],
        )
        for status, values in per.items():
            buckets = [(str(b), sum(v <= b for v in values)) for b in JOB_BUCKETS] + [("+Inf", len(values))]
            fam.add_metric([status], buckets, sum_value=sum(values))
        return fam


class Metrics:
    """One registry per app (tests build many apps in one process)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.http = Histogram(
            "cltune_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(StoreCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyMiddleware:
    """Pure ASGI middleware (no per-request task as BaseHTTPMiddleware has): times every HTTP request
    by route template, so /v1/jobs/{job_id} is one series, not one per job."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: dict[str, Any] = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.http.labels(scope["method"], template, str(status["code"])).observe(
                time.perf_counter() - start
            )
