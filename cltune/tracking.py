"""TensorBoard event files for a run (`train.tensorboard: true`): watch training in the tool people know.

Only files are written (run_dir/tensorboard/), no server: `tensorboard --logdir runs/<run>/tensorboard`
or the job API's archive (GET /v1/jobs/{id}/tensorboard). Needs tensorboardX (`pip install
'cltune[tensorboard]'`), a small package without TensorFlow.

Scalars, on one step axis across the whole run (each task continues where the previous one ended):
  train/loss, train/lr, train/tokens_per_s, train/<loss part>   every logged step
  validation/<task>                                             each `steps: auto` validation
  score/<task>                                                  each `eval_every` evaluation
  R/<task>                                                      every task's score after each task
  general/<probe>                                               general-ability retention
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cltune.errors import MissingDependencyError
from cltune.train import Callbacks, Progress

LOG_DIR = "tensorboard"


class TensorBoardLog:
    def __init__(self, directory: Path, tasks: list[str]) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise MissingDependencyError(
                "train.tensorboard needs tensorboardX: pip install 'cltune[tensorboard]' (or set "
                "train.tensorboard: false)"
            ) from None
        self.writer = SummaryWriter(str(directory), flush_secs=10)
        self.tasks = tasks
        self.last = 0  # the latest step written: scores after a task are plotted there

    def tee(self, cb: Callbacks, offset: Callable[[], int]) -> Callbacks:
        """`cb` with every progress report and logged metric also written here; `offset()` is the
        number of steps trained by the tasks before the current one."""
        progress, log = cb.on_progress, cb.log

        def on_progress(p: Progress) -> None:
            self.progress(p, offset() + p.step)
            progress(p)

        def on_log(message: str, **data: Any) -> None:
            self.logged(data, offset())
            if log is not None:
                log(message, **data)

        return dataclasses.replace(cb, on_progress=on_progress, log=on_log)

    def progress(self, p: Progress, step: int) -> None:
        scalars = {"loss": p.loss, "lr": p.lr, "tokens_per_s": p.tokens_per_s, **p.parts}
        self.last = max(self.last, step)
        for k, v in scalars.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def logged(self, data: dict[str, Any], offset: int) -> None:
        """The metrics inside a run's log lines (cltune.continual / cltune.train `_log` data)."""
        step = offset + int(data.get("step") or 0)
        if "validation" in data:
            self.writer.add_scalar(f"validation/{data['task']}", data["validation"], step)
        if "score" in data and data.get("task"):
            self.writer.add_scalar(f"score/{data['task']}", data["score"], step)
        if "row" in data:
            for name, v in zip(self.tasks, data["row"], strict=True):
                self.writer.add_scalar(f"R/{name}", v, self.last)
        for k, v in (data.get("general") or {}).items():
            self.writer.add_scalar(f"general/{k}", v, self.last)
        if "row" in data or "general" in data:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
