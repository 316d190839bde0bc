"""The vLLM inference backend (CLTUNE_ENGINE_BACKEND=vllm): cltune keeps auth, tenants, routing and the
OpenAI surface, and a running `vllm serve --enable-lora` (started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1,
on a host that sees cltune's adapter directories) generates.

A tenant's adapter version is loaded into vLLM on first use (POST /v1/load_lora_adapter) under a name no
other tenant, adapter or re-created version can produce (a hash of tenant, name, version and creation
time, see `lora_name`). At most `vllm_max_loras` stay loaded: the least recently used one that no request
is using is unloaded (POST /v1/unload_lora_adapter), as is every loaded version of a deleted adapter.
Completions and chat completions (JSON and SSE) are forwarded with cltune's sampling defaults made
explicit, and answered with `model` rewritten to the name the caller asked for. vLLM's errors keep their
4xx status in cltune's error shape; vLLM down or timing out is a 503, a vLLM 5xx a 502.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from cltune.models import base_fingerprint
from cltune.registry import AdapterRecord, Registry
from service.api.errors import ApiError
from service.inference.params import SamplingParams
from service.settings import Settings

log = logging.getLogger("cltune.vllm")

Key = tuple[str, str, int]  # (tenant, adapter name, version)


def lora_name(tenant: str, record: AdapterRecord) -> str:
    """vLLM's name for one adapter version of one tenant: readable, and unique through the hash (which
    also covers created_at, so a version re-created after a delete is a new name, never stale weights)."""
    h = hashlib.sha256(f"{tenant}\0{record.name}\0{record.version}\0{record.created_at}".encode())
    return f"cltune-{h.hexdigest()[:20]}-{record.name}-v{record.version}"


def _unreachable(url: str, e: Exception) -> ApiError:
    return ApiError(
        503,
        "service_unavailable",
        f"the vLLM server at {url} is not reachable ({type(e).__name__}: {e}); start it "
        "(`vllm serve --enable-lora`) or fix CLTUNE_VLLM_URL",
        code="backend_unavailable",
    )


def _upstream_error(status: int, body: bytes, names: dict[str, str] | None = None) -> ApiError:
    """vLLM's error answer in cltune's shape: 4xx keep their status (type invalid_request_error, vLLM's
    message with its adapter names replaced by cltune's, `names`), 5xx become 502."""
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else {}
        err = err if isinstance(err, dict) else {"message": str(err)}
    except ValueError:
        err = {"message": body.decode("utf-8", "replace")[:500]}
    message = str(err.get("message") or f"vLLM answered HTTP {status}")
    for internal, public in (names or {}).items():
        message = message.replace(internal, public)
    if status >= 500:
        return ApiError(502, "server_error", f"vLLM failed (HTTP {status}): {message}", code="backend_error")
    code = err.get("code") if isinstance(err.get("code"), str) else None
    return ApiError(status, "invalid_request_error", message, param=err.get("param"), code=code)


def payload(
    sp: SamplingParams, stream: bool, stream_options: dict[str, Any] | None, **fields: Any
) -> dict[str, Any]:
    """A vLLM request body with cltune's sampling made explicit (vLLM would otherwise take its own
    defaults, or the model's generation_config)."""
    body: dict[str, Any] = {
        **fields,
        "max_tokens": sp.max_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "stream": stream,
    }
    if sp.stop:
        body["stop"] = sp.stop
    if sp.seed is not None:
        body["seed"] = sp.seed
    if stream and stream_options:
        body["stream_options"] = stream_options
    return body


def _rewrite_event(event: bytes, served_by: str) -> bytes:
    """One SSE event (`data: {...}` lines) with its JSON's `model` set to `served_by`, ending in a blank
    line; other lines (comments, `[DONE]`, non-JSON) pass unchanged."""
    lines = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                data = json.loads(line[5:])
            except ValueError:
                data = None
            if isinstance(data, dict) and "model" in data:
                data["model"] = served_by
                line = b"data: " + json.dumps(data).encode()
        lines.append(line)
    return b"\n".join(lines) + b"\n\n"


class VLLMBackend:
    """A client of one vLLM server: adapter loading (LRU) and request forwarding. Thread-safe."""

    def __init__(self, settings: Settings, registry_for: Callable[[str], Registry]) -> None:
        if not settings.vllm_url:
            raise ApiError(
                503,
                "service_unavailable",
                "CLTUNE_ENGINE_BACKEND=vllm needs CLTUNE_VLLM_URL (e.g. http://127.0.0.1:8001)",
                code="backend_unavailable",
            )
        self.settings = settings
        self.url = settings.vllm_url.rstrip("/")
        self.registry_for = registry_for
        self.max_loras = settings.vllm_max_loras
        self._timeout = httpx.Timeout(settings.vllm_timeout_seconds, connect=5.0)
        self._sync = httpx.Client(base_url=self.url, timeout=self._timeout)
        self._async: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None
        self._lock = threading.Lock()  # the LRU below, and one load / unload at a time
        self._loaded: OrderedDict[str, Key] = OrderedDict()  # vLLM name -> key; oldest first
        self._in_use: dict[str, int] = {}
        self._base: str | None = settings.vllm_model
        self._fingerprint: str | None = None
        self.calls: list[tuple[str, str]] = []  # (action, vLLM name): loads and unloads, for tests

    # -- adapters

    def base_model(self) -> str:
        """The name vLLM serves the base model under: CLTUNE_VLLM_MODEL, or the first root model it lists."""
        if self._base is None:
            data = self._request("GET", "/v1/models").json().get("data", [])
            roots = [m["id"] for m in data if not m.get("parent")]
            if not roots:
                raise ApiError(503, "service_unavailable", "the vLLM server lists no base model")
            self._base = roots[0]
        return self._base

    def _check_base(self, record: AdapterRecord) -> None:
        if self._fingerprint is None:
            self._fingerprint = base_fingerprint(self.settings.engine_model, self.settings.models_dir)
        if record.base_fingerprint != self._fingerprint:
            raise ApiError(
                409,
                "conflict",
                f"adapter {record.ref} was trained on base {record.base_model!r} ({record.base_fingerprint}); "
                f"this server runs {self.settings.engine_model!r} ({self._fingerprint})",
                adapter=record.ref,
            )

    def acquire(self, tenant: str, record: AdapterRecord | None) -> str:
        """The vLLM model name for `record` (None: the base model), loading the adapter on first use.
        Blocking; pair with `release`. An acquired adapter is never unloaded by the LRU."""
        if record is None:
            return self.base_model()
        self._check_base(record)
        name = lora_name(tenant, record)
        with self._lock:
            if name not in self._loaded:
                path = self.registry_for(tenant).path(record.name, record.version)
                self._load(name, str(path.resolve()))
                self._loaded[name] = (tenant, record.name, record.version)
            self._loaded.move_to_end(name)
            self._in_use[name] = self._in_use.get(name, 0) + 1
            self._evict()
        return name

    def release(self, name: str) -> None:
        with self._lock:
            if name in self._in_use:
                self._in_use[name] -= 1
                if self._in_use[name] <= 0:
                    del self._in_use[name]
                self._evict()

    def forget(self, name: str) -> None:
        """`name` is no longer loaded in vLLM (it answered 404 for it: restarted?): load it again next time."""
        with self._lock:
            self._loaded.pop(name, None)

    def drop(self, tenant: str, adapter: str, versions: list[int]) -> None:
        """Unload every loaded version in `versions` of `tenant`'s `adapter` (it was deleted)."""
        with self._lock:
            for name, key in list(self._loaded.items()):
                if key[0] == tenant and key[1] == adapter and key[2] in versions:
                    del self._loaded[name]
                    self._unload(name)

    def loaded(self) -> list[str]:
        """vLLM names of the loaded adapters, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def _evict(self) -> None:  # under self._lock
        while len(self._loaded) > self.max_loras:
            victim = next((n for n in self._loaded if n not in self._in_use), None)
            if victim is None:  # every one serves a request: unload when they finish
                return
            del self._loaded[victim]
            self._unload(victim)

    def _load(self, name: str, path: str) -> None:
        r = self._request(
            "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, check=False
        )
        if r.status_code >= 400 and "already" not in r.text:  # loaded before cltune restarted: fine
            raise _upstream_error(r.status_code, r.content)
        self.calls.append(("load", name))

    def _unload(self, name: str) -> None:
        """Best effort: a failure is logged (vLLM may have been restarted and forgotten it already)."""
        try:
            r = self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name}, check=False)
            if r.status_code >= 400:
                log.warning("vLLM would not unload %s: HTTP %s %s", name, r.status_code, r.text[:200])
        except ApiError as e:
            log.warning("vLLM would not unload %s: %s", name, e.message)
        self.calls.append(("unload", name))

    def _request(self, method: str, path: str, check: bool = True, **kw: Any) -> httpx.Response:
        try:
            r = self._sync.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise _unreachable(self.url, e) from e
        if check and r.status_code >= 400:
            raise _upstream_error(r.status_code, r.content)
        return r

    # -- requests

    def _client(self) -> httpx.AsyncClient:
        """An async client of the running event loop (a client is bound to the loop it was made on)."""
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            self._async = (loop, httpx.AsyncClient(base_url=self.url, timeout=self._timeout))
        return self._async[1]

    async def forward(
        self,
        path: str,
        body: dict[str, Any],
        tenant: str,
        record: AdapterRecord | None,
        served_by: str,
        headers: dict[str, str],
    ) -> Response:
        """POST `body` to vLLM's `path` as `record` (None: base) and answer as cltune: JSON or SSE."""
        for attempt in (0, 1):
            target = await run_in_threadpool(self.acquire, tenant, record)
            client = self._client()
            req = client.build_request("POST", path, json={**body, "model": target})
            try:
                upstream = await client.send(req, stream=True)
            except httpx.HTTPError as e:
                await run_in_threadpool(self.release, target)
                raise _unreachable(self.url, e) from e
            if upstream.status_code == 404 and record is not None and attempt == 0:
                await upstream.aclose()  # vLLM lost the adapter (a restart): load it again, once
                await run_in_threadpool(self.release, target)
                self.forget(target)
                continue
            if upstream.status_code >= 400 or not body.get("stream"):
                try:
                    content = await upstream.aread()
                except httpx.HTTPError as e:
                    raise _unreachable(self.url, e) from e
                finally:
                    await upstream.aclose()
                    await run_in_threadpool(self.release, target)
                if upstream.status_code >= 400:
                    raise _upstream_error(upstream.status_code, content, {target: served_by})
                data = json.loads(content)
                data["model"] = served_by
                return JSONResponse(data, headers=headers)
            return StreamingResponse(
                self._relay(upstream, target, served_by), media_type="text/event-stream", headers=headers
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _relay(self, upstream: httpx.Response, target: str, served_by: str) -> AsyncIterator[bytes]:
        """vLLM's SSE events with `model` rewritten; closing this (client gone) closes the upstream stream,
        which aborts the request in vLLM.

        The stream is relayed as it arrives, whole events at a time (a chunk's tail without its closing
        blank line waits for the next chunk). `model` is rewritten by replacing the bytes
        `"model":"<target>"`, not by a JSON round-trip per token: inside a JSON string a quote is escaped,
        so the pattern can only be an event's own `model` field. Events spelled otherwise (a space after
        the colon) are parsed and rewritten one by one."""
        compact = f'"model":{json.dumps(target)}'.encode()
        public = f'"model":{json.dumps(served_by)}'.encode()
        pending = b""
        try:
            async for chunk in upstream.aiter_bytes():
                pending += chunk.replace(b"\r\n", b"\n")
                cut = pending.rfind(b"\n\n") + 2
                if cut < 2:
                    continue
                events, pending = pending[:cut], pending[cut:]
                if compact in events:
                    yield events.replace(compact, public)
                else:
                    yield b"".join(_rewrite_event(e, served_by) for e in events.split(b"\n\n") if e)
            if pending.strip():
                yield _rewrite_event(pending.strip(), served_by)
        except httpx.HTTPError as e:  # headers are sent: report the failure inside the stream
            err = {"type": "server_error", "message": f"the vLLM stream broke: {type(e).__name__}: {e}"}
            yield f"data: {json.dumps({'error': err})}\n\n".encode()
        finally:
            await upstream.aclose()
            await run_in_threadpool(self.release, target)

    async def aclose(self) -> None:
        self._sync.close()
        if self._async is not None and self._async[0] is asyncio.get_running_loop():
            await self._async[1].aclose()
