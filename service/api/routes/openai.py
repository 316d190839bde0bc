"""OpenAI-compatible inference: POST /v1/completions, POST /v1/chat/completions (stream as SSE), GET /v1/models.

`model` is an adapter name (its latest version), `name@version`, `base`, or `auto` (the router picks by
instruction similarity). The answer names the adapter that served it in `model` and in the
`x-cltune-adapter` header (`auto` adds `x-cltune-route-score` and `x-cltune-route-reason`). A caller
reaches only its own tenant's adapters. `n` (1-8) choices of a prompt share its prefill. Both endpoints
answer through one builder (`Answer`: the JSON body and the SSE chunks). Errors use OpenAI's shape, which
is also the API's: `{"error": {"type", "message", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from cltune.data import encode_prompt
from cltune.errors import InvalidNameError, NotFoundError
from cltune.router import AUTO, BASE, Route, RouterParams, choose
from service.api.deps import InferenceDep, RegistryDep, SettingsDep, TenantDep
from service.api.errors import ApiError
from service.api.schemas import ErrorResponse
from service.inference import Completion, Engine, GenRequest, Inference, SamplingParams, payload
from service.settings import Settings

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
    n: int | None = _doc(minimum=1, maximum=8, description="choices per prompt (one prefill shared)")
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


router = APIRouter(prefix="/v1", tags=["inference"])


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


N_MAX = 8  # the most choices (`n`) one request may ask for per prompt


def _sampling(body: _OpenAIIn, max_tokens: int | None, limit: int) -> SamplingParams:
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


def _choices(body: _OpenAIIn, settings: Settings) -> int:
    """`n`, the choices per prompt: 1 to N_MAX (and to CLTUNE_ENGINE_MAX_BATCH, all generated together)."""
    most = min(N_MAX, settings.engine_max_batch)
    n = 1 if body.n is None else body.n
    if not 1 <= n <= most:
        raise _bad(f"n={n} is outside 1-{most}: this server generates at most {most} choices per prompt", "n")
    return n


async def _route(
    model: str, instruction: str, tenant: str, inference: Inference, settings: Settings
) -> Route:
    """The adapter that serves `model` for `tenant` (its registry is first brought up to date with the
    shared store, as far as `model` needs)."""
    params = RouterParams(
        backend=settings.router_backend,
        threshold=settings.router_threshold,
        fallback=settings.router_fallback,
    )
    registry = await run_in_threadpool(inference.registries.registry, tenant, model)
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


def _usage(outs: list[Completion], n: int) -> dict[str, int]:
    """OpenAI's usage: each prompt counted once (its n choices share it), every choice's tokens."""
    p, c = sum(o.prompt_tokens for o in outs[::n]), sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


# ---------------------------------------------------------------- one answer builder for both endpoints


@dataclass
class Answer:
    """The OpenAI answer of one request, completion or chat: the JSON body and the stream chunks."""

    chat: bool
    model: str  # the adapter that served it (name@version, or base)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def body(self, outs: list[Completion], n: int) -> dict[str, Any]:
        """The whole answer: choice i is outs[i] (prompt i // n, choice i % n of that prompt)."""
        choices = []
        for i, o in enumerate(outs):
            part = {"message": {"role": "assistant", "content": o.text}} if self.chat else {"text": o.text}
            choices.append({"index": i, **part, "logprobs": None, "finish_reason": o.finish_reason})
        head = self._head("chat.completion" if self.chat else "text_completion")
        return {**head, "choices": choices, "usage": _usage(outs, n)}

    def chunk(
        self, index: int, text: str | None = None, finish: str | None = None, first: bool = False
    ) -> str:
        """One SSE event of choice `index`: its opening (chat: the role), a text delta, or its finish."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            part: dict[str, Any] = {"delta": delta}
        else:
            part = {"text": text or ""}
        choice = {"index": index, **part, "logprobs": None, "finish_reason": finish}
        return _sse(
            {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        )

    def usage_chunk(self, outs: list[Completion], n: int) -> str:
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return _sse({**head, "choices": [], "usage": _usage(outs, n)})


async def _stream(
    engine: Engine, req: GenRequest, n: int, answer: Answer, include_usage: bool
) -> AsyncIterator[str]:
    """SSE events for the n choices of `req`: each choice's opening, its text deltas as they come (choices
    interleaved, told apart by `index`), its finish; then usage (if asked) and [DONE]."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()  # (choice, delta); None: it is done

    def post(i: int) -> Callable[[Any], None]:  # called on the engine thread: a delta, or None when done
        def put(d: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (i, d if isinstance(d, str) else None))

        return put

    futures = engine.submit_n(req, n, [post(i) for i in range(n)])
    for i, fut in enumerate(futures):
        fut.add_done_callback(post(i))
    outs: list[Completion] = []
    try:
        for i in range(n):
            yield answer.chunk(i, first=True)
        for _ in range(n):
            while (event := await events.get())[1] is not None:
                yield answer.chunk(event[0], event[1])
            i = event[0]
            try:
                out = futures[i].result()
            except Exception as e:  # headers are sent: report the failure inside the stream
                yield _sse({"error": {"type": "server_error", "message": str(e)}})
                return
            outs.append(out)
            yield answer.chunk(i, finish=out.finish_reason)
    finally:  # the client went away (CancelledError / GeneratorExit), or a choice failed: rows leave
        for fut in futures:
            fut.cancel()  # a no-op once the request is done
    if include_usage:
        yield answer.usage_chunk(outs, n)
    yield "data: [DONE]\n\n"


async def _generate(
    chat: bool,
    body: _OpenAIIn,
    sp: SamplingParams,
    instruction: str,
    encode: Callable[[Any], list[list[int]]],
    vllm_fields: dict[str, Any],
    tenant: str,
    inference: Inference,
) -> Response:
    """Both endpoints after their own checks: route, then generate `n` choices per prompt (`encode` gives
    the prompts' token ids), or forward to vLLM; answer as JSON or as SSE."""
    settings = inference.settings
    n = _choices(body, settings)
    route = await _route(body.model, instruction, tenant, inference, settings)
    if (vllm := inference.vllm()) is not None:  # CLTUNE_ENGINE_BACKEND=vllm: vLLM generates
        fwd = payload(sp, body.stream, body.stream_options, n=n, **vllm_fields)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return await vllm.forward(path, fwd, tenant, route.record, route.served_by, _headers(route))
    engine = await run_in_threadpool(inference.engine)
    key = engine.resolve(tenant, route.record) if route.record is not None else None
    reqs = [GenRequest(ids, key, sp) for ids in encode(engine.tokenizer)]
    answer = Answer(chat, route.served_by)
    if body.stream:
        include = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _stream(engine, reqs[0], n, answer, include),
            media_type="text/event-stream",
            headers=_headers(route),
        )
    futures = [f for r in reqs for f in engine.submit_n(r, n)]
    outs = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    return JSONResponse(answer.body(list(outs), n), headers=_headers(route))


# ---------------------------------------------------------------- routes


@router.post("/completions", responses=GENERATED)
async def create_completion(body: CompletionCreate, tenant: TenantDep, inference: InferenceDep) -> Response:
    """Text completion of `prompt` (a string, or a list) by the chosen adapter: `n` choices per prompt,
    choice i * n + j being prompt i's choice j."""
    settings = inference.settings
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

    def encode(tokenizer: Any) -> list[list[int]]:
        return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    # vLLM is sent the prompt as the embedded engine encodes it (no special tokens added)
    fields = {"prompt": body.prompt, "add_special_tokens": False}
    return await _generate(False, body, sp, prompts[0], encode, fields, tenant, inference)


@router.post("/chat/completions", responses=GENERATED)
async def create_chat_completion(
    body: ChatCompletionCreate, tenant: TenantDep, inference: InferenceDep
) -> Response:
    """Chat completion: the messages go through the base model's chat template; `n` choices; `stream`
    sends SSE chunks."""
    settings = inference.settings
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

    def encode(tokenizer: Any) -> list[list[int]]:
        return [encode_prompt(tokenizer, messages)]

    # vLLM applies the same chat template
    return await _generate(True, body, sp, instruction, encode, {"messages": messages}, tenant, inference)


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
