"""The demo's PNG: training loss and zero-shot top-1 per language over training (matplotlib, Agg backend)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

ACCURACY_KEYS = ("en/top1", "zh/top1", "retrieval/t2i_R@1")


def _eval_series(history: Mapping[str, Any]) -> tuple[list[float], dict[str, list[float]]]:
    """(eval iterations, {metric: values}) from history["eval"]: the metrics file's per-evaluation records."""
    records = history.get("eval", [])
    iterations = [r["iteration"] for r in records]
    series = {k: [r.get(k, float("nan")) for r in records] for k in ACCURACY_KEYS if any(k in r for r in records)}
    return iterations, series


def plot_training_curves(history: Mapping[str, Any], path: str, chance: Optional[float] = 10.0) -> str:
    """Writes a small two-panel PNG (loss | accuracy in percent) to `path` and returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    labels = {"en/top1": "zero-shot top-1, English prompts", "zh/top1": "zero-shot top-1, Chinese prompts",
              "retrieval/t2i_R@1": "text->image R@1"}
    colours = {"en/top1": "tab:orange", "zh/top1": "tab:red", "retrieval/t2i_R@1": "tab:green"}
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    loss_ax.plot(history.get("iteration", []), history.get("loss", []), color="tab:blue", linewidth=1)
    loss_ax.set(xlabel="iteration", ylabel="ITC loss", title="training loss")
    loss_ax.grid(alpha=0.3)
    iterations, series = _eval_series(history)
    for key, values in series.items():
        acc_ax.plot(iterations, values, marker="o", markersize=3, label=labels[key], color=colours[key])
    if chance is not None:
        acc_ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:g}%)")
    acc_ax.set(xlabel="iteration", ylabel="%", title="held-out evaluation", ylim=(0, 100))
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
