"""evaluate on a cached split; run folders that are broken or foreign; the CLI around them.
Predict against evaluate: test_predict.py."""

import csv
import shutil

import pytest
from click.testing import CliRunner

from conftest import make_backbone, make_text_file
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.evaluation import evaluate
from sherl_pipe.prediction import predict
from sherl_pipe.extraction import extract
from sherl_pipe.training import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bert_dir):
    """A run trained on per-split files (fp16 cache), so each split has its own source file."""
    root = tmp_path_factory.mktemp("trained")
    files = {s: make_text_file(root / f"{s}.csv", n=n, seed=i) for i, (s, n) in
             enumerate([("train", 160), ("validation", 40), ("test", 48)])}
    path = root / "p.toml"
    path.write_text(f"""
[data]
train = "{files['train']}"
validation = "{files['validation']}"
test = "{files['test']}"
[backbone]
source = "{bert_dir}"
max_length = 24
[extract]
cache = "{root / 'cache'}"
chunk_size = 16
[train]
run_dir = "{root / 'run'}"
late_layers = 1
epochs = 3
batch_size = 8
threads = 1
""")
    pipe = load_pipeline(str(path))
    extract(pipe)
    train(pipe, log=lambda m: None)
    return root, files, pipe


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_broken_and_foreign_run_folders(trained, tmp_path):
    root, files, pipe = trained
    with pytest.raises(SherlError, match=r"run folder .*nope: not found"):
        evaluate(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(root / "run", broken)
    (broken / "model.json").unlink()
    with pytest.raises(SherlError, match=r"missing model.json; not a sherl-pipe run folder"):
        evaluate(broken)
    shutil.copy(root / "run" / "model.json", broken / "model.json")
    (broken / "checkpoints" / "best.safetensors").unlink()
    with pytest.raises(SherlError, match=r"best.safetensors: not found; .*use --checkpoint last"):
        evaluate(broken)
    (broken / "checkpoints" / "last.safetensors").unlink()
    with pytest.raises(SherlError, match=r"last.safetensors: not found; .*use --checkpoint best"):
        evaluate(broken, checkpoint="last")
    # a run whose cache was made from another backbone
    other = make_backbone(tmp_path / "other", "bert", seed=9)
    foreign_pipe = pipe.with_overrides("backbone", source=str(other)).with_overrides(
        "extract", cache=str(tmp_path / "other-cache"))
    extract(foreign_pipe)
    with pytest.raises(SherlError, match=r"was trained on another cache"):
        evaluate(root / "run", cache_path=str(tmp_path / "other-cache"))
    with pytest.raises(SherlError, match=r"module\(s\) embeddings, layer.0, layer.1 differ"):
        predict(root / "run", str(files["test"]), str(tmp_path / "p.csv"), backbone_source=str(other))
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood,pos\n,neg\n")
    with pytest.raises(SherlError, match=r"column 'text' is empty in data rows 2"):
        predict(root / "run", str(bad), str(tmp_path / "p.csv"))
    assert not (tmp_path / "p.csv").exists()


def test_cli_train_evaluate_predict(trained, tmp_path):
    root, files, pipe = trained
    runner = CliRunner()
    pipe_file = root / "p.toml"
    r = runner.invoke(main, ["train", str(pipe_file), "--run-dir", str(tmp_path / "run"), "--epochs", "1", "-q"])
    assert r.exit_code == 0, r.output
    assert "best on validation" in r.stdout and " 1 epoch, " in r.stdout
    r = runner.invoke(main, ["train", str(pipe_file), "--run-dir", str(tmp_path / "run"), "-q"])
    assert r.exit_code == 2 and "already exists; use --resume" in r.stderr
    r = runner.invoke(main, ["evaluate", str(tmp_path / "run"), "--split", "validation"])
    assert r.exit_code == 0 and "validation (40 rows" in r.stdout and "majority-class baseline" in r.stdout
    r = runner.invoke(main, ["evaluate", str(tmp_path / "run"), "--split", "dev"])
    assert r.exit_code == 2 and "no split 'dev'" in r.stderr
    r = runner.invoke(main, ["predict", str(tmp_path / "run"), "--input", str(files["test"]),
                             "--output", str(tmp_path / "o.csv")])
    assert r.exit_code == 0 and "wrote 48 predictions" in r.stdout
    written = (tmp_path / "o.csv").read_bytes()
    for args, message in [(["o.csv"], "o.csv: exists; use --overwrite to replace it"),
                          (["o4.csv", "--text-pair-column", "text"], "--text-pair-column text: the run was trained on "
                                                                     "single texts")]:
        r = runner.invoke(main, ["predict", str(tmp_path / "run"), "--input", str(files["test"]),
                                 "--output", str(tmp_path / args[0]), *args[1:]])
        assert r.exit_code == 2 and message in r.stderr, r.output
    assert (tmp_path / "o.csv").read_bytes() == written and not (tmp_path / "o4.csv").exists()
    r = runner.invoke(main, ["predict", str(tmp_path / "run"), "--input", str(files["test"]),
                             "--output", str(tmp_path / "o.csv"), "--overwrite"])
    assert r.exit_code == 0 and "wrote 48 predictions" in r.stdout
    r = runner.invoke(main, ["predict", str(tmp_path / "run"), "--input", str(files["test"]),
                             "--output", str(files["test"]), "--overwrite"])  # the input itself: never
    assert r.exit_code == 2 and "is the input file" in r.stderr, r.output
    r = runner.invoke(main, ["predict", str(tmp_path / "run"), "--input", str(tmp_path / "none.csv"),
                             "--output", str(tmp_path / "o2.csv")])
    assert r.exit_code == 2 and "not found" in r.stderr
    r = runner.invoke(main, ["predict", str(tmp_path / "run"), "--input", str(files["test"]),
                             "--output", str(tmp_path / "nowhere" / "o3.csv")])
    assert r.exit_code == 2 and f"folder {tmp_path / 'nowhere'} does not exist" in r.stderr
    assert not (tmp_path / "nowhere").exists()


def test_cli_run_reuses_a_matching_cache(trained, tmp_path):
    root, files, pipe = trained
    r = CliRunner().invoke(main, ["run", str(root / "p.toml"), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
                                  "-q"])
    assert r.exit_code == 0, r.output
    assert ": already complete" in r.stdout and "nothing to do" in r.stdout
    assert "test (48 rows" in r.stdout
