"""A sweep's plots (matplotlib, no display needed): the metric against each swept setting, the
optimization history, and the learning curves of the best trials."""

from __future__ import annotations

import json
from pathlib import Path

from sherl_pipe.plotting import pyplot, save


def plot_by_setting(sweep_dir: Path, done: list[dict], keys: list[str], metric: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r[key] for r in done]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            ax.scatter(xs, [r["value"] for r in done], s=18)
            if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], [r["value"] for r in done], s=18)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} of complete trials against each swept setting")
    fig.tight_layout()
    save(fig, sweep_dir / "metric_by_setting.png")
    plt.close(fig)


def plot_history(sweep_dir: Path, done: list[dict], metric: str, direction: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    done = sorted(done, key=lambda r: r["number"])
    ax.scatter([r["number"] for r in done], [r["value"] for r in done], s=18, label="trial")
    best, line = None, []
    for r in done:
        best = r["value"] if best is None else (max if direction == "maximize" else min)(best, r["value"])
        line.append(best)
    ax.step([r["number"] for r in done], line, where="post", color="C1", label="best so far")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.legend()
    ax.set_title("optimization history")
    save(fig, sweep_dir / "history.png")
    plt.close(fig)


def plot_learning_curves(sweep_dir: Path, ranked: list[dict], metric: str) -> None:
    """The metric per epoch of the best trials and, beside it, what their consolidation did
    (tier_weights.py): with a relu score the share of tokens it was alive on (near 0: trained
    without its tiers), with the others the entropy of its tier weights (1: a plain average)."""
    plt = pyplot()
    fig, (ax, alive_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
    shown = "alive"
    for r in ranked[:5]:
        metrics = Path(r["run_dir"]) / "metrics.jsonl"
        if not metrics.is_file():
            continue
        records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        epochs = [x for x in records if x["event"] == "epoch" and "eval" in x]
        ys = [x["train_loss"] if metric == "train_loss" else x["eval"].get(metric) for x in epochs]
        ax.plot([x["epoch"] for x in epochs], ys, marker="o", label=f"#{r['number']}")
        states = [(x["epoch"], x.get("consolidation") or {}) for x in records if x["event"] == "epoch"]
        shown = "alive" if any(s.get("alive") is not None for _, s in states) else "entropy"
        alive = [(e, s[shown]) for e, s in states if s.get(shown) is not None]
        alive_ax.plot([e for e, _ in alive], [a for _, a in alive], marker="o", label=f"#{r['number']}")
    from matplotlib.ticker import MaxNLocator

    side = {"alive": ("tokens alive (share)", "consolidation alive (0: tiers unused)"),
            "entropy": ("tier weights' entropy (of uniform)", "consolidation's choice (1: a plain average)")}[shown]
    for a, label in ((ax, metric), (alive_ax, side[0])):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("epoch")
        a.set_ylabel(label)
    alive_ax.set_ylim(-0.05, 1.05)
    ax.set_title("learning curves of the best trials")
    alive_ax.set_title(side[1])
    if ax.get_legend_handles_labels()[0]:  # trials whose folders hold no metrics draw no curve
        ax.legend(fontsize=8)
    save(fig, sweep_dir / "learning_curves.png")
    plt.close(fig)


def plot_all(sweep_dir: Path, rows: list[dict], keys: list[str], metric: str, direction: str,
             ranked: list[dict]) -> None:
    if ranked:
        plot_by_setting(sweep_dir, ranked, keys, metric)
        plot_history(sweep_dir, ranked, metric, direction)
        plot_learning_curves(sweep_dir, ranked, metric)
