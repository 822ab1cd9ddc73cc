"""Reading a labeled text file (CSV, TSV, JSONL, Parquet) into columns.

Every problem with the input is a `SherlError` naming the file and what to set. The same reader
serves the pipeline's data section and `predict`'s input, so its messages name the setting the
way the caller spells it (`data.encoding` or `--encoding`): see `Names`. Data rows are counted
from 1 in messages, header excluded.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
from dataclasses import dataclass
from pathlib import Path

from sherl_pipe.errors import SherlError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16")]


@dataclass(frozen=True)
class Names:
    """How the reader's settings are spelled where the user sets them."""

    encoding: str = "data.encoding"
    format: str = "data.format"
    columns: str = "the data section's column names (data.text_column, data.label_column, ...)"
    quoting: str = "data.quoting"


PIPELINE = Names()


@dataclass(frozen=True)
class Layout:
    """How to read a delimited file: its header, its quoting, its encoding."""

    fmt: str = "auto"
    encoding: str = "utf-8"
    header: bool = True
    quoting: str = "auto"  # auto (CSV: csv, TSV: none), none, csv


def rows_text(rows: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(r + 1) for r in rows[:limit])
    return shown + (f" (and {len(rows) - limit} more)" if len(rows) > limit else "")


def _not_text(value) -> str | None:
    """What VALUE is if it cannot stand for a text (None is empty, not this)."""
    if value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool)):
        return None
    return {list: "a list", dict: "an object", bool: "a true/false value", bytes: "bytes"}.get(
        type(value), f"a {type(value).__name__}")


def check_texts(where: str, col: str, values: list, rows, hint: str = "") -> None:
    """Every value in ROWS a non-empty text. A number counts (a CSV cannot tell "42" from 42); a
    JSONL or Parquet list, object, boolean or bytes does not: str() of it would be fed to the model
    as if it were the text (a pre-tokenized row read as "['a', 'good', 'film']")."""
    not_text = [i for i in rows if _not_text(values[i])]
    if not_text:
        first = not_text[0]
        raise SherlError(f"{where}: column '{col}' holds values that are not text in data rows {rows_text(not_text)} "
                         f"(row {first + 1}: {_not_text(values[first])}); store each text as one string")
    empty = [i for i in rows if values[i] is None or not str(values[i]).strip()]
    if empty:
        raise SherlError(f"{where}: column '{col}' is empty in data rows {rows_text(empty)}{hint}")


def detect_format(path: Path, fmt: str, names: Names) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix.lower() in FORMATS:
        return FORMATS[path.suffix.lower()]
    raise SherlError(f"data file {path}: cannot tell the format from '{path.suffix}'; set {names.format} "
                     f"to one of csv, tsv, jsonl, parquet")


def check_encoding(encoding: str, where: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise SherlError(f"{where} = '{encoding}' is not an encoding Python knows; use for example utf-8, "
                         f"latin-1 or utf-16") from None


def text_encoding(path: Path, encoding: str, names: Names) -> str:
    """The encoding to open a text file with, after a look at its first bytes: a UTF-16/32 file
    read as anything else, or a binary file, is refused with what it is; a UTF-8 byte-order mark
    is dropped."""
    check_encoding(encoding, names.encoding)
    with open(path, "rb") as f:
        head = f.read(8192)
    name = codecs.lookup(encoding).name
    for bom, family in BOMS:
        if head.startswith(bom) and not name.startswith(family):
            raise SherlError(f"data file {path}: is {family.upper()} (it starts with a byte-order mark); set "
                             f"{names.encoding} = '{family}'")
    if b"\x00" in head and not name.startswith(("utf-16", "utf-32")):
        raise SherlError(f"data file {path}: looks like a binary file (it holds NUL bytes), not text; give a "
                         f"CSV, TSV, JSONL or Parquet file (or set {names.format})")
    if name == "utf-8" and head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    return encoding


def read_columns(path: Path, columns: list[str], layout: Layout = Layout(), names: Names = PIPELINE
                 ) -> tuple[dict[str, list], int]:
    """The named columns of a file, each a list with None for missing values, and the row count."""
    if not path.is_file():
        raise SherlError(f"data file {path}: not found" + ("; it is a folder" if path.is_dir() else ""))
    fmt = detect_format(path, layout.fmt, names)
    try:
        if fmt in ("csv", "tsv"):
            header, cols = _read_delimited(path, fmt, layout, names)
        elif fmt == "jsonl":
            header, cols = _read_jsonl(path, text_encoding(path, layout.encoding, names))
        else:
            header, cols = _read_parquet(path, columns)
    except UnicodeDecodeError as exc:
        raise SherlError(f"data file {path}: not valid {layout.encoding} text at byte {exc.start}; "
                         f"set {names.encoding} (for example latin-1)") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise SherlError(f"data file {path}: no column '{missing[0]}' (columns: {', '.join(map(str, header))}); "
                         f"set {names.columns}" + _header_hint(header, fmt, layout))
    n = len(cols[columns[0]]) if columns else 0
    return {c: cols[c] for c in columns}, n


def _looks_like_data(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return len(cell) > 40 or cell.count(" ") >= 4


def _header_hint(header: list[str], fmt: str, layout: Layout) -> str:
    if fmt not in ("csv", "tsv") or not layout.header or not any(_looks_like_data(h) for h in header):
        return ""
    first = "\t".join(header) if fmt == "tsv" else ",".join(header)
    return (f". Its first row ({first[:60]!r}) looks like data, not a header: if the file has no header row, "
            f"set data.header = false and name columns by 0-based position (0 to {len(header) - 1})")


def _quoting(fmt: str, quoting: str) -> int:
    # GLUE-style TSV files are unquoted: a quote character is text, not a field delimiter.
    if quoting == "auto":
        quoting = "none" if fmt == "tsv" else "csv"
    return csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL


@contextlib.contextmanager
def _long_fields():
    """csv refuses a field over 128 KiB ("field larger than field limit"): a long document is a
    text like any other (truncated to max_length when tokenized). The limit is the csv module's
    one global setting, so it is restored on the way out."""
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read_delimited(path: Path, fmt: str, layout: Layout, names: Names):
    encoding = text_encoding(path, layout.encoding, names)
    with open(path, encoding=encoding, newline="") as f, _long_fields():
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",", quoting=_quoting(fmt, layout.quoting))
        rows = [row for row in reader if row]
    if not rows and layout.header:
        raise SherlError(f"data file {path}: empty (no header row)")
    if layout.header:
        header, rows = [h.strip() for h in rows[0]], rows[1:]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise SherlError(f"data file {path}: column name(s) {', '.join(map(repr, repeated))} appear more than "
                             f"once in the header; rename them so each column has its own name"
                             + _header_hint(header, fmt, layout))
    else:
        header = [str(i) for i in range(len(rows[0]) if rows else 0)]
    long = [i for i, row in enumerate(rows) if len(row) > len(header)]
    if long:
        raise SherlError(f"data file {path}: data rows {rows_text(long)} have more fields than the header "
                         f"({len(header)}): a text holding an unquoted delimiter? quote such fields (or set "
                         f"{names.quoting} to match how the file quotes them)")
    cols = {h: [row[i] if i < len(row) and row[i] != "" else None for row in rows] for i, h in enumerate(header)}
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
