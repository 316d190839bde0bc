"""What the inference engine is configured with, and what goes in and out of it: EngineParams (server
limits, scheduler), SamplingParams (one request's decoding), GenRequest, Completion and its Timing, the
AdapterKey of one resident adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length"]


class EngineParams(BaseModel):
    max_adapters: int = Field(8, ge=1, le=4096)  # resident adapters (slots); LRU eviction beyond
    max_batch: int = Field(16, ge=1, le=1024)  # requests generated together
    max_wait_ms: float = Field(5.0, ge=0.0, le=60_000.0)  # how long a batch waits to fill up
    max_tokens_limit: int = Field(2048, ge=1, le=1_000_000)  # largest max_tokens a request may ask for
    max_prompt_tokens: int = Field(4096, ge=1, le=1_000_000)  # longer prompts keep their last tokens
    # "continuous": requests join and leave the running batch at every decode step; "static": a batch
    # runs to completion before the next one starts (the previous scheduler, kept for benchmarks)
    scheduler: Literal["continuous", "static"] = "continuous"


class SamplingParams(BaseModel):
    max_tokens: int = Field(16, ge=1)  # upper bound checked against EngineParams.max_tokens_limit
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # nucleus sampling mass
    stop: list[str] = Field(default_factory=list, max_length=4)  # generation ends before any of these
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # per-request generator: same seed, same sample
    ignore_eos: bool = False  # keep generating past EOS (benchmarks: fixed output lengths)


@dataclass(frozen=True)
class AdapterKey:
    """One adapter version of one tenant: what a slot holds."""

    tenant: str
    name: str
    version: int
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class GenRequest:
    prompt_ids: list[int]
    adapter: AdapterKey | None  # None: the base model
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Timing:
    """When one request was submitted, joined a batch, got its first token and finished
    (time.perf_counter()), and the scheduler's decode-step counter (`Engine.stats["steps"]`) when it
    joined and left the batch (continuous scheduler; -1 otherwise)."""

    submitted: float = 0.0
    admitted: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    admitted_step: int = -1
    finished_step: int = -1


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    adapter: str  # "name@version" or "base"
    timing: Timing = field(default_factory=Timing)
