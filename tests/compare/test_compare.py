"""sherl-pipe compare: methods x seeds as trials of the sweep engine, each in a process of its own,
at equal epochs or at full fine-tuning's time; compare.csv, compare.md, the plots, and a report
rebuilt from the folder."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from conftest import make_backbone, write_full_pipeline
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.extraction import extract
from toy_method import Toy  # a method from a test file, as a user registers one


@pytest.fixture(scope="module")
def compare_pipeline(tmp_path_factory, labeled_csv):
    root = tmp_path_factory.mktemp("compare")
    backbone = make_backbone(root / "backbone", "bert", dropout=0.0)
    path = write_full_pipeline(root / "p.toml", backbone, labeled_csv, root / "cache", root / "run",
                               'dtype = "float32"\nlate_layers = 0', 'epochs = 1\neval_split = "validation"')
    extract(load_pipeline(str(path)))
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_compare_at_equal_epochs_writes_the_table_and_the_pictures(tmp_path, compare_pipeline):
    out = tmp_path / "cmp"
    args = ["compare", str(compare_pipeline), "-q", "--methods", "sherl,linear-probe,full-finetune", "--seeds", "2",
            "--live-seeds", "1", "--compare-dir", str(out), "--workers", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rows = read_csv(out / "compare.csv")
    assert [(x["method"], x["seed"]) for x in rows] == [("sherl", "0"), ("sherl", "1"), ("linear-probe", "0"),
                                                        ("linear-probe", "1"), ("full-finetune", "0")]
    for x in rows:
        assert x["state"] == "complete" and 0 <= float(x["test"]) <= 1 and x["epochs"] == "1"
        assert float(x["seconds"]) > 0 and float(x["peak_mib"]) >= 0 and x["batch"]
    size = {x["method"]: int(x["trainable_parameters"]) for x in rows}
    assert size["linear-probe"] < size["sherl"] < size["full-finetune"]
    state = {x["method"]: float(x["state_mib"]) for x in rows}
    assert state["linear-probe"] < state["full-finetune"] and state["sherl"] < state["full-finetune"]
    table = (out / "compare.md").read_text()
    assert "| sherl | 2 |" in table and "− full-finetune (95%: seeds and test rows)" in table
    assert "| full-finetune | 1 |" in table and "(no interval: needs 2+ seeds each)" in table  # one FT seed
    assert "| sherl | 2 |" in r.stdout
    for name in ("accuracy_vs_memory.png", "accuracy_vs_time.png"):
        assert (out / name).stat().st_size > 1000
    # the test metric is the best epoch's, on the evaluate split, as `sherl-pipe evaluate` gives it
    first = json.loads((out / "final" / "jobs" / "0000" / "result.json").read_text())  # sherl, seed 0: asked first
    assert first["test"]["metrics"]["accuracy"] == pytest.approx(float(rows[0]["test"]), abs=1e-6)
    # keep = "best" (the default): a scored trial keeps its best weights, metrics and summary only
    for trial in (out / "final" / "trials").iterdir():
        assert sorted(p.name for p in (trial / "checkpoints").iterdir()) == ["best.safetensors"]
        assert (trial / "summary.json").is_file() and (trial / "metrics.jsonl").is_file()
    (out / "compare.md").unlink()
    r = CliRunner().invoke(main, ["compare-report", str(out)])
    assert r.exit_code == 0 and (out / "compare.md").read_text() == table
    again = CliRunner().invoke(main, args)  # resumed: nothing left to run, the same table
    assert again.exit_code == 0 and (out / "compare.md").read_text() == table


@pytest.mark.slow
def test_compare_at_equal_time_gives_each_method_the_epochs_that_fit(tmp_path, compare_pipeline):
    """The calibration times 3 epochs of each other method (the first, with its warm-up, apart) one
    trial at a time; the final runs stop at the budget (train.max_seconds) and report their share
    of it. (Old code: one calibration epoch, warm-up included; no stop; trials side by side.)"""
    from sherl_pipe.compare import compare
    from sherl_pipe.compare.run import CALIBRATION_EPOCHS, epochs_that_fit

    pipe = load_pipeline(str(compare_pipeline), ["train.epochs=2"])
    said = []
    out = compare(pipe, ["sherl"], seeds=1, budget="time", compare_dir=str(tmp_path / "cmp"), workers=2,
                  log=said.append)
    plan = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert plan["methods"] == ["sherl", "full-finetune"] and plan["epochs"]["full-finetune"] == 2
    calib = {}
    for job in (tmp_path / "cmp" / "calibrate" / "jobs").iterdir():
        method = json.loads((job / "spec.json").read_text())["pipeline"]["train"]["method"]
        calib[method] = json.loads((job / "result.json").read_text())
    assert len(calib["sherl"]["epoch_seconds"]) == CALIBRATION_EPOCHS == calib["sherl"]["epochs"]
    assert plan["budget_seconds"] == calib["full-finetune"]["train_seconds"]
    assert plan["epochs"]["sherl"] == epochs_that_fit(plan["budget_seconds"], calib["sherl"])
    (final,) = (tmp_path / "cmp" / "final" / "jobs").iterdir()
    spec = json.loads((final / "spec.json").read_text())
    assert spec["pipeline"]["train"]["max_seconds"] == plan["budget_seconds"]  # the budget is enforced
    assert sum("one at a time (timed)" in m for m in said) == 2, said  # calibrate and final
    rows = {x["method"]: x for x in out["rows"]}
    assert rows["sherl"]["epochs"] <= plan["epochs"]["sherl"] and rows["full-finetune"]["epochs"] == 2
    for row in rows.values():
        assert row["budget_share"] == pytest.approx(row["seconds"] / plan["budget_seconds"])
    assert "× budget" in out["markdown"] and f"of {plan['budget_seconds']:.1f} s" in out["markdown"]
    csv_rows = read_csv(tmp_path / "cmp" / "compare.csv")
    assert all(x["budget_share"] for x in csv_rows)


def test_epochs_that_fit_leave_the_first_epochs_warm_up_out():
    from sherl_pipe.compare.run import MAX_EPOCHS, epochs_that_fit

    # the first epoch took 10 s (warm-up), later ones 4 s: 10 + 4 + 4 + 4 = 22 fit in 23 s
    assert epochs_that_fit(23.0, {"epoch_seconds": [10.0, 14.0, 18.0], "train_seconds": 18.0}) == 4
    assert epochs_that_fit(9.0, {"epoch_seconds": [10.0, 14.0, 18.0], "train_seconds": 18.0}) == 1
    assert epochs_that_fit(1e6, {"epoch_seconds": [1.0, 2.0, 3.0], "train_seconds": 3.0}) == MAX_EPOCHS
    # a calibration run from an earlier compare folder: one epoch, its whole time
    assert epochs_that_fit(30.0, {"epochs": 1, "train_seconds": 7.0}) == 4


def test_a_killed_phase_reruns_the_trials_it_left_running(tmp_path):
    """A compare killed while trials ran that had not drawn their parameters yet: resumed, those
    trials were counted as held and never ran again, and the phase filled its count with sampled
    settings (another method, seed or rate) in their place."""
    from types import SimpleNamespace

    from optuna.trial import TrialState

    from sherl_pipe.compare.phase import open_phase
    from sherl_pipe.config import load_pipeline

    c = SimpleNamespace(pipeline=load_pipeline("quickstart"), metric="accuracy", direction="maximize", rates={})
    planned = [{"method": m, "seed": s, "epochs": 3, "lr": 0.001, "lr_late": 0.0} for m in ("sherl", "linear-probe")
               for s in (0, 1)]
    study, _ = open_phase(c, tmp_path, planned)
    running = study.ask()  # taken from the queue; killed before it drew its parameters
    study, _ = open_phase(c, tmp_path, planned)  # the rerun
    assert study.get_trials(deepcopy=False)[running.number].state == TrialState.FAIL
    waiting = [t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    assert sorted(map(str, waiting)) == sorted(map(str, planned))


def _planned(compare_pipeline, tmp_path, overrides=(), budget="epochs", tune_lr=False):
    from sherl_pipe.cache import Cache
    from sherl_pipe.compare.run import plan_compare

    pipe = load_pipeline(str(compare_pipeline), list(overrides))
    manifest = Cache(pipe.extract.cache).manifest
    c = plan_compare(pipe, ["sherl", "linear-probe", "full-finetune"], 1, None, budget, tune_lr,
                     str(tmp_path / "cmp"), manifest)
    c.epochs = {m: 2 for m in c.methods}  # as the budget would set them
    return c


def test_compare_trains_at_the_rates_the_pipeline_sets(tmp_path, compare_pipeline):
    """train.lr and train.lr_late in the pipeline (or --set) were overwritten by every method's
    default rate in each trial: a user's rates were dropped without a word."""
    from sherl_pipe.compare.run import final_trials

    c = _planned(compare_pipeline, tmp_path, ["train.lr=0.002", "train.lr_late=7e-05"])
    assert {(t["method"], t["lr"], t["lr_late"]) for t in final_trials(c)} == {
        ("sherl", 0.002, 7e-05), ("linear-probe", 0.002, 7e-05), ("full-finetune", 0.002, 7e-05)}
    c = _planned(compare_pipeline, tmp_path, ["train.late_tuning=full"])  # 0: each method's own rates
    assert {(t["method"], t["lr"], t["lr_late"]) for t in final_trials(c)} == {
        ("sherl", 1e-3, 3e-5), ("linear-probe", 1e-3, 0.0), ("full-finetune", 1e-3, 3e-5)}


def test_tune_lr_scales_the_pretrained_rate_too(tmp_path, compare_pipeline):
    """--tune-lr tried x 1/3, x 1, x 3 of train.lr only: for full fine-tuning that is its head's rate,
    never the rate of the 22 M weights it tunes (lr_late), so its search changed next to nothing."""
    from sherl_pipe.compare.run import tune_trials

    c = _planned(compare_pipeline, tmp_path, tune_lr=True)
    ft = sorted((t["lr"], t["lr_late"]) for t in tune_trials(c) if t["method"] == "full-finetune")
    assert [x for pair in ft for x in pair] == pytest.approx([1e-3 / 3, 1e-5, 1e-3, 3e-5, 3e-3, 9e-5])


def test_at_equal_time_a_tuned_full_finetune_runs_again_at_its_tuned_rates(tmp_path, compare_pipeline):
    """With --budget time --tune-lr, full fine-tuning's results were its calibration runs at the
    default rates whatever its search found, while every other method trained at its tuned rates."""
    from sherl_pipe.compare.run import final_trials

    c = _planned(compare_pipeline, tmp_path, budget="time", tune_lr=True)
    assert "full-finetune" not in {t["method"] for t in final_trials(c)}  # its calibration runs are its results
    c.tuned_rates = {"full-finetune": (1e-3, 9e-5)}
    assert [(t["method"], t["lr_late"]) for t in final_trials(c) if t["method"] == "full-finetune"] == [
        ("full-finetune", 9e-5)]


@pytest.mark.slow
def test_tune_lr_at_equal_time_reports_every_method_at_its_chosen_rates(tmp_path, compare_pipeline):
    from sherl_pipe.compare import compare

    pipe = load_pipeline(str(compare_pipeline), ["train.epochs=1"])
    out = compare(pipe, ["sherl"], seeds=1, budget="time", tune_lr=True, compare_dir=str(tmp_path / "cmp"),
                  workers=2, log=lambda m: None)
    plan = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    tune = read_csv_rows_of_phase(tmp_path / "cmp" / "tune")
    want = sorted((m, plan["rates"][m][0] * f, plan["rates"][m][1] * f) for m in plan["methods"] for f in (1 / 3, 1, 3))
    assert [t[0] for t in sorted(tune)] == [w[0] for w in want]
    assert [x for t in sorted(tune) for x in t[1:]] == pytest.approx([x for w in want for x in w[1:]])
    assert plan["rates"]["full-finetune"] == [1e-3, 3e-5]  # its pretrained rate is searched, not its head's only
    rows = read_csv(tmp_path / "cmp" / "compare.csv")
    assert sorted(x["method"] for x in rows) == ["full-finetune", "sherl"]  # one row each, never a duplicate
    for x in rows:  # each at the rates its search chose, full fine-tuning too
        assert [float(x["lr"]), float(x["lr_late"])] == pytest.approx(plan["tuned_rates"][x["method"]])
    assert len(out["rows"]) == 2
    # the final phase's runs stop at the budget, full fine-tuning's own excepted: its time is the budget
    for job in (tmp_path / "cmp" / "final" / "jobs").iterdir():
        train = json.loads((job / "spec.json").read_text())["pipeline"]["train"]
        assert train["max_seconds"] == (0.0 if train["method"] == "full-finetune" else plan["budget_seconds"])


def read_csv_rows_of_phase(folder):
    from sherl_pipe.compare.phase import results_of
    from sherl_pipe.engine.study import load_study

    return [(r["method"], r["lr"], r["lr_late"]) for r in results_of(load_study(folder), folder)]


def test_a_compare_folder_from_before_lr_late_resumes_without_running_its_trials_again(tmp_path, monkeypatch):
    """Its trials hold (method, seed, epochs, lr): they trained at the method's pretrained rate, so
    they count as the same trials now that lr_late is a trial parameter too, and still report."""
    from types import SimpleNamespace

    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    from sherl_pipe.compare import phase
    from sherl_pipe.compare.phase import EARLIER_KEYS, open_phase, results_of

    c = SimpleNamespace(pipeline=load_pipeline("quickstart"), metric="accuracy", direction="maximize", rates={})
    earlier = {"method": "sherl", "seed": 0, "epochs": 3, "lr": 0.001}
    with monkeypatch.context() as m:
        m.setattr(phase, "KEYS", EARLIER_KEYS)  # the earlier version's study
        study, _ = open_phase(c, tmp_path, [earlier])
    t = study.ask({k: CategoricalDistribution([earlier[k]]) for k in EARLIER_KEYS})
    study.tell(t, 0.8)
    c.rates = {"sherl": (0.001, 3e-5)}
    study, _ = open_phase(c, tmp_path, [{**earlier, "lr_late": 3e-5}])
    assert not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [r["lr_late"] for r in results_of(study, tmp_path, c.rates)] == [3e-5]
    assert [r.get("lr_late") for r in results_of(study, tmp_path)] == [None]  # compare-report: a blank cell


def test_a_compare_whose_test_rows_would_choose_is_refused(tmp_path, compare_pipeline):
    """train.eval_split = evaluate.split: the test split would pick each run's best epoch, early
    stopping and --tune-lr's rates, and then score them; one line naming both keys, no folder."""
    from conftest import one_error_line

    r = CliRunner().invoke(main, ["compare", str(compare_pipeline), "-q", "--methods", "linear-probe",
                                  "--compare-dir", str(tmp_path / "cmp"), "--set", "train.eval_split=test"])
    one_error_line(r, "train.eval_split = 'test'", "evaluate.split = 'test'", "validation split")
    assert not (tmp_path / "cmp").exists()


def test_an_empty_methods_list_is_refused_not_read_as_every_method(tmp_path, compare_pipeline):
    """`--methods ''` ran every registered method (and then failed on one never named)."""
    from conftest import one_error_line

    r = CliRunner().invoke(main, ["compare", str(compare_pipeline), "-q", "--methods", "",
                                  "--compare-dir", str(tmp_path / "cmp")])
    one_error_line(r, "--methods: name at least one method")
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_a_method_registered_from_code_is_compared(tmp_path, compare_pipeline, monkeypatch):
    """register_method("mean-of-two", Toy) then compare: each job (a process of its own) gets the
    method by its import path (old code: every trial failed, 'Object of type type is not JSON
    serializable'); a class no job could import is refused before any trial."""
    from sherl_pipe.methods import REGISTRY

    monkeypatch.setitem(REGISTRY, "mean-of-two", Toy)  # register_method (of a test file's class), undone after
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["compare", str(compare_pipeline), "-q", "--methods", "mean-of-two,linear-probe",
                                  "--seeds", "1", "--compare-dir", str(out), "--workers", "1"])
    assert r.exit_code == 0, r.output
    rows = {x["method"]: x for x in read_csv(out / "compare.csv")}
    assert rows["mean-of-two"]["state"] == "complete" and 0 <= float(rows["mean-of-two"]["test"]) <= 1
    assert float(rows["mean-of-two"]["lr"]) == 2e-3

    def local():
        class Hidden(Toy):
            pass
        return Hidden

    monkeypatch.setitem(REGISTRY, "hidden", local())
    r = CliRunner().invoke(main, ["compare", str(compare_pipeline), "-q", "--methods", "hidden",
                                  "--compare-dir", str(tmp_path / "no")])
    from conftest import one_error_line

    one_error_line(r, "cannot import", "define it at the top level of a module")
    assert not (tmp_path / "no").exists()


def test_a_table_missing_a_requested_method_says_so():
    """Old code: failed rows were left out of compare.md without a word."""
    from sherl_pipe.compare.report import missing

    plan = {"methods": ["sherl", "lst", "unipt"]}
    rows = [{"method": "sherl", "state": "complete"}, {"method": "lst", "state": "fail", "error": "RuntimeError: boom"},
            {"method": "lst", "state": "fail", "error": "RuntimeError: boom"}]
    lines = missing(plan, rows)
    assert lines[1].startswith("- **lst is not in this table**: 2 run(s) failed, the first with: RuntimeError: boom")
    assert "--retry-failed" in lines[1]
    assert lines[2].startswith("- **unipt is not in this table**: no run of it has finished yet")
    assert missing(plan, rows + [{"method": m, "state": "complete"} for m in ("lst", "unipt")]) == []


def test_compare_without_methods_takes_those_the_cache_serves(tmp_path, labeled_csv, monkeypatch):
    """The quickstart's cache stops below the last tier, which UniPT and the probes read: a first
    `compare` without --methods was refused. Now it compares the methods the cache serves and says
    which it left out and why; a method named with --methods that the cache cannot serve is still
    refused."""
    import sherl_pipe.compare as compare_module
    from conftest import one_error_line

    root = tmp_path
    backbone = make_backbone(root / "backbone", "bert", dropout=0.0)
    path = write_full_pipeline(root / "p.toml", backbone, labeled_csv, root / "cache", root / "run",
                               'dtype = "float32"\nlate_layers = 1', 'epochs = 1\neval_split = "validation"')
    asked = []

    def fake_compare(pipe, names, *args, **kwargs):
        asked.append(list(names))
        return {"interrupted": False, "markdown": "| table |", "folder": root / "cmp"}

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    r = CliRunner().invoke(main, ["compare", str(path), "-q", "--compare-dir", str(root / "cmp")])
    assert r.exit_code == 0, r.output
    # unipt, lst and the probes read h[L]; SHERL's accuracy preset (2 of the 3 layers) reads h[0] and h[1]
    assert asked == [["sherl", "sherl:preset=accuracy", "swr", "lora-finetune", "full-finetune"]]
    assert "compare: left out unipt, lst, linear-probe, scalar-mix: " in r.stderr and "extract.late_layers = 0" in r.stderr
    r = CliRunner().invoke(main, ["compare", str(path), "-q", "--methods", "unipt",
                                  "--compare-dir", str(root / "cmp2")])
    one_error_line(r)
    assert len(asked) == 1


def test_retry_failed_queues_a_phases_failed_trials_again(tmp_path):
    """compare --retry-failed: a trial that failed is queued again when its phase reopens (without
    the flag a resumed phase leaves it failed)."""
    from types import SimpleNamespace

    from optuna.trial import TrialState

    from sherl_pipe.compare.phase import open_phase
    from sherl_pipe.engine.study import first_cause, record_error

    c = SimpleNamespace(pipeline=load_pipeline("quickstart"), metric="accuracy", direction="maximize", rates={},
                        retry_failed=False)
    planned = [{"method": "sherl", "seed": 0, "epochs": 3, "lr": 0.001, "lr_late": 0.0}]
    study, _ = open_phase(c, tmp_path, planned)
    trial = study.ask()
    record_error(tmp_path, trial.number, "RuntimeError: the cache's chunk is damaged")
    study.tell(trial.number, state=TrialState.FAIL)

    def waiting(study):
        return [t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]

    assert waiting(open_phase(c, tmp_path, planned)[0]) == []
    c.retry_failed = True
    other = [{**planned[0], "seed": 1}]  # a phase planned without the failed trial: it is left as it is
    assert waiting(open_phase(c, tmp_path, other)[0]) == other
    assert not (tmp_path / "trials" / "0000" / "error.txt").read_text().startswith("retried: ")
    assert waiting(open_phase(c, tmp_path, planned)[0]) == other + planned
    text = (tmp_path / "trials" / "0000" / "error.txt").read_text()
    assert text.startswith("retried: ") and first_cause(text) == "RuntimeError: the cache's chunk is damaged (retried)"


def test_methods_registered_as_import_paths_or_nested_classes_reach_the_jobs(monkeypatch):
    """register_method("name", "module:Class") was never sent to workers or compare jobs (only
    classes were), and a nested class (Outer.Inner) passed the check but failed in every job."""
    from sherl_pipe.compare.run import check_importable
    from sherl_pipe.compare.trial import method_reference
    from sherl_pipe.methods import REGISTRY, get_method, registered_from_code

    monkeypatch.setitem(REGISTRY, "mean-by-path", "toy_method:Toy")
    monkeypatch.setitem(REGISTRY, "nested", Outer.Inner)
    got = registered_from_code()
    assert got["mean-by-path"] == "toy_method:Toy" and got["nested"] is Outer.Inner and "sherl" not in got
    assert method_reference(Outer.Inner) == "test_compare:Outer.Inner"
    monkeypatch.setitem(REGISTRY, "nested", "test_compare:Outer.Inner")  # as a job registers it
    assert isinstance(get_method("nested"), Outer.Inner)
    check_importable(["mean-by-path", "nested"])
    monkeypatch.setitem(REGISTRY, "missing", "test_compare:NoSuchClass")
    with pytest.raises(SherlError, match="registered as 'test_compare:NoSuchClass', which cannot be imported"):
        check_importable(["missing"])


class Outer:
    class Inner(Toy):
        name = "nested"


@pytest.mark.slow
def test_a_row_of_a_method_with_settings_of_its_own_trains_with_them(tmp_path, compare_pipeline):
    """`sherl:late_tuning=swr` beside `sherl`: one table, each row trained with its own settings."""
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["compare", str(compare_pipeline), "-q", "--methods",
                                  "sherl,sherl:late_tuning=swr:swr_budget=0.2", "--seeds", "1",
                                  "--compare-dir", str(out), "--workers", "1", "--set", "train.epochs=2",
                                  "--keep", "all"])
    assert r.exit_code == 0, r.output
    rows = {x["method"]: x for x in read_csv(out / "compare.csv")}
    assert set(rows) == {"sherl", "sherl:late_tuning=swr:swr_budget=0.2"}
    assert all(x["state"] == "complete" for x in rows.values())
    assert int(rows["sherl:late_tuning=swr:swr_budget=0.2"]["trainable_parameters"]) > int(
        rows["sherl"]["trainable_parameters"])  # the late layers' dW and the policy
    summaries = [json.loads(p.read_text()) for p in (out / "final").rglob("summary.json")]
    reports = [s["method_report"] for s in summaries if s.get("method_report")]
    assert len(reports) == 1 and reports[0]["budget_weights"] == int(0.2 * reports[0]["backbone_weights"])
    for trial in (out / "final" / "trials").iterdir():  # --keep all: the resume state stays
        assert sorted(p.name for p in (trial / "checkpoints").iterdir()) == [
            "best.safetensors", "last.safetensors", "state.pt"]


@pytest.mark.parametrize("label, message", [
    ("sherl:epochs=4", "train.epochs is set by compare for every row"),
    ("unipt:late_tuning=swr", "method 'unipt' has no setting 'late_tuning'"),
    ("sherl:late_tuning", "expected METHOD:key=value"),
    ("sherl:late_tuning=sideways", "'sherl:late_tuning=sideways': "),
    ("nope:x=1", "'nope:x=1': method = 'nope' is not a method"),
])
def test_a_bad_row_is_refused_in_one_line_before_any_trial(tmp_path, compare_pipeline, label, message):
    from conftest import one_error_line

    r = CliRunner().invoke(main, ["compare", str(compare_pipeline), "-q", "--methods", f"sherl,{label}",
                                  "--compare-dir", str(tmp_path / "cmp")])
    one_error_line(r, message)
    assert not (tmp_path / "cmp").exists()
