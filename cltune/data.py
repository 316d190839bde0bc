"""Datasets: JSONL formats, validation with line numbers, tokenisation with prompt masking,
collation, and the replay buffer.

Accepted formats (detected per file; one file holds one format):
  chat               {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                     the last message is the assistant answer that is trained on
  alpaca             {"instruction": str, "input": str (optional), "output": str}
  prompt_completion  {"prompt": str, "completion": str}
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from cltune.errors import DataError

MAX_LINE_BYTES = 1 << 20  # one JSONL record; larger lines are rejected with their line number
MAX_REPORTED_ERRORS = 50
ROLES = ("system", "user", "assistant")
FORMATS = {
    "chat": "{'messages': [{'role': 'user', 'content': ...}, {'role': 'assistant', 'content': ...}]}",
    "alpaca": "{'instruction': ..., 'input': ... (optional), 'output': ...}",
    "prompt_completion": "{'prompt': ..., 'completion': ...}",
}


@dataclass(frozen=True)
class Example:
    messages: tuple[dict[str, str], ...]  # the prompt as chat messages (no final assistant turn)
    answer: str  # the text to learn (or to forget)
    line: int = 0  # 1-based source line, for error messages

    @property
    def instruction(self) -> str:
        """The last user message: what routers and codebooks compare."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


@dataclass
class DatasetInfo:
    path: str
    format: str
    examples: int
    sha256: str


# ---------------------------------------------------------------- parsing + validation


def _detect(record: dict[str, Any]) -> str | None:
    # One distinguishing key suffices, so a record missing its answer is reported as
    # "field 'output' is missing" rather than as an unknown format.
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    return None


def _text(record: dict[str, Any], key: str, *, required: bool, nonempty: bool) -> str:
    v = record.get(key)
    if v is None:
        if required:
            raise ValueError(key, "is missing")
        return ""
    if not isinstance(v, str):
        raise ValueError(key, f"must be a string, got {type(v).__name__}")
    _unicode(v, key)
    if nonempty and not v.strip():
        raise ValueError(key, "is empty")
    return v


def _unicode(v: str, key: str) -> None:
    """Refuse a lone surrogate (a JSON escape such as \\ud800 without its pair): it is no character,
    and the tokenizer cannot encode it."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            key, f"holds a lone surrogate ({v[e.start]!r} at character {e.start}); not valid Unicode text"
        ) from None


def _parse(record: dict[str, Any], fmt: str, line: int) -> Example:
    if fmt == "alpaca":
        inst = _text(record, "instruction", required=True, nonempty=True)
        extra = _text(record, "input", required=False, nonempty=False)
        prompt = f"{inst}\n\n{extra}" if extra.strip() else inst
        return Example(
            ({"role": "user", "content": prompt},),
            _text(record, "output", required=True, nonempty=True),
            line,
        )
    if fmt == "prompt_completion":
        prompt = _text(record, "prompt", required=True, nonempty=True)
        answer = _text(record, "completion", required=True, nonempty=True)
        return Example(({"role": "user", "content": prompt},), answer, line)
    msgs = record["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise ValueError(
            "messages", "must be a list of at least 2 messages (a prompt and the assistant answer)"
        )
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]", f"must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content", f"must be a string, got {type(content).__name__}")
        _unicode(content, f"messages[{i}].content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise ValueError(f"messages[{len(out) - 1}].role", "the last message must be the assistant answer")
    if not out[-1]["content"].strip():
        raise ValueError(f"messages[{len(out) - 1}].content", "the answer is empty")
    if not any(m["role"] == "user" for m in out[:-1]):
        raise ValueError("messages", "needs a user message before the answer")
    return Example(tuple(out[:-1]), out[-1]["content"], line)


def read_jsonl(
    path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES, name: str | None = None
) -> tuple[str, list[Example]]:
    """Read and validate a JSONL dataset. Returns (format, examples).

    Every record is checked; all problems (up to 50) are reported together.

    Raises:
        DataError: naming the file, the 1-based line and the field of the first problem; the
            full list is in `details["errors"]`.
    """
    fmt, examples, _ = _scan(path, max_line_bytes, name, keep=True)
    return fmt, examples


def count_jsonl(
    path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES, name: str | None = None
) -> tuple[str, int]:
    """Validate a JSONL dataset exactly as read_jsonl does, keeping no record in memory (uploads of
    100 MB would otherwise cost several times that as Python objects). Returns (format, records)."""
    fmt, _, count = _scan(path, max_line_bytes, name, keep=False)
    return fmt, count


def _scan(
    path: str | Path, max_line_bytes: int, name: str | None, *, keep: bool
) -> tuple[str, list[Example], int]:
    path = Path(path)
    count = 0
    shown = name or str(path)
    errors: list[dict[str, Any]] = []
    examples: list[Example] = []
    fmt: str | None = None
    fmt_line = 0

    def fail(line: int, fld: str | None, msg: str) -> None:
        errors.append({"line": line, "field": fld, "message": msg})

    try:
        fh = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot open: {e.strerror}", file=shown) from e
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
            if len(raw) > max_line_bytes:
                fail(lineno, None, f"line is {len(raw)} bytes; the limit is {max_line_bytes}")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                fail(lineno, None, f"not valid UTF-8 (byte {e.start}); save the file as UTF-8")
                continue
            if not text.strip():
                continue  # blank lines separate nothing and hold no record
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                fail(lineno, None, f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            except RecursionError:
                fail(lineno, None, "invalid JSON: nested too deeply; a record is one flat JSON object")
                continue
            if not isinstance(record, dict):
                fail(lineno, None, f"each line must be a JSON object, got {type(record).__name__}")
                continue
            kind = _detect(record)
            if kind is None:
                keys = ", ".join(sorted(record)) or "none"
                fail(
                    lineno,
                    None,
                    f"unknown record format (keys: {keys}); expected one of: {'; '.join(FORMATS.values())}",
                )
                continue
            if fmt is None:
                fmt, fmt_line = kind, lineno
            elif kind != fmt:
                fail(lineno, None, f"file mixes formats: line {fmt_line} is {fmt}, this line is {kind}")
                continue
            try:
                example = _parse(record, kind, lineno)
                count += 1
                if keep:
                    examples.append(example)
            except ValueError as e:
                fld, msg = e.args if len(e.args) == 2 else (None, str(e))
                fail(lineno, fld, msg)
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise DataError(
            first["message"] + more, file=shown, line=first["line"], field=first["field"], errors=errors
        )
    if not count:
        raise DataError("the file holds no records; expected one JSON object per line", file=shown)
    assert fmt is not None
    return fmt, examples, count


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inspect_dataset(
    path: str | Path, *, name: str | None = None, max_line_bytes: int = MAX_LINE_BYTES
) -> DatasetInfo:
    """Validate a file and summarise it (format, record count, sha256)."""
    fmt, ex = read_jsonl(path, max_line_bytes=max_line_bytes, name=name)
    return DatasetInfo(str(path), fmt, len(ex), file_sha256(path))


def split_holdout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministically split into (train, held-out); both keep at least one example."""
    if len(examples) < 2:
        raise ValueError("need at least 2 examples to hold some out for evaluation")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [examples[i] for i in train], [examples[i] for i in held]


# ---------------------------------------------------------------- tokenisation


@dataclass
class TokenStats:
    examples: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    truncated: int = 0  # examples cut to max_len (prompt cut from the left first, then the answer)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def prompt_text(tokenizer: Any, messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> str:
    """The prompt as the model sees it at generation time (chat template + generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return cast(str, text)  # tokenize=False: the rendered prompt
    turns = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    return turns + "### Assistant:\n"


def encode_prompt(tokenizer: Any, messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> list[int]:
    ids = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    return cast(list[int], ids)  # one unbatched text: a flat list of token ids


def tokenize(
    examples: list[Example], tokenizer: Any, max_len: int
) -> tuple[list[dict[str, Any]], TokenStats]:
    """Turn examples into {input_ids, labels, index} with prompt tokens labelled -100.

    The answer ends with the tokenizer's EOS so the model learns to stop.
    """
    stats = TokenStats()
    eos = tokenizer.eos_token_id
    out = []
    for i, ex in enumerate(examples):
        prompt = encode_prompt(tokenizer, ex.messages)
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [eos]
        if len(prompt) + len(answer) > max_len:
            stats.truncated += 1
            keep_prompt = max(min(len(prompt), max_len // 2), max_len - len(answer))
            prompt = prompt[len(prompt) - keep_prompt :]
            answer = answer[: max_len - len(prompt)]
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer, "index": i})
        stats.examples += 1
        stats.tokens += len(prompt) + len(answer)
        stats.answer_tokens += len(answer)
    return out, stats


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch: labels and padding positions get -100, attention_mask 0."""
    width = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        ids[row, :n] = torch.tensor(x["input_ids"])
        labels[row, :n] = torch.tensor(x["labels"])
        mask[row, :n] = 1
    index = torch.tensor([x.get("index", -1) for x in items], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": index}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for batched generation. Returns (input_ids [B, T], attention_mask [B, T])."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def batches(n: int, batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Yield lists of example indices forever: a fresh seeded permutation each epoch.

    `start` skips that many batches, so a resumed run sees exactly the batches it would have seen.
    """
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, offset = divmod(start, per_epoch)
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        for b in range(offset, per_epoch):
            chunk = perm[b * batch_size : (b + 1) * batch_size]
            yield chunk if chunk else perm[:batch_size]
        epoch, offset = epoch + 1, 0


# ---------------------------------------------------------------- replay buffer


@dataclass
class ReplayBuffer:
    """Reservoir sample of tokenised examples across tasks (kept on CPU as lists of ints).

    After n_seen additions each example is held with probability capacity / n_seen.
    """

    capacity: int
    seed: int = 0
    items: list[dict[str, Any]] = field(default_factory=list)
    n_seen: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, examples: list[dict[str, Any]]) -> None:
        for ex in examples:
            self.n_seen += 1
            kept = {"input_ids": list(ex["input_ids"]), "labels": list(ex["labels"])}
            if len(self.items) < self.capacity:
                self.items.append(kept)
            else:
                j = self._rng.randrange(self.n_seen)
                if j < self.capacity:
                    self.items[j] = kept

    def sample(self, k: int) -> list[dict[str, Any]]:
        return [self.items[self._rng.randrange(len(self.items))] for _ in range(k)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "seed": self.seed,
            "items": self.items,
            "n_seen": self.n_seen,
            "rng": self._rng.getstate(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ReplayBuffer:
        buf = cls(state["capacity"], state["seed"], list(state["items"]), state["n_seen"])
        rng = state["rng"]
        buf._rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        return buf
