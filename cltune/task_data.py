"""One task's examples as a continual run uses them: read and validated before the model loads, split into
training, held-out evaluation and (with `steps: auto`) validation examples. Shared by the run
(cltune.continual) and the scoring of what is served (cltune.served)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cltune.config import TaskConfig, TrainConfig
from cltune.data import Example, file_sha256, read_jsonl, split_holdout


@dataclass
class TaskData:
    config: TaskConfig
    train: list[Example]
    eval: list[Example]
    retain: list[Example] | None
    sha256: dict[str, str]  # role -> file sha256
    val: list[Example] = field(default_factory=list)  # steps: auto; carved out of `train`


def read_task_data(
    task: TaskConfig, seed: int, unlearning: bool = False, train_cfg: TrainConfig | None = None
) -> TaskData:
    """Validate and split one task's files (no tokenizer needed: fails before the model loads).

    unlearning: `train` is a forget set; nothing is held out and, without an `eval` file, the task is
    scored on the forget set itself (lower is better).
    train_cfg with `steps: auto`: a validation split (val_fraction, at most val_max) is also carved
    out of the training examples, never out of the held-out evaluation set.
    """
    _, train = read_jsonl(task.train)
    sha = {"train": file_sha256(task.train)}
    if task.eval:
        _, held = read_jsonl(task.eval)
        sha["eval"] = file_sha256(task.eval)
    elif unlearning:
        held = list(train)
    else:
        train, held = split_holdout(train, task.eval_fraction, seed)
    retain = None
    if task.retain:
        _, retain = read_jsonl(task.retain)
        sha["retain"] = file_sha256(task.retain)
    val: list[Example] = []
    if train_cfg is not None and train_cfg.auto and not unlearning and len(train) >= 4:
        n_val = min(train_cfg.val_max, max(2, round(len(train) * train_cfg.val_fraction)))
        train, val = split_holdout(train, n_val / len(train), seed + 1)
    return TaskData(task, train, held[: task.max_eval], retain, sha, val)
