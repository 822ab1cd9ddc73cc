"""compare's pictures: test metric against a cost (memory, time), one point per method with the
seeds' spread as error bars, and the front of methods no other beats on both marked."""

from __future__ import annotations

from pathlib import Path

from sherl_pipe.plotting import pyplot, save


def front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats: lower cost and higher metric (sorted by cost)."""
    out, best = [], float("-inf")
    for x, y, name in sorted(points):
        if y > best:
            out.append((x, y, name))
            best = y
    return out


def plot_front(path: Path, summary: list[dict], cost: str, xlabel: str, metric: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = []
    for s in summary:
        (x, xsd), (y, ysd) = s[cost], s["test"]
        if x is None or y is None:
            continue
        ax.errorbar([x], [y], xerr=[xsd], yerr=[ysd], fmt="o", capsize=3)
        ax.annotate(s["method"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        points.append((x, y, s["method"]))
    best = front(points)
    if len(best) > 1:
        ax.step([p[0] for p in best], [p[1] for p in best], where="post", color="grey", linestyle="--",
                label="front: no method costs less and scores higher")
        ax.legend(fontsize=8, loc="lower right")
    if points and max(p[0] for p in points) / max(min(p[0] for p in points), 1e-9) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    save(fig, path)
    plt.close(fig)
