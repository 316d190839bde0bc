"""Pictures of a run: the R heatmap (with the general-ability columns) and the learning curves.

matplotlib is imported inside the functions with the Agg backend: no display is needed, and
importing cltune does not pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_heatmap(
    R: list[list[float]],
    tasks: list[str],
    path: str | Path,
    title: str = "R matrix",
    general: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """R (rows: after each task; columns: tasks) as a heatmap, and, when `general` is given
    ({probe: {kind, values}} from GeneralEval.summary), one column per probe coloured by retention
    against the base model (1.0 = kept) and labelled with the probe's own value."""
    from cltune.general import retention

    plt = _pyplot()
    general = {k: v for k, v in (general or {}).items() if v.get("values")}
    cols = [*tasks, *(f"{k}\n(vs base)" for k in general)]
    grid = [list(row) for row in R]
    labels = [[f"{v:.2f}" for v in row] for row in R]
    for info in general.values():
        vals = info["values"]
        for t in range(len(R)):
            v = vals[t] if t < len(vals) else float("nan")
            grid[t].append(min(1.0, retention(info["kind"], vals[0], v)) if t < len(vals) else float("nan"))
            labels[t].append(f"{v:.1f}" if info["kind"] == "ppl" else f"{v:.2f}")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.2 + 0.8 * len(R)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(R)), ["base"] + [f"after {t}" for t in tasks])
    ax.set_xlabel("evaluated on" + ("  |  general abilities: value, colour = retention" if general else ""))
    if general:
        ax.axvline(len(tasks) - 0.5, color="white", linewidth=3)
    for t, row in enumerate(grid):
        for i, v in enumerate(row):
            ax.text(i, t, labels[t][i], ha="center", va="center", color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_learning_curves(train: list[dict[str, Any]], path: str | Path) -> Path:
    """One panel per task: training loss per step and the validation value at each check, with the
    step whose adapters were kept marked (entries of a run's `train` list, see cltune/continual.py)."""
    plt = _pyplot()
    n = max(1, len(train))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    for ax, info in zip(axes[0], train, strict=False):
        hist = info.get("history") or []
        ax.plot(
            [h["step"] for h in hist],
            [h["loss"] for h in hist],
            color="tab:blue",
            alpha=0.6,
            label="train loss",
        )
        val = info.get("validation") or []
        if val:
            ax.plot(
                [v["step"] for v in val],
                [v["value"] for v in val],
                "o-",
                color="tab:orange",
                label=f"validation {info.get('validation_metric') or ''}".strip(),
            )
        if info.get("best_step"):
            ax.axvline(
                info["best_step"], color="tab:green", linestyle="--", label=f"kept: step {info['best_step']}"
            )
        ax.set_title(
            f"{info['task']} ({info['method']}): {info['steps']} steps, {info.get('stop_reason', '')}"
        )
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
