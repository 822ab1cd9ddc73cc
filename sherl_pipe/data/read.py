"""Reading a labeled text file (CSV, TSV, JSONL, Parquet) into columns.

Every problem with the input is a `SherlError` naming the file and the column. Data rows are
counted from 1 in messages, header excluded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sherl_pipe.errors import SherlError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


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
