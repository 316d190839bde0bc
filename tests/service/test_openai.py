"""The OpenAI-compatible endpoint, driven by the official `openai` client against the app served by
uvicorn on a loopback port: completions, chat, streaming, models, routing headers, errors, tenancy."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from cltune.registry import Registry
from service.api.app import create_app
from service.settings import Settings

from .api_support import ADMIN, make_adapters, new_tenant, serving

CODEBOOKS = {
    "capitals": [
        f"What is the capital of {c}?" for c in ("France", "Chile", "Spain", "Japan", "Kenya", "Peru")
    ],
    "french": [f"Write the number {n} in French words." for n in (3, 17, 42, 99, 250, 731)],
}


@dataclass
class Served:
    url: str
    key: str  # tenant A: has the adapters
    other_key: str  # tenant B: has none
    settings: Settings


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("openai")
    settings = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp / 'api.db'}",
        admin_key=ADMIN,
        engine_model="tiny-llama",
        engine_device="cpu",
        engine_max_tokens=64,
        engine_max_wait_ms=20,
    )
    app = create_app(settings)
    with TestClient(app) as admin:
        keys = [new_tenant(admin, name) for name in ("alpha", "beta")]
    make_adapters(Registry(settings.adapters_dir(keys[0][0])), ["capitals", "french"], codebooks=CODEBOOKS)
    with serving(app) as url:
        yield Served(f"{url}/v1", keys[0][1], keys[1][1], settings)


def client(served: Served, other: bool = False) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=served.url, api_key=served.other_key if other else served.key, max_retries=0
    )


def test_models_lists_base_auto_and_only_the_callers_adapters(served: Served) -> None:
    models = {m.id: m for m in client(served).models.list()}
    assert {"base", "auto", "capitals", "capitals@1", "french", "french@1"} <= set(models)
    assert {m.id for m in client(served, other=True).models.list()} == {"base", "auto"}
    mine, base = models["capitals@1"], models["base"]
    assert mine.owned_by not in ("cltune", "") and mine.owned_by == models["french"].owned_by  # the tenant
    assert base.owned_by == "cltune" and mine.model_extra["base_model"] == base.model_extra["base_model"]
    assert mine.created > 0


def test_completion_names_the_adapter_and_counts_tokens(served: Served) -> None:
    raw = client(served).completions.with_raw_response.create(
        model="capitals", prompt="hello", max_tokens=8, temperature=0
    )
    out = raw.parse()
    assert raw.headers["x-cltune-adapter"] == "capitals@1" and out.model == "capitals@1"
    assert out.usage is not None and out.usage.prompt_tokens == 5
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.choices[0].finish_reason in ("stop", "length")
    base = client(served).completions.create(model="base", prompt="hello", max_tokens=8, temperature=0)
    assert base.model == "base" and base.choices[0].text != out.choices[0].text


def test_chat_stream_sends_the_same_text_as_the_whole_answer(served: Served) -> None:
    c = client(served)
    msgs = [{"role": "user", "content": "Say something."}]
    whole = c.chat.completions.create(model="french@1", messages=msgs, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    chunks = list(
        c.chat.completions.create(
            model="french@1",
            messages=msgs,
            max_tokens=12,
            temperature=0,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert whole.model == "french@1" and whole.choices[0].message.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )  # type: ignore[union-attr]


def test_auto_routes_by_instruction_and_reports_the_score(served: Served) -> None:
    c = client(served)
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is the capital of Italy?"}], max_tokens=4
    )
    assert raw.headers["x-cltune-adapter"] == "capitals@1" and raw.parse().model == "capitals@1"
    assert float(raw.headers["x-cltune-route-score"]) >= 0.2
    raw = c.completions.with_raw_response.create(
        model="auto", prompt="Write the number 8 in French words.", max_tokens=4
    )
    assert raw.headers["x-cltune-adapter"] == "french@1"
    raw = c.completions.with_raw_response.create(
        model="auto", prompt="Tell me a joke about cats.", max_tokens=4
    )
    assert (
        raw.headers["x-cltune-adapter"] == "base"
        and raw.headers["x-cltune-route-reason"] == "auto_below_threshold"
    )


def test_unknown_and_other_tenants_models_answer_404_in_openai_format(served: Served) -> None:
    for c, model in (
        (client(served), "nope"),
        (client(served), "capitals@7"),
        (client(served, other=True), "capitals"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model=model, prompt="hi", max_tokens=2)
        assert e.value.status_code == 404
        assert e.value.code == "model_not_found" and e.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": -1},
        {"max_tokens": 65},
        {"temperature": 2.5},
        {"top_p": 0},
        {"n": 0},
        {"n": 9},
        {"seed": 2**64, "temperature": 0.7},
        {"seed": -(2**63) - 1, "temperature": 0.7},
    ],
)
def test_bad_generation_parameters_answer_400(served: Served, params: dict[str, float]) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(served).completions.create(model="base", prompt="hi", **params)  # type: ignore[call-overload]
    assert e.value.status_code == 400 and e.value.param == next(iter(params))


def test_max_completion_tokens_0_answers_400_and_is_not_taken_as_unset(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as e:  # found by schemathesis: it fell back to max_tokens
        client(served).chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=0, max_tokens=4
        )
    assert e.value.status_code == 400 and e.value.param == "max_tokens"


def test_concurrent_clients_share_batches_and_get_their_own_answers(served: Served) -> None:
    prompts = [("capitals", "one"), ("french", "two"), ("base", "three"), ("capitals", "four")]
    alone = [
        client(served).completions.create(model=m, prompt=p, max_tokens=6, temperature=0).choices[0].text
        for m, p in prompts
    ]
    results: list[str] = [""] * len(prompts)

    def ask(i: int) -> None:
        m, p = prompts[i]
        results[i] = (
            client(served).completions.create(model=m, prompt=p, max_tokens=6, temperature=0).choices[0].text
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_an_out_of_range_seed_is_refused_and_fails_no_one_else(served: Served) -> None:
    c = client(served)
    msgs = [{"role": "user", "content": "Say something."}]
    alone = c.chat.completions.create(model="capitals", messages=msgs, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    results: list[object] = [None] * 4

    def ask(i: int) -> None:
        try:
            seed = {"seed": 2**64, "temperature": 0.7} if i == 1 else {"temperature": 0}
            results[i] = c.chat.completions.create(model="capitals", messages=msgs, max_tokens=6, **seed)  # type: ignore[arg-type, call-overload]
        except openai.APIStatusError as e:
            results[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = results[1]
    assert isinstance(bad, openai.BadRequestError) and bad.param == "seed", bad
    for i in (0, 2, 3):
        assert results[i].choices[0].message.content == alone.choices[0].message.content  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("chat/completions", {"messages": [{"role": "user", "content": "caf\ud800"}]}, "messages.0.content"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
            "messages.0.content",
        ),
        ("completions", {"prompt": ["ok", "x\ud800"]}, "prompt"),
        ("completions", {"prompt": "ok", "stop": ["\ud800"]}, "stop"),
    ],
)
def test_lone_surrogates_in_text_answer_400_naming_the_field(
    served: Served, path: str, body: dict, param: str
) -> None:
    r = httpx.post(
        f"{served.url}/{path}",
        content=json.dumps({"model": "base", "max_tokens": 2, **body}),  # ASCII escapes: "\\ud800"
        headers={"Authorization": f"Bearer {served.key}", "content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(param) and "surrogate" in err["message"]


CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "kind,extra,param",
    [
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ("chat", {"tool_choice": "required"}, "tool_choice"),
        ("chat", {"logprobs": True}, "logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 3}, "logprobs"),
        ("chat", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
        ("chat", {"logit_bias": {"50256": -100}}, "logit_bias"),
        ("completion", {"logprobs": 2}, "logprobs"),
        ("completion", {"echo": True}, "echo"),
        ("completion", {"best_of": 3}, "best_of"),
        ("completion", {"suffix": "end"}, "suffix"),
    ],
)
def test_unsupported_openai_fields_answer_400_naming_the_field(
    served: Served, kind: str, extra: dict, param: str
) -> None:
    c = client(served)
    with pytest.raises(openai.BadRequestError) as e:
        if kind == "chat":
            c.chat.completions.create(model="base", messages=CHAT, max_tokens=2, **extra)  # type: ignore[arg-type, call-overload]
        else:
            c.completions.create(model="base", prompt="hi", max_tokens=2, **extra)  # type: ignore[call-overload]
    assert e.value.status_code == 400 and e.value.param == param, e.value
    assert param in e.value.message and "not supported" in e.value.message


def test_unknown_fields_answer_400_and_neutral_values_are_accepted(served: Served) -> None:
    c = client(served)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="base", messages=CHAT, max_tokens=2, extra_body={"temprature": 0.1})  # type: ignore[arg-type]
    assert e.value.param == "temprature" and "unknown field" in e.value.message
    for msg, param in (
        ({"role": "user", "content": "hi", "tool_call_id": "x"}, "messages.0.tool_call_id"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            "messages.0.content.0",
        ),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="base", messages=[msg], max_tokens=2)  # type: ignore[list-item]
        assert e.value.param == param, e.value
    neutral = {"n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "user": "u1"}
    out = c.chat.completions.create(model="base", messages=CHAT, max_tokens=2, **neutral)  # type: ignore[arg-type, call-overload]
    assert out.choices[0].message.role == "assistant"


def test_n_choices_are_indexed_and_count_the_prompt_once(served: Served) -> None:
    c = client(served)
    one = c.completions.create(model="capitals", prompt="hello", max_tokens=6, temperature=0)
    three = c.completions.create(model="capitals", prompt="hello", max_tokens=6, temperature=0, n=3)
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    assert [ch.text for ch in three.choices] == [one.choices[0].text] * 3  # greedy: all equal
    assert one.usage is not None and three.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # OpenAI: the prompt once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    both = c.completions.create(model="base", prompt=["hello", "the cat"], max_tokens=4, temperature=0, n=2)
    assert [ch.index for ch in both.choices] == [0, 1, 2, 3]  # prompt i's choice j is i * n + j
    assert both.choices[0].text == both.choices[1].text and both.choices[2].text == both.choices[3].text
    # sampling with a seed: the same n answers again; choice 0 is the answer of n=1 with that seed
    kw = {"model": "french", "messages": CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 11}
    a = c.chat.completions.create(n=3, **kw)  # type: ignore[call-overload]
    b = c.chat.completions.create(n=3, **kw)  # type: ignore[call-overload]
    alone = c.chat.completions.create(**kw)  # type: ignore[call-overload]
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2] and a.model == "french@1"
    assert texts == [ch.message.content for ch in b.choices] and texts[0] == alone.choices[0].message.content


@pytest.mark.parametrize("chat", [True, False])
def test_n_choices_stream_with_their_index_and_equal_the_whole_answer(served: Served, chat: bool) -> None:
    c = client(served)
    kw: dict = {"model": "capitals@1", "max_tokens": 8, "temperature": 0.9, "seed": 5, "n": 3}
    if chat:
        kw["messages"] = [{"role": "user", "content": "Say something."}]
        create = c.chat.completions.create
    else:
        kw["prompt"] = "Say something."
        create = c.completions.create  # type: ignore[assignment]
    whole = create(**kw)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, finish = ["", "", ""], [None, None, None]
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += (choice.delta.content if chat else choice.text) or ""  # type: ignore[union-attr]
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [ch.message.content if chat else ch.text for ch in whole.choices]  # type: ignore[union-attr]
    assert finish == [ch.finish_reason for ch in whole.choices]
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


@pytest.mark.parametrize("n", [0, 9, 100])
@pytest.mark.parametrize("stream", [False, True])
def test_n_outside_1_to_8_answers_400_naming_the_bound(served: Served, n: int, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(served).chat.completions.create(model="base", messages=CHAT, max_tokens=2, n=n, stream=stream)  # type: ignore[arg-type, call-overload]
    assert e.value.status_code == 400 and e.value.param == "n" and e.value.code == "invalid_value"
    assert f"n={n} is outside 1-8" in e.value.message
