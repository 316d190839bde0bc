"""Service settings from the environment (prefix CLTUNE_); every default is declared here."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service import layout


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLTUNE_", extra="ignore")

    data_dir: Path = Path("data")  # datasets/, adapters/<tenant>/, runs/<job>/, models/ live here
    database_url: str | None = None  # None: SQLite file <data_dir>/cltune.db
    auth_disabled: bool = False  # local development only: every request acts as one default tenant
    admin_key: str | None = None  # creates tenants and API keys
    max_upload_bytes: int = Field(100 * 1024 * 1024, ge=1)  # dataset uploads, bytes
    max_adapter_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)  # adapter archives (POST /v1/adapters)
    lease_seconds: float = Field(30.0, gt=0)  # a running job whose lease is older is re-queued
    heartbeat_seconds: float = Field(5.0, gt=0)  # workers renew leases this often (< lease_seconds)
    max_attempts: int = Field(3, ge=1, le=100)  # claims of one job before it fails for good
    cancel_grace_seconds: float = Field(10.0, ge=0)  # after a cancel, the child is killed after this
    host: str = "127.0.0.1"  # `cltune serve` binds here; loopback unless you mean to expose it
    port: int = Field(8000, ge=1, le=65535)
    embedded_worker: bool = True  # `cltune serve` also starts one worker (`--no-worker` turns it off)
    allow_model_paths: bool = False  # jobs may name local model directories, not only catalog models
    auth_cache_seconds: float = Field(5.0, ge=0, le=300)  # a verified key is trusted this long per process
    #   (saves a query per request; a revoked key may work this much longer on other API processes)
    sse_poll_seconds: float = Field(0.5, gt=0, le=60)  # how often an SSE stream looks for new events
    sse_keepalive_seconds: float = Field(15.0, gt=0, le=600)  # comment lines that keep proxies open
    # inference (/v1/completions, /v1/chat/completions): service/inference/
    engine_model: str = (
        "smollm2-135m"  # base model served (catalog name or model directory); adapters must match
    )
    engine_device: str = "auto"  # auto | cpu | cuda | cuda:N
    engine_preload: bool = False  # load the base model at start-up instead of on the first request
    engine_max_adapters: int = Field(
        8, ge=1, le=4096
    )  # adapters resident at once; least recently used evicted
    engine_max_batch: int = Field(16, ge=1, le=1024)  # requests generated together (mixed adapters)
    engine_max_wait_ms: float = Field(5.0, ge=0, le=60_000)  # how long a batch waits to fill up
    engine_max_tokens: int = Field(1024, ge=1, le=1_000_000)  # largest max_tokens a request may ask for
    # embedded: the engine above generates in the API process; vllm: a running `vllm serve --enable-lora`
    # (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, serving engine_model, seeing data_dir) generates: service/inference/vllm.py
    engine_backend: str = Field("embedded", pattern="^(embedded|vllm)$")
    vllm_url: str | None = None  # e.g. http://127.0.0.1:8001 (required with engine_backend=vllm)
    vllm_model: str | None = None  # the base model's name in vLLM; None: the first model it lists
    vllm_max_loras: int = Field(
        8, ge=1, le=4096
    )  # adapters kept loaded in vLLM; least recently used unloaded
    vllm_timeout_seconds: float = Field(300.0, gt=0, le=3600)  # per read / write of one request to vLLM
    router_backend: str = Field("tfidf", pattern="^(tfidf|minilm)$")  # similarity for model="auto"
    router_threshold: float | None = Field(None, ge=0, le=1)  # None: the backend's default (cltune/router.py)
    # auto, no group above the threshold: the base model, or the most recent group (DEMA's reference)
    router_fallback: str = Field("base", pattern="^(base|recent)$")
    # artifacts shared by several hosts (service/artifacts.py): runs, adapters, datasets
    artifact_store: str = Field("local", pattern="^(local|s3)$")  # local: data_dir only, or artifact_dir
    artifact_dir: Path | None = None  # local: a directory all hosts mount (NFS); None: nothing is shared
    s3_endpoint_url: str | None = None  # None: AWS; e.g. http://minio:9000 (keys: AWS_ACCESS_KEY_ID, ...)
    s3_bucket: str | None = None  # required when artifact_store = "s3"
    s3_prefix: str = "cltune"  # key prefix inside the bucket
    devices_per_job: int = Field(1, ge=1, le=64)  # > 1: each job trains data-parallel on this many devices
    # whether the workers train on CUDA (a job's model.device and quantization are checked against it
    # at submit); None: whether this host has CUDA. Set it where the API runs on a host without GPUs.
    worker_cuda: bool | None = None
    # job webhooks (service/webhooks.py): sent by a thread of every worker
    webhook_max_attempts: int = Field(8, ge=1, le=20)  # POSTs of one delivery before it is `failed`
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=60)  # per connect / write / read of one POST
    webhook_poll_seconds: float = Field(1.0, gt=0, le=60)  # how often a worker looks for due deliveries
    webhook_concurrency: int = Field(4, ge=1, le=64)  # POSTs in flight at once per worker
    webhook_secret_grace_seconds: float = Field(24 * 3600, ge=0)  # after a rotation the old secret
    #   also signs this long (a second v1= in the header), so receivers can switch without losing events
    # loopback, private, link-local (cloud metadata) and reserved addresses are refused as webhook hosts
    # unless this is set: a job's URL must not reach into the network the workers sit in
    webhook_allow_private: bool = False

    @model_validator(mode="after")
    def _default_db(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'cltune.db'}"
        return self

    # the paths under data_dir: service.layout builds them
    @property
    def datasets_dir(self) -> Path:
        return layout.datasets_dir(self.data_dir)

    def adapters_dir(self, tenant_id: str) -> Path:
        """The root of one tenant's adapter Registry."""
        return layout.adapters_dir(self.data_dir, tenant_id)

    @property
    def runs_dir(self) -> Path:
        return layout.runs_dir(self.data_dir)

    @property
    def models_dir(self) -> Path:
        return layout.models_dir(self.data_dir)

    @property
    def db_url(self) -> str:
        assert self.database_url is not None  # set by the validator
        return self.database_url


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
