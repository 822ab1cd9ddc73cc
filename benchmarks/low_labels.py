"""What Barlow Twins warm-up on unlabeled rows buys when labels are few (`data.unlabeled`,
`train.pretrain_epochs`): SST-2 with 200 labeled training rows and 4,000 unlabeled ones (the next
rows of a seeded shuffle of train.tsv, labels dropped), tested on test.tsv. SHERL at its defaults
and UniPT (whose modules take a warm-up too), each trained with and without `--pretrain-epochs`
epochs of Barlow Twins on the unlabeled split first, on one cache (the early layers run once, for
both phases), 5 seeds, the arms taking turns (the order reversed every other seed), each run in a
fresh process. No validation split: a user with 200 labels has none to spare, so each run keeps its
last epoch.

Per arm: test accuracy (mean +- sd over seeds) and, for each warm arm, the difference to the same
method without the warm-up with its 95% interval (seeds and test sentences:
sherl_pipe.compare.interval). Results append to a JSONL file (an interrupted run resumes). The
last line is one JSON object with each arm's accuracy and each warm-up's `delta` and `ci95`.

    python benchmarks/low_labels.py                               # about 25 minutes on 2 CPU cores
    python benchmarks/low_labels.py --seeds 0 --methods sherl     # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_DATA, Jobs, accuracy_line, add_job_args, extract_job, load_avg,  # noqa: E402
                    train_job, train_runs)


def split_rows(data: Path, labeled: int, unlabeled: int, work: Path) -> tuple[Path, Path]:
    """LABELED rows of a seeded shuffle of train.tsv (sentence and label) and the next UNLABELED
    ones (the sentence only)."""
    with open(data / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    random.Random(0).shuffle(rows)
    if len(rows) < labeled + unlabeled:
        sys.exit(f"{data / 'train.tsv'} has {len(rows)} rows: fewer than --labeled + --unlabeled")
    labeled_path, unlabeled_path = work / "labeled.tsv", work / "unlabeled.tsv"
    labeled_path.write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows[:labeled]))
    unlabeled_path.write_text("sentence\n" + "".join(f"{r['sentence']}\n"
                                                     for r in rows[labeled:labeled + unlabeled]))
    return labeled_path, unlabeled_path


def pipeline_text(args, work: Path, labeled: Path, unlabeled: Path) -> str:
    return (f'[data]\ntrain = "{labeled}"\ntest = "{args.data / "test.tsv"}"\nunlabeled = "{unlabeled}"\n'
            f'text_column = "sentence"\nlabel_column = "label"\n'
            f'[extract]\ncache = "{work / "cache"}"\nthreads = {args.threads}\nlate_layers = 0\n'
            f'[train]\nthreads = {args.threads}\neval_split = ""\nepochs = {args.epochs}\n')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/low-labels"))
    ap.add_argument("--labeled", type=int, default=200)
    ap.add_argument("--unlabeled", type=int, default=4000)
    ap.add_argument("--methods", default="sherl,unipt")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=20, help="the task's epochs (200 rows: 7 steps each)")
    ap.add_argument("--pretrain-epochs", type=int, default=3, help="Barlow Twins epochs on the unlabeled rows")
    ap.add_argument("--threads", type=int, default=2)
    add_job_args(ap)
    args = ap.parse_args()
    if args.job:  # inside a job process
        print(json.dumps(extract_job(args.pipe) if args.job == "extract" else train_job(args.pipe, args.set)))
        return
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    work = args.work / f"l{args.labeled}-u{args.unlabeled}-ep{args.epochs}-pre{args.pretrain_epochs}-t{args.threads}"
    work.mkdir(parents=True, exist_ok=True)
    print(load_avg(), flush=True)
    job = Jobs(__file__, work / "results.jsonl")
    pipe = work / "pipeline.toml"
    pipe.write_text(pipeline_text(args, work, *split_rows(args.data, args.labeled, args.unlabeled, work)))
    job("extract", ["--job", "extract", "--pipe", str(pipe)])
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    arms = [(m, warm) for m in methods for warm in (0, args.pretrain_epochs)]
    runs: dict[str, list[dict]] = {}
    for i, seed in enumerate(seeds):
        for method, warm in (arms if i % 2 == 0 else arms[::-1]):
            name = f"{method}-warm" if warm else method
            sets = ["--set", f"train.method={method}", "--set", f"train.pretrain_epochs={warm}"]
            runs.setdefault(name, []).extend(train_runs(job, pipe, work, name, [seed], sets))
    print(f"\nSST-2, {args.labeled} labeled training rows, {args.unlabeled} unlabeled, test.tsv; {args.epochs} "
          f"epoch(s) of the task, warm: {args.pretrain_epochs} epoch(s) of Barlow Twins first; seeds {seeds}:")
    out = {}
    for method in methods:
        out[method] = accuracy_line(method, runs[method], None, timed="training")
        out[f"{method}-warm"] = accuracy_line(f"{method} + warm-up", runs[f"{method}-warm"], runs[method],
                                              timed="training")
    print(load_avg())
    print(json.dumps({"arms": out, "labeled": args.labeled, "unlabeled": args.unlabeled, "epochs": args.epochs,
                      "pretrain_epochs": args.pretrain_epochs, "seeds": seeds}))


if __name__ == "__main__":
    main()
