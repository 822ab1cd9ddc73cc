"""Read a labeled text file (CSV, TSV, JSONL, Parquet), clean it and split it.

Every problem with the input is a `SherlError` naming the file, the column and the first offending
data rows (counted from 1, header excluded). Row ids kept with each sample are 0-based data rows of
the source file, so any cached sample can be traced back to its line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sherl_pipe.config import DataConfig
from sherl_pipe.errors import SherlError
from sherl_pipe.resources import resolve_data

SPLITS = ("train", "validation", "test")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


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


def rows_text(rows: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(r + 1) for r in rows[:limit])
    return shown + (f" (and {len(rows) - limit} more)" if len(rows) > limit else "")


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix.lower() in FORMATS:
        return FORMATS[path.suffix.lower()]
    raise SherlError(f"data file {path}: cannot tell the format from '{path.suffix}'; set data.format "
                     f"to one of csv, tsv, jsonl, parquet")


def read_columns(path: Path, fmt: str, encoding: str, columns: list[str]) -> dict[str, list]:
    """The named columns of a file, each a list with None for missing values."""
    if not path.is_file():
        raise SherlError(f"data file {path}: not found")
    fmt = detect_format(path, fmt)
    try:
        if fmt in ("csv", "tsv"):
            table = _read_delimited(path, fmt, encoding)
        elif fmt == "jsonl":
            table = _read_jsonl(path, encoding)
        else:
            table = _read_parquet(path, columns)
    except UnicodeDecodeError as exc:
        raise SherlError(f"data file {path}: not valid {encoding} text at byte {exc.start}; "
                         f"set data.encoding (for example latin-1)") from None
    header, rows = table
    missing = [c for c in columns if c not in header]
    if missing:
        raise SherlError(f"data file {path}: no column '{missing[0]}' (columns: {', '.join(map(str, header))}); "
                         f"set the data section's column names")
    return {c: rows[c] for c in columns}


def _read_delimited(path: Path, fmt: str, encoding: str):
    # GLUE-style TSV files are unquoted: a stray quote character is text, not a field delimiter.
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    with open(path, encoding=encoding, newline="") as f:
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",", quoting=quoting)
        header = next(reader, None)
        if header is None:
            raise SherlError(f"data file {path}: empty (no header row)")
        header = [h.strip() for h in header]
        cols = {h: [] for h in header}
        for row in reader:
            if not row:
                continue
            for i, h in enumerate(header):
                cols[h].append(row[i] if i < len(row) and row[i] != "" else None)
    return header, cols


def _read_jsonl(path: Path, encoding: str):
    records = []
    with open(path, encoding=encoding) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SherlError(f"data file {path}: line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise SherlError(f"data file {path}: line {lineno} is not a JSON object")
            records.append(rec)
    header = list(dict.fromkeys(k for rec in records for k in rec))
    return header, {h: [rec.get(h) for rec in records] for h in header}


def _read_parquet(path: Path, columns: list[str]):
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        present = [c for c in columns if c in schema.names]
        table = pq.read_table(path, columns=present)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise SherlError(f"data file {path}: cannot read as Parquet ({exc})") from None
    return schema.names, {c: table.column(c).to_pylist() for c in present}


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


def _split_indices(labels, sizes: tuple[float, ...], seed: int, stratify: bool, where: str) -> list[np.ndarray]:
    n = len(labels)
    if all(float(s).is_integer() and s >= 1 or s == 0 for s in sizes):
        counts = [int(s) for s in sizes]
    elif all(0 <= s < 1 for s in sizes) and sum(sizes) <= 1 + 1e-9:
        counts = [int(math.floor(s * n)) for s in sizes]
    else:
        raise SherlError(f"data.split_sizes {list(sizes)}: give three counts (>= 1) or three fractions that sum to at most 1")
    if sum(counts) > n:
        raise SherlError(f"data.split_sizes {list(sizes)}: asks for {sum(counts)} rows but {where} has {n} "
                         f"after filtering and de-duplication; lower the sizes")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(np.asarray(labels) == c) for c in sorted(set(labels))] if stratify else [np.arange(n)]
    groups = [rng.permutation(g) for g in groups]
    taken = np.zeros(len(groups), dtype=np.int64)
    out = []
    for count in counts:
        # Largest-remainder allocation keeps every split's class mix close to the whole file's.
        avail = np.array([len(g) - t for g, t in zip(groups, taken)], dtype=np.float64)
        share = count * avail / max(avail.sum(), 1)
        alloc = np.minimum(np.floor(share).astype(np.int64), avail.astype(np.int64))
        for j in np.argsort(-(share - alloc), kind="stable"):
            if alloc.sum() >= count:
                break
            if alloc[j] < avail[j]:
                alloc[j] += 1
        idx = np.concatenate([g[t:t + a] for g, t, a in zip(groups, taken, alloc)])
        taken += alloc
        out.append(np.sort(idx))
    return out


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
        parts = _split_indices(f["labels"], cfg.split_sizes, cfg.split_seed,
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
