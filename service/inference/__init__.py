"""Inference: the OpenAI routes' backends, one concept per module.

    params.py         EngineParams, SamplingParams, GenRequest, Completion, AdapterKey (EngineError: cltune.errors)
    lora.py           the gathered LoRA layer (every resident adapter in one Linear) and read_lora
    decode.py         rows, next-token choice, stop rules, streaming, the batched KV cache
    slots.py          adapter slots: load on first use, least-recently-used eviction, pinning
    engine.py         Engine: base model once, mixed-adapter batches, continuous / static scheduling
    vllm.py           VLLMBackend (CLTUNE_ENGINE_BACKEND=vllm): adapters loaded into a running vLLM
    registry_sync.py  a tenant's adapters pulled from the shared store only when a request needs them
    serving.py        Inference: the app's backend, created on first use, closed with the app

Modules import their siblings directly (never this package), leaves first: params <- lora <- slots,
params <- decode, {decode, slots} <- engine, params <- vllm, {engine, vllm, registry_sync} <- serving.
"""

from cltune.errors import EngineError
from service.inference.decode import Forward, generate_rows
from service.inference.engine import Engine
from service.inference.lora import GatheredLoRALinear, read_lora
from service.inference.params import (
    AdapterKey,
    Completion,
    EngineParams,
    FinishReason,
    GenRequest,
    SamplingParams,
    Timing,
)
from service.inference.registry_sync import RegistrySync
from service.inference.serving import Inference, engine_params
from service.inference.slots import AdapterSlots
from service.inference.vllm import VLLMBackend, lora_name, payload

__all__ = [
    "AdapterKey",
    "AdapterSlots",
    "Completion",
    "Engine",
    "EngineError",
    "EngineParams",
    "FinishReason",
    "Forward",
    "GatheredLoRALinear",
    "GenRequest",
    "Inference",
    "RegistrySync",
    "SamplingParams",
    "Timing",
    "VLLMBackend",
    "engine_params",
    "generate_rows",
    "lora_name",
    "payload",
    "read_lora",
]
