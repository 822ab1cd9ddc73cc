"""A comparison's results, rebuilt from its phases at any time (`sherl-pipe compare-report DIR`):
compare.csv (a row per method x seed), compare.md (per method: mean +- sd, a paired bootstrap 95%
interval against full fine-tuning, memory, time) and the plots accuracy_vs_memory.png and
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

COLUMNS = ("method", "seed", "state", "epochs", "lr", "lr_late", "test", "validation", "seconds", "samples_per_s",
           "trainable_parameters", "peak_mib", "state_mib", "parameters_mib", "gradients_mib", "optimizer_mib",
           "activations_mib", "batch", "cuda_max_allocated_mib", "error")
MIB = 2**20


def load(folder: Path) -> tuple[dict, list[dict]]:
    """The comparison's description and its rows: the final phase, and with --budget time full
    fine-tuning's calibration runs (they are its results, unless --tune-lr ran it again at other rates)."""
    from sherl_pipe.compare.phase import results_of
    from sherl_pipe.sweep.study import is_sweep_folder, load_study

    if not (folder / "compare.json").is_file():
        raise SherlError(f"compare folder {folder}: no compare.json; give the folder of a `sherl-pipe compare`")
    plan = json.loads((folder / "compare.json").read_text())
    got = {p: results_of(load_study(folder / p), folder / p) for p in ("calibrate", "final")
           if is_sweep_folder(folder / p)}
    rows = got.get("final", [])
    if not any(r["method"] == REFERENCE for r in rows):  # a tuned rate runs it again in the final phase
        rows += [r for r in got.get("calibrate", []) if r["method"] == REFERENCE]
    return plan, sorted(rows, key=lambda r: (plan["methods"].index(r["method"]), r["seed"]))


def test_metric(plan: dict) -> str:
    return plan["metric"] if plan["metric"] != "train_loss" else ("accuracy" if plan["direction"] == "maximize"
                                                                   else "mse")


def row_of(r: dict, metric: str, direction: str) -> dict:
    from sherl_pipe.metrics import best_of

    sb = r.get("state_bytes") or {}
    peak = None if r.get("peak_mib") is None or r.get("baseline_mib") is None else r["peak_mib"] - r["baseline_mib"]
    mib = (lambda k: None if k not in sb else sb[k] / MIB)
    cuda = r.get("cuda_max_allocated")
    return {"method": r["method"], "seed": r["seed"], "state": r["state"], "epochs": r.get("epochs"), "lr": r["lr"],
            "lr_late": r.get("lr_late"),
            "test": ((r.get("test") or {}).get("metrics") or {}).get(metric),
            "validation": best_of(r.get("values") or [], direction), "seconds": r.get("train_seconds"),
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
    from sherl_pipe.metrics import classification_metrics, regression_metrics

    if classes:
        return classification_metrics(pred, gold, classes)[metric]
    return regression_metrics(pred, gold)[metric]


def paired_bootstrap(runs: dict[str, list[dict]], method: str, metric: str, reps: int = 1000, seed: int = 0):
    """95% interval of (METHOD's mean over seeds - full fine-tuning's) on test sets resampled over
    their rows, the same rows for both."""
    ref, own = runs.get(REFERENCE, []), runs.get(method, [])
    if not ref or not own or method == REFERENCE:
        return None
    gold = ref[0]["test"]["gold"]
    numeric = metric in REGRESSION_METRICS
    names = sorted(set(gold) | {p for r in ref + own for p in r["test"]["pred"]})
    index = {name: i for i, name in enumerate(names)}
    encode = (lambda a: np.asarray(a, dtype=np.float64)) if numeric else (lambda a: np.asarray([index[x] for x in a]))
    classes = 0 if numeric else len(names)
    g = encode(gold)
    preds = {m: [encode(r["test"]["pred"]) for r in rs] for m, rs in ((REFERENCE, ref), (method, own))}
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(reps):
        idx = rng.integers(0, len(g), len(g))
        mean = {m: np.mean([metric_on(p[idx], g[idx], metric, classes) for p in ps]) for m, ps in preds.items()}
        diffs.append(mean[method] - mean[REFERENCE])
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


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
        stat = {k: _mean_sd([r[k] for r in mine]) for k in ("test", "validation", "seconds", "peak_mib", "state_mib",
                                                           "epochs")}
        out.append({"method": method, "n": len(mine), **{k: v for k, v in stat.items()},
                    "trainable": mine[0]["trainable_parameters"],
                    "ci": paired_bootstrap(runs, method, metric)})
    return out


def _fmt(pair, scale: float = 1.0, digits: int = 2) -> str:
    mean, sd = pair
    return "—" if mean is None else f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def markdown(plan: dict, summary: list[dict], metric: str, batch: str) -> str:
    pct = 100.0 if metric in ("accuracy", "macro_f1", "f1_positive") else 1.0
    lines = [f"# Methods compared ({plan['budget']} budget; test {metric}, mean ± sd over seeds)", "",
             f"| method | n | test {metric} | − {REFERENCE} (paired bootstrap 95%) | validation | epochs | "
             f"train s | peak MiB above idle | training state MiB (batch {batch}) | trainable params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ci = "—" if s["ci"] is None else (f"{(s['test'][0] - _ref(summary)) * pct:+.2f} "
                                          f"[{s['ci'][0] * pct:+.2f}, {s['ci'][1] * pct:+.2f}]")
        lines.append(f"| {s['method']} | {s['n']} | {_fmt(s['test'], pct)} | {ci} | {_fmt(s['validation'], pct)} | "
                     f"{_fmt(s['epochs'], 1, 0)} | {_fmt(s['seconds'], 1, 1)} | {_fmt(s['peak_mib'], 1, 0)} | "
                     f"{_fmt(s['state_mib'], 1, 1)} | {s['trainable']:,} |")
    return "\n".join(lines) + "\n"


def _ref(summary: list[dict]) -> float:
    return next((s["test"][0] for s in summary if s["method"] == REFERENCE), float("nan"))


def build_report(folder: Path, plots: bool = True) -> dict:
    plan, raw = load(folder)
    metric = test_metric(plan)
    rows = [row_of(r, metric, plan["direction"]) for r in raw]
    runs = {}
    for r in raw:
        if r["state"] == "complete" and r.get("test"):
            runs.setdefault(r["method"], []).append(r)
    write_atomically(folder / "compare.csv", _csv(rows).encode())
    summary = summarize(plan, rows, runs, metric)
    batch = next((r["batch"] for r in rows if r["batch"]), "")
    text = markdown(plan, summary, metric, batch)
    write_atomically(folder / "compare.md", text.encode())
    if plots and summary:
        from sherl_pipe.compare.plots import plot_front

        plot_front(folder / "accuracy_vs_memory.png", summary, "peak_mib", "peak memory above idle (MiB)", metric)
        plot_front(folder / "accuracy_vs_time.png", summary, "seconds", "training time (s)", metric)
    return {"rows": rows, "summary": summary, "markdown": text}
