"""What the sweep tests share: a pipeline with a [sweep] table, the rows of trials.csv, a grid."""

from __future__ import annotations

import csv

from conftest import write_full_pipeline


def sweep_pipeline(tmp_path, bert_dir, labeled_csv, cache, sweep_table, train_extra="epochs = 2"):
    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, cache, tmp_path / "run",
                               'dtype = "float32"', f'{train_extra}\neval_split = "validation"')
    path.write_text(path.read_text() + "\n" + sweep_table.replace("{dir}", str(tmp_path / "sweep")))
    return path


def rows(sweep_dir):
    with open(sweep_dir / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


GRID = """
[sweep]
sampler = "grid"
dir = "{dir}"
workers = 1
threads = 1
[sweep.space]
lr = [0.001, 0.003]
"""
