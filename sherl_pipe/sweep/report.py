"""A sweep's results, rebuilt from its study and trial folders at any time (also while it runs):
trials.csv, a leaderboard (top 10, and the spread over seeds of otherwise equal settings),
best.toml (the best trial's whole pipeline), and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from sherl_pipe.atomic import write_atomically
from sherl_pipe.config import Pipeline, to_toml
from sherl_pipe.sweep.study import load_study, trial_dir

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


@dataclass
class Report:
    rows: list[dict]
    keys: list[str]
    metric: str
    direction: str
    leaderboard: str
    best: dict | None


def _trial_row(t, sweep_dir: Path, keys: list[str]) -> dict:
    folder = trial_dir(sweep_dir, t.number)
    info = json.loads((folder / "trial.json").read_text()) if (folder / "trial.json").is_file() else {}
    error = (folder / "error.txt").read_text().splitlines()[0] if (folder / "error.txt").is_file() else ""
    values = t.user_attrs.get("train", {})
    steps = sorted(t.intermediate_values)
    return {"number": t.number, "state": STATES.get(t.state.name, t.state.name.lower()),
            **{k: values.get(k) for k in keys},  # as the study holds them: lists already JSON text (space.encode)
            "value": t.value, "final": t.intermediate_values[steps[-1]] if steps else info.get("final"),
            "epochs": steps[-1] if steps else info.get("epochs"), "seconds": info.get("seconds"),
            "samples_per_s": info.get("samples_per_s"), "peak_rss_mb": info.get("peak_rss_mb"),
            **_consolidation_columns(folder), "run_dir": str(folder), "error": error}


def _consolidation_columns(folder: Path) -> dict:
    """The last epoch's consolidation state from the trial's summary.json (empty until it finishes)."""
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    state = summary.get("consolidation") or {}
    return {"alive": state.get("alive"), "alpha_sum": state.get("alpha_sum")}


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in r.items()}
                    for r in rows)
    return buf.getvalue()


def _ranked(rows: list[dict], direction: str) -> list[dict]:
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    return sorted(done, key=lambda r: r["value"], reverse=direction == "maximize")


def leaderboard(rows: list[dict], keys: list[str], metric: str, direction: str) -> str:
    ranked = _ranked(rows, direction)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "running")}
    lines = [f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
             f"top {min(10, len(ranked))} by {metric} ({direction}):"]
    for r in ranked[:10]:
        lines.append(f"  #{r['number']:<4} {metric} {r['value']:.4f}  " + ", ".join(f"{k}={r[k]}" for k in keys))
    groups: dict[tuple, list[float]] = {}
    for r in ranked:
        groups.setdefault(tuple((k, r[k]) for k in keys if k != "seed"), []).append(r["value"])
    if "seed" in keys and any(len(v) > 1 for v in groups.values()):
        lines.append(f"over seeds (mean +- sd of {metric}, n):")
        order = sorted(groups.items(), key=lambda kv: statistics.mean(kv[1]), reverse=direction == "maximize")
        for setting, vals in order[:10]:
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            lines.append(f"  {statistics.mean(vals):.4f} +- {sd:.4f} (n={len(vals)})  "
                         + ", ".join(f"{k}={v}" for k, v in setting))
    return "\n".join(lines)


def write_best(sweep_dir: Path, base: dict, best: dict, keys: list[str], metric: str) -> None:
    """The best trial's whole pipeline, runnable with `sherl-pipe train` / `run`."""
    pipe = json.loads(json.dumps(base))
    for k in keys:
        value = best[k]
        pipe["train"][k] = json.loads(value) if isinstance(value, str) and value.startswith("[") else value
    pipe["train"]["run_dir"] = str(sweep_dir / "best-run")
    header = (f"The best trial (#{best['number']}, {metric} {best['value']:.4f}) of the sweep in {sweep_dir},\n"
              f"as a whole pipeline: sherl-pipe train {sweep_dir / 'best.toml'}")
    write_atomically(sweep_dir / "best.toml", to_toml(Pipeline.from_dict(pipe, "best.toml"), header).encode())


def build_report(sweep_dir: Path, plots: bool = True) -> Report:
    study = load_study(sweep_dir)
    sig = study.user_attrs["signature"]
    keys = [p["key"] for p in sig["space"]]
    rows = [_trial_row(t, sweep_dir, keys) for t in study.get_trials(deepcopy=False)]
    write_atomically(sweep_dir / "trials.csv", _csv(rows).encode())
    ranked = _ranked(rows, sig["direction"])
    if ranked:
        write_best(sweep_dir, sig["pipeline"], ranked[0], keys, sig["metric"])
    if plots and rows:
        from sherl_pipe.sweep.plots import plot_all

        plot_all(sweep_dir, rows, keys, sig["metric"], sig["direction"], ranked)
    board = leaderboard(rows, keys, sig["metric"], sig["direction"])
    write_atomically(sweep_dir / "leaderboard.txt", (board + "\n").encode())
    return Report(rows, keys, sig["metric"], sig["direction"], board, ranked[0] if ranked else None)
