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
from sherl_pipe.config import Pipeline, laid_over, to_toml
from sherl_pipe.metrics import best_of
from sherl_pipe.engine import first_cause, load_study, trial_dir
from sherl_pipe.sweep.plots import plot_all

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


@dataclass
class Report:
    rows: list[dict]
    keys: list[str]
    metric: str
    direction: str
    leaderboard: str
    best: dict | None


def _trial_row(t, sweep_dir: Path, keys: list[str], direction: str) -> dict:
    folder = trial_dir(sweep_dir, t.number)
    info = json.loads((folder / "trial.json").read_text()) if (folder / "trial.json").is_file() else {}
    error = first_cause((folder / "error.txt").read_text()) if (folder / "error.txt").is_file() else ""
    # a queued trial (waiting to run again) has its parameters fixed, not yet asked
    values = t.user_attrs.get("train") or t.system_attrs.get("fixed_params", {})
    steps = sorted(t.intermediate_values)
    value = t.value
    if t.state.name == "PRUNED":  # Optuna keeps a pruned trial's last value; the objective is its best epoch's
        value = best_of([t.intermediate_values[s] for s in steps], direction)
    return {"number": t.number, "state": STATES.get(t.state.name, t.state.name.lower()),
            **{k: values.get(k) for k in keys},  # as the study holds them: lists already JSON text (space.encode)
            "value": value, "final": t.intermediate_values[steps[-1]] if steps else info.get("final"),
            "epochs": steps[-1] if steps else info.get("epochs"), "seconds": info.get("seconds"),
            "samples_per_s": info.get("samples_per_s"), "peak_rss_mb": info.get("peak_rss_mb"),
            **_consolidation_columns(folder), "run_dir": str(folder), "rerun_of": t.user_attrs.get("rerun_of"),
            "error": error}


def _consolidation_columns(folder: Path) -> dict:
    """The last epoch's consolidation state from the trial's summary.json (empty until it finishes)."""
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    state = summary.get("consolidation") or {}
    return {"alive": state.get("alive"), "alpha_sum": state.get("alpha_sum"), "entropy": state.get("entropy"),
            "token_sd": state.get("token_sd")}


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


def seed_groups(ranked: list[dict], keys: list[str], direction: str) -> list[tuple[tuple, list[dict]]]:
    """Complete trials grouped by their settings other than the seed, best mean first."""
    groups: dict[tuple, list[dict]] = {}
    for r in ranked:
        groups.setdefault(tuple((k, r[k]) for k in keys if k != "seed"), []).append(r)
    return sorted(groups.items(), key=lambda kv: statistics.mean(r["value"] for r in kv[1]),
                  reverse=direction == "maximize")


def best_setting(ranked: list[dict], keys: list[str], direction: str) -> tuple[dict, int] | None:
    """The trial whose pipeline best.toml holds, and how many seeds back it. With the seed swept,
    the setting with the best mean over its seeds (its best trial stands for it): the single best
    trial is the luckiest seed's. Without it, the best trial."""
    if not ranked:
        return None
    if "seed" not in keys:
        return ranked[0], 1
    _, members = seed_groups(ranked, keys, direction)[0]
    return members[0], len(members)


def leaderboard(rows: list[dict], keys: list[str], metric: str, direction: str) -> str:
    ranked = _ranked(rows, direction)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "running")}
    lines = [f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
             f"top {min(10, len(ranked))} by {metric} ({direction}):"]
    for r in ranked[:10]:
        lines.append(f"  #{r['number']:<4} {metric} {r['value']:.4f}  " + ", ".join(f"{k}={r[k]}" for k in keys))
    groups = seed_groups(ranked, keys, direction)
    if "seed" in keys and any(len(v) > 1 for _, v in groups):
        lines.append(f"over seeds (mean +- sd of {metric}, n):")
        for setting, members in groups[:10]:
            vals = [r["value"] for r in members]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            lines.append(f"  {statistics.mean(vals):.4f} +- {sd:.4f} (n={len(vals)})  "
                         + ", ".join(f"{k}={v}" for k, v in setting))
        lines.append("best.toml: the setting with the best mean over seeds (its seed: the pipeline's own train.seed)")
    return "\n".join(lines)


def write_best(sweep_dir: Path, base: dict, best: dict, keys: list[str], metric: str, seeds: int = 1) -> None:
    """The best setting's whole pipeline, runnable with `sherl-pipe train` / `run`. With the seed
    swept, the seed is the pipeline's own (best.toml is a setting, not a lucky draw)."""
    pipe = json.loads(json.dumps(base))
    values = {k: json.loads(best[k]) if isinstance(best[k], str) and best[k].startswith("[") else best[k]
              for k in keys if k != "seed"}
    pipe["train"] = laid_over(pipe["train"], values)  # as a trial's are laid
    pipe["train"]["run_dir"] = str(sweep_dir / "best-run")
    what = (f"The best setting by mean {metric} over {seeds} seed(s) (its best trial #{best['number']}, "
            f"{best['value']:.4f})" if "seed" in keys else f"The best trial (#{best['number']}, {metric} "
            f"{best['value']:.4f})")
    header = f"{what} of the sweep in {sweep_dir},\nas a whole pipeline: sherl-pipe train {sweep_dir / 'best.toml'}"
    write_atomically(sweep_dir / "best.toml", to_toml(Pipeline.from_dict(pipe, "best.toml"), header).encode())


def build_report(sweep_dir: Path, plots: bool = True) -> Report:
    study = load_study(sweep_dir)
    sig = study.user_attrs["signature"]
    keys = [p["key"] for p in sig["space"]]
    rows = [_trial_row(t, sweep_dir, keys, sig["direction"]) for t in study.get_trials(deepcopy=False)]
    write_atomically(sweep_dir / "trials.csv", _csv(rows).encode())
    ranked = _ranked(rows, sig["direction"])
    chosen = best_setting(ranked, keys, sig["direction"])
    if chosen:
        # the settings as given (sweeps before it was kept: the signature's, which has every key)
        base = study.user_attrs.get("pipeline_given", sig["pipeline"])
        write_best(sweep_dir, base, chosen[0], keys, sig["metric"], chosen[1])
    if plots and rows:

        plot_all(sweep_dir, rows, keys, sig["metric"], sig["direction"], ranked)
    board = leaderboard(rows, keys, sig["metric"], sig["direction"])
    write_atomically(sweep_dir / "leaderboard.txt", (board + "\n").encode())
    return Report(rows, keys, sig["metric"], sig["direction"], board, chosen[0] if chosen else None)
