"""A comparison's results, rebuilt from its phases at any time (`sherl-pipe compare-report DIR`):
compare.csv (a row per method x seed), compare.md (per method: n seeds, mean +- sd, a 95% interval
against full fine-tuning covering seed noise and test rows (interval.py), memory, time) and the plots accuracy_vs_memory.png and
accuracy_vs_time.png (a point per method, seed error bars, the accuracy/cost front marked)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import numpy as np

from sherl_pipe.atomic import write_atomically
from sherl_pipe.errors import SherlError
from sherl_pipe.methods import REFERENCE
from sherl_pipe.metrics import REGRESSION_METRICS
from sherl_pipe.compare.interval import difference_interval
from sherl_pipe.compare.phase import results_of
from sherl_pipe.compare.plots import plot_front
from sherl_pipe.metrics import best_of
from sherl_pipe.metrics import classification_metrics, regression_metrics
from sherl_pipe.engine import is_sweep_folder, load_study

COLUMNS = ("method", "seed", "state", "epochs", "lr", "lr_late", "test", "validation", "seconds", "budget_share",
           "stop_reason", "samples_per_s",
           "trainable_parameters", "peak_mib", "state_mib", "parameters_mib", "gradients_mib", "optimizer_mib",
           "activations_mib", "batch", "cuda_max_allocated_mib", "error")
MIB = 2**20


def load(folder: Path) -> tuple[dict, list[dict]]:
    """The comparison's description and its rows: the final phase, and with --budget time full
    fine-tuning's calibration runs (they are its results, unless --tune-lr ran it again at other rates)."""

    if not (folder / "compare.json").is_file():
        raise SherlError(f"compare folder {folder}: no compare.json; give the folder of a `sherl-pipe compare`")
    plan = json.loads((folder / "compare.json").read_text())
    got = {p: results_of(load_study(folder / p), folder / p) for p in ("calibrate", "final")
           if is_sweep_folder(folder / p)}
    rows = got.get("final", [])
    if not any(r["method"] == REFERENCE for r in rows):  # a tuned rate runs it again in the final phase
        rows += [r for r in got.get("calibrate", []) if r["method"] == REFERENCE]
    return plan, sorted(rows, key=lambda r: (plan["methods"].index(r["method"]), r["seed"]))


def metric_on_test(plan: dict) -> str:
    return plan["metric"] if plan["metric"] != "train_loss" else ("accuracy" if plan["direction"] == "maximize"
                                                                   else "mse")


def row_of(r: dict, metric: str, direction: str, budget: float | None = None) -> dict:
    """One trial's row; BUDGET: --budget time's seconds, for the row's share of it."""

    sb = r.get("state_bytes") or {}
    peak = None if r.get("peak_mib") is None or r.get("baseline_mib") is None else r["peak_mib"] - r["baseline_mib"]
    mib = (lambda k: None if k not in sb else sb[k] / MIB)
    cuda = r.get("cuda_max_allocated")
    return {"method": r["method"], "seed": r["seed"], "state": r["state"], "epochs": r.get("epochs"), "lr": r["lr"],
            "lr_late": r.get("lr_late"),
            "test": ((r.get("test") or {}).get("metrics") or {}).get(metric),
            "validation": best_of(r.get("values") or [], direction), "seconds": r.get("train_seconds"),
            "budget_share": (r["train_seconds"] / budget if budget and r.get("train_seconds") is not None else None),
            "stop_reason": r.get("stop_reason") or "",
            "samples_per_s": r.get("samples_per_s"), "trainable_parameters": r.get("trainable_parameters"),
            "peak_mib": peak, "state_mib": mib("total"), "parameters_mib": mib("parameters"),
            "gradients_mib": mib("gradients"), "optimizer_mib": mib("optimizer"),
            "activations_mib": mib("activations"), "batch": "x".join(map(str, sb.get("batch", []))),
            "cuda_max_allocated_mib": None if cuda is None else cuda / MIB, "error": r.get("error", "")}


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in r.items()}
                for r in rows)
    return buf.getvalue()


def metric_on(pred: np.ndarray, gold: np.ndarray, metric: str, classes: int) -> float:
    if classes:
        return classification_metrics(pred, gold, classes)[metric]
    return regression_metrics(pred, gold)[metric]


def interval_against_reference(runs: dict[str, list[dict]], method: str, metric: str):
    """95% interval of METHOD's mean test score over seeds minus full fine-tuning's, covering seed
    noise and test-row sampling (compare/interval.py); None without 2 seeds of each."""

    ref, own = runs.get(REFERENCE, []), runs.get(method, [])
    if not ref or not own or method == REFERENCE:
        return None
    gold = ref[0]["test"]["gold"]
    numeric = metric in REGRESSION_METRICS
    names = sorted(set(gold) | {p for r in ref + own for p in r["test"]["pred"]})
    index = {name: i for i, name in enumerate(names)}
    encode = (lambda a: np.asarray(a, dtype=np.float64)) if numeric else (lambda a: np.asarray([index[x] for x in a]))
    classes = 0 if numeric else len(names)
    return difference_interval([encode(r["test"]["pred"]) for r in ref], [encode(r["test"]["pred"]) for r in own],
                               encode(gold), lambda p, g: metric_on(p, g, metric, classes))


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(plan: dict, rows: list[dict], runs: dict[str, list[dict]], metric: str) -> list[dict]:
    out = []
    for method in plan["methods"]:
        mine = [r for r in rows if r["method"] == method and r["state"] == "complete"]
        if not mine:
            continue
        stat = {k: _mean_sd([r[k] for r in mine]) for k in ("test", "validation", "seconds", "budget_share", "peak_mib",
                                                           "state_mib", "epochs")}
        out.append({"method": method, "n": len(mine), **{k: v for k, v in stat.items()},
                    "trainable": mine[0]["trainable_parameters"],
                    "ci": interval_against_reference(runs, method, metric)})
    return out


def _fmt(pair, scale: float = 1.0, digits: int = 2) -> str:
    mean, sd = pair
    return "—" if mean is None else f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def markdown(plan: dict, summary: list[dict], metric: str, batch: str, rows: list[dict] = ()) -> str:
    pct = 100.0 if metric in ("accuracy", "macro_f1", "f1_positive") else 1.0
    budget = plan.get("budget_seconds")
    title = f"{plan['budget']} budget" + (f" of {budget:.1f} s" if budget else "")
    lines = [f"# Methods compared ({title}; test {metric}, mean ± sd over seeds)", "",
             f"| method | n | test {metric} | − {REFERENCE} (95%: seeds and test rows) | validation | epochs | "
             f"train s | × budget | peak MiB above idle | training state MiB (batch {batch}) | trainable params |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ci = _ci_cell(s, summary, pct)
        lines.append(f"| {s['method']} | {s['n']} | {_fmt(s['test'], pct)} | {ci} | {_fmt(s['validation'], pct)} | "
                     f"{_fmt(s['epochs'], 1, 0)} | {_fmt(s['seconds'], 1, 1)} | {_fmt(s['budget_share'], 1, 2)} | "
                     f"{_fmt(s['peak_mib'], 1, 0)} | {_fmt(s['state_mib'], 1, 1)} | {s['trainable']:,} |")
    return "\n".join(lines + missing(plan, rows)) + "\n"


def missing(plan: dict, rows: list[dict]) -> list[str]:
    """A line for each method the comparison asked for that has no complete run, saying why: a
    table that silently lacks a method reads as a comparison of the others only."""
    out = []
    for method in plan["methods"]:
        mine = [r for r in rows if r["method"] == method]
        if any(r["state"] == "complete" for r in mine):
            continue
        errors = [r["error"] for r in mine if r.get("error")]
        why = (f"{len(errors)} run(s) failed, the first with: {errors[0][:300]} (once the cause is fixed, "
               f"--retry-failed runs them again)" if errors
               else "no run of it has finished yet (a comparison that stopped resumes when the same command is rerun)")
        out.append(f"- **{method} is not in this table**: {why}")
    return ([""] + out) if out else []


def _ci_cell(s: dict, summary: list[dict], pct: float) -> str:
    if s["method"] == REFERENCE:
        return "—"
    diff = s["test"][0] - _ref(summary)
    if s["ci"] is None:  # one seed on a side: nothing measures the seed noise
        return "—" if diff != diff else f"{diff * pct:+.2f} (no interval: needs 2+ seeds each)"
    return f"{diff * pct:+.2f} [{s['ci'].low * pct:+.2f}, {s['ci'].high * pct:+.2f}]"


def _ref(summary: list[dict]) -> float:
    return next((s["test"][0] for s in summary if s["method"] == REFERENCE), float("nan"))


def build_report(folder: Path, plots: bool = True) -> dict:
    plan, raw = load(folder)
    metric = metric_on_test(plan)
    rows = [row_of(r, metric, plan["direction"], plan.get("budget_seconds")) for r in raw]
    runs = {}
    for r in raw:
        if r["state"] == "complete" and r.get("test"):
            runs.setdefault(r["method"], []).append(r)
    write_atomically(folder / "compare.csv", _csv(rows).encode())
    summary = summarize(plan, rows, runs, metric)
    batch = next((r["batch"] for r in rows if r["batch"]), "")
    text = markdown(plan, summary, metric, batch, rows)
    write_atomically(folder / "compare.md", text.encode())
    if plots and summary:

        plot_front(folder / "accuracy_vs_memory.png", summary, "peak_mib", "peak memory above idle (MiB)", metric)
        plot_front(folder / "accuracy_vs_time.png", summary, "seconds", "training time (s)", metric)
    return {"rows": rows, "summary": summary, "markdown": text}
