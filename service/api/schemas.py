"""Wire schemas, named by role: `...Create` is what a client sends, `...Public` what it gets back.
They are distinct from stored rows (service/db.py) and domain objects (service/store.py, datasets.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cltune.config import NAME_RE
from service.db import JobStatus
from service.webhooks import MAX_URL_CHARS, DeliveryStatus, check_url


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    """A response body read from a domain object's attributes: `XPublic.model_validate(obj)`."""

    model_config = ConfigDict(from_attributes=True)


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # details: field, errors, limit_bytes, choices, ...
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


MAX_LIMIT = 1000  # items per page
MAX_OFFSET = 2**31  # beyond it the databases' integer types overflow (and no tenant has that many)
MAX_EVENT_ID = 2**31  # event ids are 32-bit integers: an `after_id` / Last-Event-ID cursor stays below


class Page(BaseModel):
    total: int
    limit: int = Field(ge=1, le=MAX_LIMIT)
    offset: int = Field(ge=0, le=MAX_OFFSET)


# ---------------------------------------------------------------- datasets


class DatasetPublic(_Out):
    id: str  # jobs name datasets by id; the file is stored as <id>.jsonl
    name: str = Field(description="display name: the uploaded file's name as sent (or ?name=)")
    format: str
    examples: int
    sha256: str
    size_bytes: int
    created_at: datetime


class DatasetList(Page):
    items: list[DatasetPublic]


# ---------------------------------------------------------------- jobs


class JobCreate(_In):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "config": {
                        "model": {"name": "tiny-llama"},
                        "tasks": [{"name": "a", "train": "ds_0123456789abcdef"}],
                        "train": {"steps": 10},
                    }
                }
            ]
        }
    )
    config: dict[str, Any] = Field(
        description="A RunConfig (see cltune/config.py) whose tasks' train / eval / retain are dataset ids "
        "of your tenant (ds_...), e.g. {'model': {'name': 'tiny-llama'}, 'method': {'name': "
        "'seq_lora'}, 'tasks': [{'name': 'a', 'train': 'ds_...'}], 'train': {'steps': 10}}"
    )
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first; FIFO within a priority")
    max_attempts: int | None = Field(
        None, ge=1, le=100, description="claims before it fails; default from CLTUNE_MAX_ATTEMPTS"
    )
    webhook_url: str | None = Field(
        None,
        max_length=MAX_URL_CHARS,
        description="POSTed job.succeeded | job.failed | job.cancelled when the job ends, signed with "
        "your tenant's webhook secret (POST /v1/webhooks/secret); an absolute http(s) URL",
        json_schema_extra={
            "pattern": "^https?://[^/?#\\s]+",
            "examples": ["https://example.com/hooks/cltune"],
        },
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, url: str | None) -> str | None:
        return None if url is None else check_url(url)


class JobPublic(_Out):
    id: str
    status: JobStatus
    priority: int
    attempts: int
    max_attempts: int
    cancel_requested: bool
    spec: dict[str, Any]  # the request as sent (dataset ids)
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    traceback: str | None  # of the last failed attempt (the job's own training code, never a request error)
    webhook_url: str | None  # notified when the job ends (see GET /v1/webhooks/deliveries)
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobList(Page):
    items: list[JobPublic]


class EventPublic(_Out):
    id: int  # increasing per job: pass the last one as `after_id` (or SSE Last-Event-ID) to resume
    job_id: str
    ts: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any]


class EventList(BaseModel):
    items: list[EventPublic]
    next_after_id: int  # the cursor for the next page


# ---------------------------------------------------------------- webhooks


class WebhookSecretPublic(_Out):
    created_at: datetime
    previous_valid_until: datetime | None = Field(
        description="the secret it replaced also signs deliveries until then (a second v1= in the header)"
    )


class WebhookSecretCreated(WebhookSecretPublic):
    secret: str = Field(description="the signing secret; shown only in this response")


class WebhookDeliveryPublic(_Out):
    id: str  # also X-Cltune-Delivery and the payload's id: receivers dedupe by it
    job_id: str
    type: str  # job.succeeded | job.failed | job.cancelled
    url: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None  # pending only: when the next attempt is due
    last_status_code: int | None  # the receiver's answer to the last attempt (None: no answer)
    last_error: str | None  # why the last attempt failed
    signed: bool | None  # whether the last attempt carried X-Cltune-Signature
    payload: dict[str, Any]  # the JSON body sent
    created_at: datetime
    delivered_at: datetime | None


class WebhookDeliveryList(Page):
    items: list[WebhookDeliveryPublic]


# ---------------------------------------------------------------- adapters


class AdapterPublic(_Out):
    name: str
    version: int
    ref: str  # name@version
    base_model: str
    base_fingerprint: str
    method: str
    method_params: dict[str, Any]
    lora: dict[str, Any]
    task: str | None
    parent: str | None
    datasets: list[dict[str, Any]]
    metrics: dict[str, Any]
    group: str | None
    codebook_size: int
    notes: dict[str, Any]
    created_by: str | None
    created_at: str


class AdapterList(BaseModel):
    items: list[AdapterPublic]


class CheckpointPublic(BaseModel):
    """A servable checkpoint a job kept: the served adapter at one step of one task."""

    task: str
    task_index: int
    step: int
    train_loss: float
    validation: float | None  # the early-stopping value at this step (lower is better)
    validation_metric: str | None  # "loss" (answer-token CE) or "1 - score"
    registered: str | None  # name@version when this is the step the task registered (its best)


class CheckpointList(BaseModel):
    items: list[CheckpointPublic]


class CheckpointPublish(_In):
    task: str = Field(description="the task whose checkpoint to publish", max_length=64)
    step: int = Field(ge=1, le=10_000_000, description="a step listed by GET /v1/jobs/{id}/checkpoints")
    name: str | None = Field(
        None,
        description="the adapter name to publish it under (default: the task's adapter name; a new version)",
        json_schema_extra={"pattern": NAME_RE.pattern},
    )


# ---------------------------------------------------------------- admin


class TenantCreate(_In):
    name: str = Field(
        description="1-64 characters from letters, digits, '.', '_', '-'",
        json_schema_extra={"pattern": NAME_RE.pattern, "examples": ["acme"]},  # checked by check_name: 422
    )


class TenantPublic(_Out):
    id: str
    name: str
    created_at: datetime


class ApiKeyPublic(_Out):
    id: str
    tenant_id: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="the API key; shown only in this response (only its hash is stored)")


class Health(BaseModel):
    status: str
    database: str
