"""Why SHERL trails full fine-tuning at equal time, and whether a change of its recipe closes the gap.

The compare benchmark's tasks and caches (benchmarks/compare.py: SST-2 4,000 rows, tweets, the
rotten-tomatoes reviews; 1,000 validation rows each), all-MiniLM-L6-v2. Per task, each recipe
variant below is a `sherl-pipe sweep` over seeds from the cache, every trial at --epochs epochs
(default 6: at the time budget full fine-tuning's 3 epochs give SHERL 10-11, and its validation
accuracy has levelled by then) keeping its best epoch on validation, whose checkpoint is then
scored on test. Per variant: validation and test mean +- sd over seeds, the train loss of the last
epoch (how far the run memorised its training rows) and the seconds per epoch. A variant is
worth a default only if it is ahead on validation on every task.

    python benchmarks/recipe.py                                   # every task and variant (~1 h on 2 cores)
    python benchmarks/recipe.py --tasks sst2 --variants default,late-full --seeds 0,1
    python benchmarks/recipe.py --variants default,open --tag r2   # folders default-e6-r2, open-e6-r2

Results stay in the sweep folders (--work, shared with compare.py's caches): a rerun resumes.
Last line: one JSON object, per task and variant, those figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, load_avg  # noqa: E402
from compare import prepare  # noqa: E402
from defaults import best_on_test, run_phase  # noqa: E402

VARIANTS = {
    "default": [],
    "late-full": ["train.late_tuning=full"],  # the last k layers trained at lr_late 3e-5
    "late-full-1e-4": ["train.late_tuning=full", "train.lr_late=1e-4"],
    "regularised": ["train.dropout=0.3", "train.weight_decay_new=0.05"],
    # the defaults with the consolidation starting open (h[c] passed on, its own output at zero)
    "open": ["train.anchor_residual=open"],
    "lr-3e-4": ["train.lr=3e-4"],
    # fewer frozen early layers: 4 of MiniLM's 6 trained (lr_late 3e-5), 2 cached; where the gap
    # to full fine-tuning comes from if it is the frozen early layers
    "late4-full": ["train.late_layers=4", "train.late_tuning=full"],
    # the same with the consolidation starting open: h[c] passed on, its own output at zero
    "open-late4-full": ["train.late_layers=4", "train.late_tuning=full", "train.anchor_residual=open"],
}


def trial_figures(run: Path, metric: str) -> dict:
    """A finished trial's best validation value, test value (its best checkpoint), last epoch's
    train loss and seconds per epoch."""
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"event": "epoch"' in line]
    summary = json.loads((run / "summary.json").read_text())
    test = best_on_test(run)
    return {"val": max(e["eval"][metric] for e in epochs), "test": test[metric],
            "train_loss": epochs[-1]["train_loss"], "s_per_epoch": summary["train_seconds"] / len(epochs)}


def variant_figures(phase_dir: Path) -> list[dict]:
    from sherl_pipe.sweep.report import build_report

    report = build_report(phase_dir, plots=False)
    return [trial_figures(Path(r["run_dir"]), report.metric) for r in report.rows if r["state"] == "complete"]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> dict:
    out = {"n": len(rows)}
    for key in ("val", "test", "train_loss", "s_per_epoch"):
        out[key], out[f"{key}_sd"] = mean_sd([r[key] for r in rows])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmark-work/compare"))
    ap.add_argument("--tasks", default="sst2,tweets,reviews")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--rows", type=int, default=4000, help="training rows per task")
    ap.add_argument("--tag", default="", help="a suffix for the sweep folders: a fresh run beside earlier ones")
    args = ap.parse_args()
    args.work = args.work.resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(load_avg(), flush=True)
    results: dict = {}
    for task in args.tasks.split(","):
        pipe = prepare(task, args)
        for name in args.variants.split(","):
            phase = args.work / task / "recipe" / f"{name}-e{args.epochs}{'-' + args.tag if args.tag else ''}"
            phase.parent.mkdir(parents=True, exist_ok=True)
            run_phase(pipe, phase, {"seed": seeds}, [f"train.epochs={args.epochs}", *VARIANTS[name]])
            s = results.setdefault(task, {})[name] = summarize(variant_figures(phase))
            print(f"   {task:<8} {name:<16} val {100 * s['val']:6.2f} +- {100 * s['val_sd']:.2f}  test "
                  f"{100 * s['test']:6.2f} +- {100 * s['test_sd']:.2f}  last train loss {s['train_loss']:.3f}  "
                  f"{s['s_per_epoch']:.1f} s/epoch (n={s['n']})", flush=True)
    print(load_avg(), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
