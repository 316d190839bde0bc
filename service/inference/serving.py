"""What serves one app's OpenAI routes: `Inference` holds the embedded engine or the vLLM backend
(CLTUNE_ENGINE_BACKEND) and the tenants' registries as inference sees them (`registry_sync.py`).

The app makes one in its factory; its lifespan starts it (the base model is loaded at start-up with
CLTUNE_ENGINE_PRELOAD, else on the first request) and closes it; routes reach it through
`service.api.deps.InferenceDep`.
"""

from __future__ import annotations

import threading

from starlette.concurrency import run_in_threadpool

from cltune.config import ModelConfig
from cltune.models import load_model
from cltune.registry import Registry
from service import artifacts
from service.inference.engine import Engine
from service.inference.params import EngineParams
from service.inference.registry_sync import RegistrySync
from service.inference.vllm import VLLMBackend
from service.layout import adapters_prefix
from service.settings import Settings


def engine_params(settings: Settings) -> EngineParams:
    return EngineParams(
        max_adapters=settings.engine_max_adapters,
        max_batch=settings.engine_max_batch,
        max_wait_ms=settings.engine_max_wait_ms,
        max_tokens_limit=settings.engine_max_tokens,
    )


class Inference:
    """The app's inference backend, created on first use (or at start-up), and closed with the app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registries = RegistrySync(
            lambda: artifacts.store_from_settings(settings), settings.adapters_dir, adapters_prefix
        )
        self._engine: Engine | None = None
        self._vllm: VLLMBackend | None = None
        self._lock = threading.Lock()

    def registry(self, tenant: str) -> Registry:
        """`tenant`'s local registry, as is (no pull); adapters are read from it, never written."""
        return Registry(self.settings.adapters_dir(tenant))

    def vllm(self) -> VLLMBackend | None:
        """The vLLM backend, created on first use; None when the embedded engine serves.

        Raises:
            ApiError: 503, CLTUNE_VLLM_URL is not set.
        """
        if self.settings.engine_backend != "vllm":
            return None
        if self._vllm is None:
            with self._lock:
                if self._vllm is None:
                    self._vllm = VLLMBackend(self.settings, self.registry)
        return self._vllm

    def engine(self) -> Engine:
        """The embedded engine; the first call loads the base model (blocking)."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    loaded = load_model(
                        ModelConfig(name=self.settings.engine_model, device=self.settings.engine_device),
                        cache_dir=self.settings.models_dir,
                    )
                    self._engine = Engine(loaded, self.registry, engine_params(self.settings))
        return self._engine

    async def start(self) -> None:
        """At app start-up: load the base model now when CLTUNE_ENGINE_PRELOAD asks for it."""
        if self.settings.engine_preload and self.settings.engine_backend == "embedded":
            await run_in_threadpool(self.engine)

    async def aclose(self) -> None:
        """At app shutdown: stop the engine's scheduler (queued requests fail) and close the vLLM
        clients. A later request starts them again."""
        vllm, self._vllm = self._vllm, None
        if vllm is not None:
            await vllm.aclose()
        if self._engine is not None:
            await run_in_threadpool(self._engine.close)
