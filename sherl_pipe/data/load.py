"""Clean a labeled text file's rows (filter, de-duplicate, limit), map labels to ids, and split.

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
from sherl_pipe.data.read import Layout, check_texts, read_columns, rows_text
from sherl_pipe.data.split import split_indices
from sherl_pipe.errors import SherlError
from sherl_pipe.resources import resolve_data
from sherl_pipe.splits import NO_LABEL, SPLITS, UNLABELED



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


def layout_of(cfg: DataConfig) -> Layout:
    return Layout(fmt=cfg.format, encoding=cfg.encoding, header=cfg.header, quoting=cfg.quoting)


def _parse_float(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def label_key(value) -> str:
    """Class labels as strings, numbers canonical: 1, 1.0, "1" and "1.0" are the same class."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def _filter_rows(cfg: DataConfig, table: dict, n: int, path) -> list[int]:
    if not cfg.filter_column:
        return list(range(n))
    values = [_parse_float(v) for v in table[cfg.filter_column]]
    bad = [i for i, v in enumerate(values) if v is not None and math.isnan(v)]
    if bad:
        raise SherlError(f"data file {path}: column '{cfg.filter_column}' has non-numeric values in data rows "
                         f"{rows_text(bad)}; fix them or change data.filter_column")
    keep = [(cfg.filter_missing == "keep") if v is None else (cfg.filter_min is None or v >= cfg.filter_min)
            for v in values]
    rows = [i for i in range(n) if keep[i]]
    if n and not rows:
        raise SherlError(f"data file {path}: no rows left after filtering (data.filter_column '{cfg.filter_column}', "
                         f"data.filter_min {cfg.filter_min}, data.filter_missing '{cfg.filter_missing}')")
    return rows


def _clean_rows(cfg: DataConfig, table: dict, rows: list[int], path) -> list[int]:
    text_cols = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    for col in text_cols:
        check_texts(f"data file {path}", col, table[col], rows,
                    "; remove those rows from the file (data.filter_column filters on a numeric column)")
    if cfg.deduplicate:
        seen, unique = set(), []
        for i in rows:
            key = tuple(str(table[c][i]) for c in text_cols)
            if key not in seen:
                seen.add(key)
                unique.append(i)
        rows = unique
    return rows[: cfg.limit] if cfg.limit else rows


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _labels(cfg: DataConfig, raw: list, rows: list[int], path):
    missing = [rows[j] for j, v in enumerate(raw) if v is None or (isinstance(v, str) and not v.strip())]
    if missing:
        raise SherlError(f"data file {path}: column '{cfg.label_column}' is empty in data rows {rows_text(missing)}")
    if cfg.task_type == "classification":
        return [label_key(v) for v in raw]
    targets = [_parse_float(v) for v in raw]
    # stored as float32: a larger value would become inf there and train a NaN model without a word
    bad = [rows[j] for j, v in enumerate(targets) if not math.isfinite(v) or abs(v) > FLOAT32_MAX]
    if bad:
        raise SherlError(f"data file {path}: column '{cfg.label_column}' has values that are not finite numbers "
                         f"within float32's range (|x| <= 3.4e38) in data rows {rows_text(bad)} (task_type = "
                         f"'regression')")
    return np.asarray(targets, dtype=np.float32)


def load_file(cfg: DataConfig, source: str, labeled: bool = True) -> dict:
    """One file, filtered, de-duplicated and limited: a dict of parallel lists. Without LABELED,
    the label column is not read (data.unlabeled) and every row gets the placeholder label."""
    path = resolve_data(source)
    label = [cfg.label_column] if labeled else []
    cols = [cfg.text_column] + label + [c for c in (cfg.text_pair_column, cfg.filter_column) if c]
    table, n = read_columns(path, list(dict.fromkeys(cols)), layout_of(cfg))
    if n == 0:
        raise SherlError(f"data file {path}: has no data rows" + (" (only a header)" if cfg.header else ""))
    rows = _clean_rows(cfg, table, _filter_rows(cfg, table, n, path), path)
    return {
        "source": str(source),
        "path": path,
        "rows": np.asarray(rows, dtype=np.int64),
        "texts": [str(table[cfg.text_column][i]) for i in rows],
        "pairs": [str(table[cfg.text_pair_column][i]) for i in rows] if cfg.text_pair_column else None,
        "labels": _labels(cfg, [table[cfg.label_column][i] for i in rows], rows, path) if labeled else
        np.full(len(rows), NO_LABEL if cfg.task_type == "classification" else np.nan,
                dtype=np.int64 if cfg.task_type == "classification" else np.float32),
    }


def _label_ids(path, column: str, labels: list[str], rows: np.ndarray, names: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    bad = [j for j, v in enumerate(labels) if v not in index]
    if bad:
        unknown = sorted({labels[j] for j in bad})
        first = [int(rows[j]) for j in bad if labels[j] == unknown[0]]
        others = f" (and {len(unknown) - 1} other unknown label(s): {unknown[1:4]})" if len(unknown) > 1 else ""
        raise SherlError(f"data file {path}: column '{column}' has label {unknown[0]!r} that is not in "
                         f"data.label_names {names}, in data rows {rows_text(first)}{others}")
    return np.asarray([index[v] for v in labels], dtype=np.int64)


def _default_label_names(values: set[str]) -> list[str]:
    try:  # integer labels sort numerically, so 2 < 10
        return [str(v) for v in sorted(int(v) for v in values)]
    except ValueError:
        return sorted(values)


def map_labels(cfg: DataConfig, files: dict) -> list[str]:
    """Label names (given or the sorted distinct labels) and every file's labels as ids."""
    names = [label_key(n) for n in cfg.label_names] or _default_label_names(
        {v for name, f in files.items() if name != UNLABELED for v in f["labels"]})
    if len(names) < 2:
        raise SherlError(f"data column '{cfg.label_column}': classification needs at least 2 classes, found {names}")
    for name, f in files.items():
        if name != UNLABELED:
            f["labels"] = _label_ids(f["path"], cfg.label_column, f["labels"], f["rows"], names)
    return names


def _make_split(name: str, f: dict, idx) -> Split:
    return Split(name=name, source=f["source"], texts=[f["texts"][i] for i in idx],
                 pairs=None if f["pairs"] is None else [f["pairs"][i] for i in idx],
                 labels=f["labels"][idx], row_ids=f["rows"][idx])


def _make_splits(cfg: DataConfig, files: dict) -> dict[str, Split]:
    stratify = cfg.task_type == "classification"
    if cfg.source:
        f = files["*"]
        parts = split_indices(f["labels"], cfg.split_sizes, cfg.split_seed, stratify, f"data file {f['path']}",
                              "data.split_sizes", SPLITS)
        return {name: _make_split(name, f, idx) for name, idx in zip(SPLITS, parts) if len(idx)}
    out = {name: _make_split(name, f, np.arange(len(f["texts"]))) for name, f in files.items()}
    if cfg.validation_size:
        f = files["train"]
        n = len(f["texts"])
        size = cfg.validation_size
        count = int(math.floor(size * n)) if size < 1 else int(size)
        if not 0 < count < n:
            raise SherlError(f"data.validation_size = {size}: gives {count} of the {n} training rows of "
                             f"{f['path']} to validation; choose a size that leaves rows on both sides")
        val, train = split_indices(f["labels"], (count, n - count), cfg.split_seed, stratify,
                                   f"data file {f['path']}", "data.validation_size", ("validation", "train"))
        out = {"train": _make_split("train", f, train), "validation": _make_split("validation", f, val),
               **{k: v for k, v in out.items() if k != "train"}}
    return out


def _refuse_labels_unseen_in_training(splits: dict[str, Split], names: list[str]) -> None:
    if "train" not in splits:
        return
    seen = set(np.unique(splits["train"].labels).tolist())
    for name, split in splits.items():
        if name == UNLABELED:
            continue
        unseen = sorted(set(np.unique(split.labels).tolist()) - seen)
        if unseen:
            raise SherlError(f"data split '{name}' ({split.source}): label {names[unseen[0]]!r} does not occur in the "
                             f"training split ({len(splits['train'])} rows); a class with no training rows cannot be "
                             f"learned: remove those rows, or add training rows with that label")


def load_dataset(cfg: DataConfig, splits: tuple[str, ...] = ()) -> Dataset:
    """Every split the data section describes (or just `splits`), with labels mapped to ids."""
    cfg.require_input()
    names = ["*"] if cfg.source else [s for s in SPLITS if getattr(cfg, s)]
    files = {name: load_file(cfg, cfg.source if name == "*" else getattr(cfg, name)) for name in names}
    if cfg.unlabeled:
        files[UNLABELED] = load_file(cfg, cfg.unlabeled, labeled=False)
    label_names = map_labels(cfg, files) if cfg.task_type == "classification" else None
    unlabeled = files.pop(UNLABELED, None)
    out = _make_splits(cfg, files)
    if unlabeled is not None:
        out[UNLABELED] = _make_split(UNLABELED, unlabeled, np.arange(len(unlabeled["texts"])))
    if label_names:
        _refuse_labels_unseen_in_training(out, label_names)
    if splits:
        unknown = [s for s in splits if s not in out]
        if unknown:
            raise SherlError(f"extract.splits: split '{unknown[0]}' is not in the data section (has: {', '.join(out)})")
        out = {s: out[s] for s in splits}
    return Dataset(task_type=cfg.task_type, label_names=label_names, splits=out)
