"""Read a labeled text file (CSV, TSV, JSONL, Parquet), clean it and split it.

Every problem with the input is a `SherlError` naming the file, the column and the first offending
data rows (counted from 1, header excluded). Row ids kept with each sample are 0-based data rows of
the source file, so any cached sample can be traced back to its line.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from sherl_pipe.config import DataConfig
from sherl_pipe.errors import SherlError
from sherl_pipe.data.read import read_columns, rows_text
from sherl_pipe.data.split import split_indices
from sherl_pipe.resources import resolve_data

SPLITS = ("train", "validation", "test")


@dataclass
class Split:
    name: str
    source: str
    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray  # int64 label ids, or float32 targets for regression
    row_ids: np.ndarray  # int64, 0-based data rows of `source`

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """A hash of exactly the rows this split holds, in order."""
        h = hashlib.sha256()
        h.update(self.row_ids.astype("<i8").tobytes())
        h.update(self.labels.astype("<f8").tobytes())
        for i, text in enumerate(self.texts):
            h.update(text.encode("utf-8") + b"\x00")
            if self.pairs is not None:
                h.update(self.pairs[i].encode("utf-8") + b"\x00")
        return h.hexdigest()


@dataclass
class Dataset:
    task_type: str
    label_names: list[str] | None
    splits: dict[str, Split]


def _parse_float(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def load_file(cfg: DataConfig, source: str, label_names: list[str] | None) -> dict:
    """One file, filtered, de-duplicated and limited: a dict of parallel lists."""
    path = resolve_data(source)
    cols = [cfg.text_column, cfg.label_column]
    if cfg.text_pair_column:
        cols.append(cfg.text_pair_column)
    if cfg.filter_column:
        cols.append(cfg.filter_column)
    table = read_columns(path, cfg.format, cfg.encoding, list(dict.fromkeys(cols)))
    n = len(table[cfg.text_column])
    keep = np.ones(n, dtype=bool)

    if cfg.filter_column:
        values = [_parse_float(v) for v in table[cfg.filter_column]]
        bad = [i for i, v in enumerate(values) if v is not None and math.isnan(v)]
        if bad:
            raise SherlError(f"data file {path}: column '{cfg.filter_column}' has non-numeric values in data rows "
                             f"{rows_text(bad)}; fix them or change data.filter_column")
        for i, v in enumerate(values):
            if v is None:
                keep[i] = cfg.filter_missing == "keep"
            elif cfg.filter_min is not None and v < cfg.filter_min:
                keep[i] = False

    rows = [i for i in range(n) if keep[i]]
    text_cols = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    for col in text_cols:
        empty = [i for i in rows if table[col][i] is None or not str(table[col][i]).strip()]
        if empty:
            raise SherlError(f"data file {path}: column '{col}' is empty in data rows {rows_text(empty)}; "
                             f"remove those rows or filter them out")

    if cfg.deduplicate:
        seen, unique = set(), []
        for i in rows:
            key = tuple(str(table[c][i]) for c in text_cols)
            if key not in seen:
                seen.add(key)
                unique.append(i)
        rows = unique
    if cfg.limit:
        rows = rows[: cfg.limit]

    raw_labels = [table[cfg.label_column][i] for i in rows]
    missing = [rows[j] for j, v in enumerate(raw_labels) if v is None or (isinstance(v, str) and not v.strip())]
    if missing:
        raise SherlError(f"data file {path}: column '{cfg.label_column}' is empty in data rows {rows_text(missing)}")
    if cfg.task_type == "regression":
        targets = [_parse_float(v) for v in raw_labels]
        bad = [rows[j] for j, v in enumerate(targets) if not math.isfinite(v)]
        if bad:
            raise SherlError(f"data file {path}: column '{cfg.label_column}' has values that are not finite numbers "
                             f"in data rows {rows_text(bad)} (task_type = 'regression')")
        labels = np.asarray(targets, dtype=np.float32)
    else:
        labels = [_label_key(v) for v in raw_labels]
    return {
        "source": str(source),
        "path": path,
        "rows": np.asarray(rows, dtype=np.int64),
        "texts": [str(table[cfg.text_column][i]) for i in rows],
        "pairs": [str(table[cfg.text_pair_column][i]) for i in rows] if cfg.text_pair_column else None,
        "labels": labels,
    }


def _label_key(value) -> str:
    """Class labels as strings: 1, 1.0 and "1" are the same class."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _label_ids(path, column: str, labels: list[str], rows: np.ndarray, names: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    bad = [j for j, v in enumerate(labels) if v not in index]
    if bad:
        raise SherlError(f"data file {path}: column '{column}' has label {labels[bad[0]]!r} that is not in "
                         f"data.label_names {names}, in data rows {rows_text([int(rows[j]) for j in bad])}")
    return np.asarray([index[v] for v in labels], dtype=np.int64)


def _default_label_names(values: set[str]) -> list[str]:
    try:  # integer labels sort numerically, so 2 < 10
        return [str(v) for v in sorted(int(v) for v in values)]
    except ValueError:
        return sorted(values)


def load_dataset(cfg: DataConfig, splits: tuple[str, ...] = ()) -> Dataset:
    """Every split the data section describes (or just `splits`), with labels mapped to ids."""
    cfg.require_input()
    files = {}
    if cfg.source:
        files = {"*": load_file(cfg, cfg.source, None)}
    else:
        for name in SPLITS:
            if getattr(cfg, name):
                files[name] = load_file(cfg, getattr(cfg, name), None)

    label_names = None
    if cfg.task_type == "classification":
        label_names = list(cfg.label_names) or _default_label_names({v for f in files.values() for v in f["labels"]})
        if len(label_names) < 2:
            raise SherlError(f"data column '{cfg.label_column}': classification needs at least 2 classes, "
                             f"found {label_names}")
        for f in files.values():
            f["labels"] = _label_ids(f["path"], cfg.label_column, f["labels"], f["rows"], label_names)

    def make(name, f, idx):
        return Split(name=name, source=f["source"], texts=[f["texts"][i] for i in idx],
                     pairs=None if f["pairs"] is None else [f["pairs"][i] for i in idx],
                     labels=f["labels"][idx], row_ids=f["rows"][idx])

    out = {}
    if cfg.source:
        f = files["*"]
        parts = split_indices(f["labels"], cfg.split_sizes, cfg.split_seed,
                               cfg.task_type == "classification", f"data file {f['path']}")
        for name, idx in zip(SPLITS, parts):
            if len(idx):
                out[name] = make(name, f, idx)
    else:
        out = {name: make(name, f, np.arange(len(f["texts"]))) for name, f in files.items()}
    for name, split in out.items():
        if len(split) == 0:
            raise SherlError(f"data split '{name}' ({split.source}) has no rows after filtering; check the data section")
    if splits:
        unknown = [s for s in splits if s not in out]
        if unknown:
            raise SherlError(f"extract.splits: split '{unknown[0]}' is not in the data section (has: {', '.join(out)})")
        out = {s: out[s] for s in splits}
    return Dataset(task_type=cfg.task_type, label_names=label_names, splits=out)
