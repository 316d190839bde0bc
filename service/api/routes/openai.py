"""OpenAI-compatible inference: POST /v1/completions, POST /v1/chat/completions (stream as SSE), GET /v1/models.

`model` is an adapter name (its latest version), `name@version`, `base`, or `auto` (the router picks by
instruction similarity). The answer names the adapter that served it in `model` and in the
`x-cltune-adapter` header (`auto` adds `x-cltune-route-score` and `x-cltune-route-reason`). A caller
reaches only its own tenant's adapters. Errors use OpenAI's shape, which is also the API's:
`{"error": {"type", "message", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from cltune.config import ModelConfig
from cltune.data import encode_prompt
from cltune.errors import InvalidNameError, NotFoundError
from cltune.models import load_model
from cltune.registry import Registry
from cltune.router import AUTO, BASE, Route, RouterParams, choose
from service.api.deps import RegistryDep, SettingsDep, TenantDep
from service.api.errors import ApiError
from service.api.schemas import ErrorResponse
from service.engine import Completion, Engine, EngineParams, GenRequest, SamplingParams
from service.settings import Settings
from service.vllm_backend import backend_of, payload

ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 404, 409, 415, 422)
}
GENERATED = {  # a JSON answer, or with "stream": true Server-Sent Events
    200: {"content": {"application/json": {}, "text/event-stream": {}}},
    **ERRORS,
}


# ---------------------------------------------------------------- wire schemas (OpenAI's field names)


# OpenAI request fields this server does not implement, with the values that ask for nothing (clients
# send those by default). Any other value answers 400 naming the field: never silently ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "echo": (None, False),  # completions
    "best_of": (None, 1),
    "suffix": (None, ""),
}
ACCEPTED = {"user"}  # an end-user id for abuse tracking: nothing to do with the answer


def _doc(**schema: Any) -> Any:
    """Ranges stated in the OpenAPI schema only: _sampling checks them and answers 400 (as OpenAI does),
    where a pydantic constraint would answer 422."""
    return Field(None, json_schema_extra=schema)


class _OpenAIIn(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by _check_fields: 400 naming the field
    model: str = Field(description="an adapter name, name@version, 'base' or 'auto' (GET /v1/models)")
    max_tokens: int | None = _doc(minimum=1, description="default 16; at most CLTUNE_ENGINE_MAX_TOKENS")
    temperature: float | None = _doc(minimum=0, maximum=2)
    top_p: float | None = _doc(exclusiveMinimum=0, maximum=1)
    n: int | None = _doc(minimum=1, maximum=1)
    stop: str | list[str] | None = _doc(maxItems=4)
    seed: int | None = _doc(minimum=0, maximum=2**63 - 1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionCreate(_OpenAIIn):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "base", "prompt": "The capital of France is", "max_tokens": 8}]
        }
    )
    prompt: str | list[str] = Field(
        json_schema_extra={"minLength": 1, "minItems": 1},
        description="one prompt, or a list (one choice each; at most CLTUNE_ENGINE_MAX_BATCH)",
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by _check_fields: 400 naming the field
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionCreate(_OpenAIIn):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "base", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8}]
        }
    )
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_completion_tokens: int | None = _doc(minimum=1, description="max_tokens under its newer name")


# ---------------------------------------------------------------- the engine, created once per app


def _engine_params(settings: Settings) -> EngineParams:
    return EngineParams(
        max_adapters=settings.engine_max_adapters,
        max_batch=settings.engine_max_batch,
        max_wait_ms=settings.engine_max_wait_ms,
        max_tokens_limit=settings.engine_max_tokens,
    )


_create_lock = threading.Lock()


def inference_engine(app: FastAPI) -> Engine:
    """The app's engine; loads the base model on first use (or at start-up with engine_preload)."""
    engine: Engine | None = getattr(app.state, "inference", None)
    if engine is not None:
        return engine
    with _create_lock:
        engine = getattr(app.state, "inference", None)
        if engine is None:
            settings: Settings = app.state.settings
            loaded = load_model(
                ModelConfig(name=settings.engine_model, device=settings.engine_device),
                cache_dir=settings.models_dir,
            )
            engine = Engine(
                loaded, lambda tenant: Registry(settings.adapters_dir(tenant)), _engine_params(settings)
            )
            app.state.inference = engine
    return engine


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    if app.state.settings.engine_preload and app.state.settings.engine_backend == "embedded":
        await run_in_threadpool(inference_engine, app)
    yield
    vllm = getattr(app.state, "vllm", None)
    if vllm is not None:
        await vllm.aclose()
    engine: Engine | None = getattr(app.state, "inference", None)
    if engine is not None:
        await run_in_threadpool(engine.close)


router = APIRouter(prefix="/v1", tags=["inference"], lifespan=_lifespan)


# ---------------------------------------------------------------- request -> engine requests


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request_error", message, param=param, code="invalid_value")


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, "invalid_request_error", why, param=param, code="unsupported_parameter")


def _check_fields(body: _OpenAIIn) -> None:
    """400 for a field this server does not implement (unless its value asks for nothing) or does not
    know at all, and for message fields and content parts other than text."""
    known = sorted({*type(body).model_fields, *ACCEPTED})
    for name, value in (body.model_extra or {}).items():
        if name in ACCEPTED or (name in UNSUPPORTED and value in UNSUPPORTED[name]):
            continue
        if name in UNSUPPORTED:
            raise _unsupported(
                name, f"{name} is not supported by this server (plain text generation); omit it"
            )
        raise _unsupported(name, f"unknown field {name[:64]!r}; this endpoint takes: {', '.join(known)}")
    for i, m in enumerate(getattr(body, "messages", None) or []):
        for name, value in (m.model_extra or {}).items():
            if value is not None:
                raise _unsupported(
                    f"messages.{i}.{name}",
                    f"messages.{i}.{name[:64]} is not supported; a message takes role and content",
                )
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _unsupported(
                    f"messages.{i}.content.{j}",
                    f"messages.{i}.content.{j}: only text parts ({{'type': 'text', 'text': ...}}) are "
                    f"supported, got type {str(part.get('type'))[:32]!r}",
                )


def _check_text(value: Any, path: str = "") -> None:
    """400 for a string anywhere in the request that holds a lone surrogate (a JSON escape such as
    \\ud800 without its pair): it is no character, and the tokenizer cannot encode it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _bad(
                f"{path} holds a lone surrogate ({value[e.start]!r} at character {e.start}); "
                "send valid Unicode text",
                path,
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{path}.{i}")


def _sampling(body: _OpenAIIn, max_tokens: int | None, limit: int) -> SamplingParams:
    if body.n not in (None, 1):
        raise _bad(f"n={body.n} is not supported: send one request per completion", "n")
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    fields = {
        "max_tokens": max_tokens if max_tokens is not None else 16,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "stop": [s for s in stop if s],
        "seed": body.seed,
    }
    try:
        sp = SamplingParams(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err.get("loc") else None
        raise _bad(f"{param}: {err['msg']} (got {fields.get(param or '', '?')!r})", param) from e
    if sp.max_tokens > limit:
        raise _bad(f"max_tokens {sp.max_tokens} is over this server's limit {limit}", "max_tokens")
    return sp


async def _route(model: str, instruction: str, tenant: str, registry: Registry, request: Request) -> Route:
    settings: Settings = request.app.state.settings
    params = RouterParams(
        backend=settings.router_backend,
        threshold=settings.router_threshold,
        fallback=settings.router_fallback,
    )
    try:
        route = await run_in_threadpool(choose, model, instruction, registry, params)
    except (NotFoundError, InvalidNameError) as e:
        raise ApiError(
            404,
            "invalid_request_error",
            f"The model {model!r} does not exist or you do not have access to it: use one of GET /v1/models",
            param="model",
            code="model_not_found",
        ) from e
    return route


def _headers(route: Route) -> dict[str, str]:
    h = {"x-cltune-adapter": route.served_by, "x-cltune-route-reason": route.reason}
    if route.score is not None:
        h["x-cltune-route-score"] = f"{route.score:.4f}"
    return h


def _usage(outs: list[Completion]) -> dict[str, int]:
    p, c = sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _stream(engine: Engine, req: GenRequest, chunk: Any, include_usage: bool) -> AsyncIterator[str]:
    """SSE lines: one chunk per text delta, a final chunk with finish_reason, optional usage, [DONE]."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[str | None] = asyncio.Queue()

    def on_delta(d: str) -> None:  # runs on the engine thread
        loop.call_soon_threadsafe(deltas.put_nowait, d)

    fut = engine.submit(req, on_delta)
    fut.add_done_callback(lambda _: loop.call_soon_threadsafe(deltas.put_nowait, None))
    try:
        yield f"data: {json.dumps(chunk(None, None, first=True))}\n\n"
        while (d := await deltas.get()) is not None:
            yield f"data: {json.dumps(chunk(d, None))}\n\n"
    finally:  # the client went away (CancelledError / GeneratorExit): its row leaves the batch
        fut.cancel()  # a no-op once the request is done
    try:
        out = fut.result()
    except Exception as e:  # headers are sent: report the failure inside the stream
        yield f"data: {json.dumps({'error': {'type': 'server_error', 'message': str(e)}})}\n\n"
        return
    yield f"data: {json.dumps(chunk(None, out.finish_reason))}\n\n"
    if include_usage:
        yield f"data: {json.dumps(chunk(None, None, usage=_usage([out])))}\n\n"
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- routes


@router.post("/completions", responses=GENERATED)
async def create_completion(
    body: CompletionCreate, request: Request, tenant: TenantDep, registry: RegistryDep
) -> Response:
    """Text completion of `prompt` (a string, or a list: one choice per prompt) by the chosen adapter."""
    settings: Settings = request.app.state.settings
    _check_fields(body)
    _check_text(body.model_dump(exclude_none=True))
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or any(not p for p in prompts) or len(prompts) > settings.engine_max_batch:
        raise _bad(
            f"prompt must be a non-empty string or a list of 1-{settings.engine_max_batch} of them", "prompt"
        )
    if body.stream and len(prompts) > 1:
        raise _bad("stream=true takes a single prompt", "prompt")
    sp = _sampling(body, body.max_tokens, settings.engine_max_tokens)
    route = await _route(body.model, prompts[0], tenant, registry, request)
    if (vllm := backend_of(request.app)) is not None:  # CLTUNE_ENGINE_BACKEND=vllm: vLLM generates
        fields = {"prompt": body.prompt, "add_special_tokens": False}  # as the embedded engine encodes
        fwd = payload(sp, body.stream, body.stream_options, **fields)
        return await vllm.forward(
            "/v1/completions", fwd, tenant, route.record, route.served_by, _headers(route)
        )
    engine = await run_in_threadpool(inference_engine, request.app)
    key = engine.resolve(tenant, route.record) if route.record is not None else None
    reqs = [GenRequest(engine.tokenizer(p, add_special_tokens=False)["input_ids"], key, sp) for p in prompts]
    rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())

    def chunk(text: str | None, finish: str | None, first: bool = False, usage: dict | None = None) -> dict:
        base = {"id": rid, "object": "text_completion", "created": created, "model": route.served_by}
        if usage is not None:
            return {**base, "choices": [], "usage": usage}
        return {
            **base,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}],
        }

    if body.stream:
        include = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _stream(engine, reqs[0], chunk, include), media_type="text/event-stream", headers=_headers(route)
        )
    outs = await asyncio.gather(*(asyncio.wrap_future(engine.submit(r)) for r in reqs))
    choices = [
        {"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
        for i, o in enumerate(outs)
    ]
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": route.served_by,
            "choices": choices,
            "usage": _usage(list(outs)),
        },
        headers=_headers(route),
    )


@router.post("/chat/completions", responses=GENERATED)
async def create_chat_completion(
    body: ChatCompletionCreate, request: Request, tenant: TenantDep, registry: RegistryDep
) -> Response:
    """Chat completion: the messages go through the base model's chat template; `stream` sends SSE chunks."""
    settings: Settings = request.app.state.settings
    _check_fields(body)
    _check_text(body.model_dump(exclude_none=True))
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if not messages:
        raise _bad("messages must not be empty", "messages")
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sp = _sampling(body, asked, settings.engine_max_tokens)  # (0 is refused, not taken as "unset")
    instruction = next(
        (m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"]
    )
    route = await _route(body.model, instruction, tenant, registry, request)
    if (vllm := backend_of(request.app)) is not None:  # vLLM applies the same chat template
        fwd = payload(sp, body.stream, body.stream_options, messages=messages)
        return await vllm.forward(
            "/v1/chat/completions", fwd, tenant, route.record, route.served_by, _headers(route)
        )
    engine = await run_in_threadpool(inference_engine, request.app)
    key = engine.resolve(tenant, route.record) if route.record is not None else None
    req = GenRequest(encode_prompt(engine.tokenizer, messages), key, sp)
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())

    def chunk(text: str | None, finish: str | None, first: bool = False, usage: dict | None = None) -> dict:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": route.served_by}
        if usage is not None:
            return {**base, "choices": [], "usage": usage}
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    if body.stream:
        include = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _stream(engine, req, chunk, include), media_type="text/event-stream", headers=_headers(route)
        )
    out = await asyncio.wrap_future(engine.submit(req))
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": out.text},
        "logprobs": None,
        "finish_reason": out.finish_reason,
    }
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": route.served_by,
            "choices": [choice],
            "usage": _usage([out]),
        },
        headers=_headers(route),
    )


def _epoch(iso: str) -> int:
    """An ISO-8601 timestamp as Unix seconds (OpenAI's `created`)."""
    return int(datetime.fromisoformat(iso).timestamp())


@router.get("/models", responses={401: ERRORS[401]})
def list_models(registry: RegistryDep, tenant: TenantDep, settings: SettingsDep) -> dict[str, Any]:
    """`base`, `auto`, and each of your adapters: by name (its latest version) and as name@version.
    Adapters are `owned_by` your tenant and name the base model they were trained on (`base_model`)."""
    now = int(time.time())

    def entry(mid: str, owner: str, base: str, created: int = now) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": created, "owned_by": owner, "base_model": base}

    data = [entry(BASE, "cltune", settings.engine_model), entry(AUTO, "cltune", settings.engine_model)]
    for name in registry.names():
        history = registry.history(name)
        created = [_epoch(r.created_at) for r in history]
        data.append(entry(name, tenant, history[-1].base_model, created[-1]))
        data += [entry(r.ref, tenant, r.base_model, c) for r, c in zip(history, created, strict=True)]
    return {"object": "list", "data": data}
