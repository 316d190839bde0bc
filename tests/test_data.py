"""Datasets: the three formats, one test per validation error (file, line, field), tokenisation with
prompt masking, collation, resumable batch order and the reservoir replay buffer."""

from __future__ import annotations

import json
from itertools import islice

import pytest

from cltune.data import (
    Example,
    ReplayBuffer,
    batches,
    collate,
    count_jsonl,
    encode_prompt,
    inspect_dataset,
    read_jsonl,
    split_holdout,
    tokenize,
)
from cltune.errors import DataError
from cltune.models import build_tiny_llama

CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
ALPACA = {"instruction": "add", "input": "2 and 2", "output": "4"}
PC = {"prompt": "2+2?", "completion": "4"}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_llama()[1]


def data_error(path, **kw) -> DataError:
    with pytest.raises(DataError) as ei:
        read_jsonl(path, **kw)
    return ei.value


def assert_where(err: DataError, path, line: int | None, field: str | None) -> None:
    assert err.details["file"] == str(path)
    assert err.details["line"] == line
    assert err.details["field"] == field
    if line is not None:  # the message says where too, for people reading a log
        assert f"{path}:{line}" in err.message


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(("record", "fmt"), [(CHAT, "chat"), (ALPACA, "alpaca"), (PC, "prompt_completion")])
def test_each_format_is_detected_and_parsed(write_jsonl, record, fmt):
    path = write_jsonl([record, record])
    got, examples = read_jsonl(path)
    assert got == fmt and len(examples) == 2
    ex = examples[0]
    assert ex.answer == "4" and ex.line == 1 and examples[1].line == 2
    assert ex.messages[-1]["role"] == "user"


def test_chat_keeps_the_system_message_and_alpaca_joins_the_input(write_jsonl):
    _, [chat] = read_jsonl(write_jsonl([CHAT], "c.jsonl"))
    assert chat.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"})
    assert chat.instruction == "2+2?"
    _, [alp] = read_jsonl(write_jsonl([ALPACA], "a.jsonl"))
    assert alp.messages == ({"role": "user", "content": "add\n\n2 and 2"},)


def test_blank_lines_are_skipped_and_line_numbers_stay_true(write_jsonl):
    path = write_jsonl([PC, "", "   ", {"prompt": "x", "completion": ""}])
    assert_where(data_error(path), path, 4, "completion")


def test_inspect_dataset_summarises_format_count_and_hash(write_jsonl):
    path = write_jsonl([PC, PC, PC])
    info = inspect_dataset(path)
    assert (info.format, info.examples, len(info.sha256)) == ("prompt_completion", 3, 64)


# ---------------------------------------------------------------- one test per error (issue 2, item 4)


def test_invalid_json_names_file_and_line(write_jsonl):
    path = write_jsonl([PC, '{"prompt": "x", "completion": '])
    err = data_error(path)
    assert_where(err, path, 2, None)
    assert "invalid JSON" in err.message


def test_missing_answer_names_the_answer_field(write_jsonl):
    path = write_jsonl([ALPACA, {"instruction": "add", "input": "1 and 1"}])
    err = data_error(path)
    assert_where(err, path, 2, "output")
    assert "missing" in err.message


def test_missing_completion_names_the_completion_field(write_jsonl):
    path = write_jsonl([{"prompt": "x"}])
    assert_where(data_error(path), path, 1, "completion")


def test_chat_without_a_final_assistant_answer_is_rejected(write_jsonl):
    path = write_jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]}])
    assert_where(data_error(path), path, 1, "messages[1].role")


@pytest.mark.parametrize(
    ("good", "record", "field"),
    [
        (PC, {"prompt": "x", "completion": "   "}, "completion"),
        (ALPACA, {"instruction": "x", "output": ""}, "output"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            "messages[1].content",
        ),
    ],
)
def test_empty_answer_names_the_answer_field(write_jsonl, good, record, field):
    path = write_jsonl([good, record])
    err = data_error(path)
    assert_where(err, path, 2, field)
    assert "empty" in err.message


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"prompt": 3, "completion": "4"}, "prompt"),
        ({"instruction": "x", "input": ["a"], "output": "4"}, "input"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}, "4"]}, "messages[1]"),
        (
            {"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "4"}]},
            "messages[0].content",
        ),
        (
            {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "4"}]},
            "messages[0].role",
        ),
    ],
)
def test_wrong_types_name_the_field(write_jsonl, record, field):
    path = write_jsonl([record])
    assert_where(data_error(path), path, 1, field)


def test_a_line_that_is_not_an_object_is_rejected(write_jsonl):
    path = write_jsonl([PC, "[1, 2]"])
    err = data_error(path)
    assert_where(err, path, 2, None)
    assert "JSON object" in err.message


def test_non_utf8_names_file_and_line(write_jsonl):
    path = write_jsonl([PC, b'{"prompt": "caf\xe9", "completion": "x"}'])
    err = data_error(path)
    assert_where(err, path, 2, None)
    assert "UTF-8" in err.message


def test_line_over_the_size_limit_is_rejected(write_jsonl):
    path = write_jsonl([PC, {"prompt": "x" * 500, "completion": "y"}, PC])
    err = data_error(path, max_line_bytes=200)
    assert_where(err, path, 2, None)
    assert "limit is 200" in err.message


def test_empty_file_is_rejected(write_jsonl):
    path = write_jsonl([])
    err = data_error(path)
    assert_where(err, path, None, None)
    assert "no records" in err.message


def test_file_of_blank_lines_is_rejected_as_empty(write_jsonl):
    path = write_jsonl(["", "  "])
    assert "no records" in data_error(path).message


def test_mixed_formats_are_rejected(write_jsonl):
    path = write_jsonl([PC, PC, ALPACA])
    err = data_error(path)
    assert_where(err, path, 3, None)
    assert "mixes formats" in err.message and "line 1 is prompt_completion" in err.message


def test_unknown_format_lists_the_expected_formats(write_jsonl):
    path = write_jsonl([{"question": "x", "answer": "y"}])
    err = data_error(path)
    assert_where(err, path, 1, None)
    assert "unknown record format" in err.message
    for key in ("messages", "instruction", "prompt"):
        assert key in err.message


def test_every_problem_is_listed_not_only_the_first(write_jsonl):
    path = write_jsonl(["{bad", PC, {"prompt": "", "completion": "y"}, b"\xff"])
    err = data_error(path)
    assert [(e["line"], e["field"]) for e in err.details["errors"]] == [(1, None), (3, "prompt"), (4, None)]
    assert "2 more problems" in err.message


def test_missing_file_is_a_data_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert_where(data_error(path), path, None, None)


# ---------------------------------------------------------------- split, tokenise, collate


def test_holdout_split_is_deterministic_and_disjoint():
    ex = [Example(({"role": "user", "content": str(i)},), str(i), i + 1) for i in range(10)]
    train, held = split_holdout(ex, 0.2, seed=3)
    assert len(held) == 2 and len(train) == 8
    assert {e.line for e in train} | {e.line for e in held} == set(range(1, 11))
    assert split_holdout(ex, 0.2, seed=3) == (train, held)


def test_prompt_tokens_are_masked_and_answer_plus_eos_labelled(tok):
    ex = Example(({"role": "user", "content": "2+2?"},), "4 ok", 1)
    [item], stats = tokenize([ex], tok, max_len=128)
    prompt = encode_prompt(tok, ex.messages)
    answer = tok("4 ok", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert item["input_ids"] == prompt + answer
    assert item["labels"] == [-100] * len(prompt) + answer
    assert (stats.examples, stats.truncated, stats.answer_tokens) == (1, 0, len(answer))


def test_truncation_is_counted_and_keeps_the_answer_end(tok):
    short = Example(({"role": "user", "content": "hi"},), "yo", 1)
    long = Example(({"role": "user", "content": "a long question " * 10},), "the answer", 2)
    items, stats = tokenize([short, long], tok, max_len=32)
    assert stats.truncated == 1 and stats.examples == 2
    assert len(items[1]["input_ids"]) == 32 and items[1]["input_ids"][-1] == tok.eos_token_id
    # the answer survived whole: its labels are the last len(answer) tokens
    answer = tok("the answer", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [x for x in items[1]["labels"] if x != -100] == answer


def test_collate_pads_labels_with_minus_100_and_masks_padding():
    items = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "index": 0},
        {"input_ids": [8], "labels": [8], "index": 1},
    ]
    b = collate(items, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["index"].tolist() == [0, 1]


@pytest.mark.parametrize("start", [0, 1, 3, 7, 12])
def test_batches_resume_exactly_at_start(start):
    full = list(islice(batches(23, 4, seed=5), start + 10))
    assert list(islice(batches(23, 4, seed=5, start=start), 10)) == full[start:]


def test_batches_cover_each_epoch_without_repeats():
    first_epoch = list(islice(batches(12, 4, seed=1), 3))
    assert sorted(i for b in first_epoch for i in b) == list(range(12))
    assert list(islice(batches(12, 4, seed=2), 3)) != first_epoch  # the seed matters


def test_batches_smaller_than_one_batch_still_yield():
    assert sorted(next(batches(3, 8, seed=0))) == [0, 1, 2]


# ---------------------------------------------------------------- replay buffer


def items(n: int, offset: int = 0) -> list[dict]:
    return [{"input_ids": [i + offset], "labels": [i + offset]} for i in range(n)]


def test_replay_buffer_never_exceeds_capacity():
    buf = ReplayBuffer(capacity=5, seed=0)
    for chunk in range(10):
        buf.add(items(3, offset=3 * chunk))
        assert len(buf) == min(5, 3 * (chunk + 1))
    assert buf.n_seen == 30


def test_reservoir_inclusion_probability_is_capacity_over_seen():
    capacity, n, trials = 10, 50, 1500
    counts = [0] * n
    for seed in range(trials):
        buf = ReplayBuffer(capacity=capacity, seed=seed)
        for chunk in range(5):  # added across several "tasks"
            buf.add(items(10, offset=10 * chunk))
        for it in buf.items:
            counts[it["input_ids"][0]] += 1
    freq = [c / trials for c in counts]
    # Expected 0.2 each; the binomial sd is 0.0103, so 0.05 is ~5 sd per item.
    assert all(abs(f - capacity / n) < 0.05 for f in freq), freq
    # early and late examples are equally likely (a FIFO or "keep first" buffer fails this)
    assert abs(sum(freq[:10]) / 10 - sum(freq[-10:]) / 10) < 0.03


def test_replay_buffer_state_round_trip_continues_identically():
    buf = ReplayBuffer(capacity=4, seed=7)
    buf.add(items(9))
    state = json.loads(json.dumps(buf.state_dict()))  # JSON-safe: stored with method state
    twin = ReplayBuffer.from_state(state)
    assert twin.items == buf.items and twin.n_seen == buf.n_seen
    buf.add(items(6, offset=100))
    twin.add(items(6, offset=100))
    assert twin.items == buf.items
    assert twin.sample(5) == buf.sample(5)


def test_count_jsonl_validates_like_read_jsonl_without_keeping_records(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(5)))
    assert count_jsonl(good) == ("prompt_completion", 5) == (read_jsonl(good)[0], len(read_jsonl(good)[1]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q"}\n')
    with pytest.raises(DataError) as counted:
        count_jsonl(bad)
    with pytest.raises(DataError) as read:
        read_jsonl(bad)
    assert counted.value.details == read.value.details and counted.value.details["line"] == 2
