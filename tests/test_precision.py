"""train.precision: stage two under bf16 autocast on the CPU when asked (auto: bf16 on CUDA only).
The early layers stay fp32 in every mode, so a bf16 run from the cache still equals one run live."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from conftest import write_full_pipeline
from sherl_pipe import api
from sherl_pipe.config import load_pipeline
from sherl_pipe.devices import uses_bf16
from sherl_pipe.errors import SherlError
from sherl_pipe.training import train
from train_helpers import step_losses

BF16_LIVE_TOL = 1e-5  # as in fp32: each product sums the same terms in the same order whatever the batch


def pipeline_for(tmp_path, bert_dir, data, cache, run, extra=""):
    path = write_full_pipeline(tmp_path / f"{run.name}.toml", bert_dir, data, cache, run, 'dtype = "float32"', extra)
    return load_pipeline(str(path))


PRODUCTS = {torch.nn.functional.linear, torch.baddbmm, torch.bmm, torch.matmul, torch.Tensor.__matmul__}


class ProductDtypes(TorchFunctionMode):
    """The dtypes every matrix product (Linear layers, batched and @ products) returns while
    active, those inside the consolidation apart from the others (module hooks mark its forward
    calls; its tier_weights method, which the tier-weight pass calls, is wrapped to mark them too)."""

    def __init__(self):
        super().__init__()
        self.inside = 0
        self.seen = {"consolidation": set(), "other": set()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in PRODUCTS:
            self.seen["consolidation" if self.inside else "other"].add(out.dtype)
        return out

    def __enter__(self):
        from sherl_pipe.consolidation import Consolidation

        def mark(step):
            return lambda module, *a: setattr(self, "inside", self.inside + step * isinstance(module, Consolidation))
        self.handles = [torch.nn.modules.module.register_module_forward_pre_hook(mark(1)),
                        torch.nn.modules.module.register_module_forward_hook(mark(-1))]
        self.tier_weights = Consolidation.tier_weights

        def tier_weights(module, *a, **k):
            self.inside += 1
            try:
                return self.tier_weights(module, *a, **k)
            finally:
                self.inside -= 1
        Consolidation.tier_weights = tier_weights
        return super().__enter__()

    def __exit__(self, *exc):
        from sherl_pipe.consolidation import Consolidation

        Consolidation.tier_weights = self.tier_weights
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)

    def take(self) -> dict:
        seen, self.seen = self.seen, {"consolidation": set(), "other": set()}
        return seen


def test_auto_is_bf16_on_cuda_only_and_the_others_force_it():
    assert [uses_bf16(d, "auto") for d in ("cpu", "cuda", "cuda:1")] == [False, True, True]
    assert [uses_bf16(d, "bf16") for d in ("cpu", "cuda")] == [True, True]
    assert [uses_bf16(d, "fp32") for d in ("cpu", "cuda")] == [False, False]


@pytest.mark.parametrize("precision, late", [("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_training_evaluation_and_prediction_follow_the_runs_precision(tmp_path, bert_dir, labeled_csv, fp32_cache,
                                                                      precision, late):
    """The late layers and the head run in the run's precision; the consolidation in fp32 always."""
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                        f'precision = "{precision}"\nmax_steps = 3\neval_split = "validation"\ndevice = "cpu"')
    fp32 = {torch.float32}
    with ProductDtypes() as dtypes:
        train(pipe, log=lambda m: None)  # the steps, the per-epoch evaluation and the tier weights
        assert dtypes.take() == {"consolidation": fp32, "other": {late}}
        api.evaluate(tmp_path / "run", split="validation")
        assert dtypes.take() == {"consolidation": fp32, "other": {late}}
        api.predict(tmp_path / "run", ["a good film", "a bad one"])
        # prediction runs the early layers too, always in fp32
        assert dtypes.take() == {"consolidation": fp32, "other": {late} | fp32}


def test_bf16_training_from_the_cache_stays_with_live_training(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """The bf16 twin of test_train's cached-vs-live test: the inputs differ by fp32 noise (1e-7),
    which can move a product's bf16 rounding by one step (2**-8 relative); the first step's loss
    then agrees to 2**-8 of itself, the later losses and the weights as in fp32 (1e-3; a few Adam
    steps, 5 * lr). Measured: the first losses equal, the others within 1e-4, the weights 2e-6."""
    results = {}
    for mode in ("cached", "live"):
        pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / mode,
                            f'mode = "{mode}"\nprecision = "bf16"\nmax_steps = 20\neval_split = ""\n'
                            f'dropout = 0.1\nlog_every = 1\nlr = 0.001')
        train(pipe, log=lambda m: None)
        results[mode] = load_file(tmp_path / mode / "checkpoints" / "last.safetensors")
    cached_loss, live_loss = step_losses(tmp_path / "cached"), step_losses(tmp_path / "live")
    assert len(cached_loss) == 20 and abs(cached_loss[0] - live_loss[0]) <= 2 ** -8 * abs(live_loss[0])
    assert np.allclose(cached_loss, live_loss, atol=1e-3, rtol=0)
    for key, value in results["cached"].items():
        torch.testing.assert_close(value, results["live"][key], atol=5e-3, rtol=0)


def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path, bert_dir, labeled_csv, fp32_cache, monkeypatch):
    import sherl_pipe.training.run as run_module

    monkeypatch.setattr(run_module, "native_cpu_bf16", lambda: False)
    lines = []
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                        'precision = "bf16"\nmax_steps = 1\neval_split = ""\ndevice = "cpu"')
    train(pipe, log=lines.append)
    assert any(line.startswith("warning: train.precision = bf16") for line in lines)


def test_an_unknown_precision_is_refused(tmp_path, bert_dir, labeled_csv, fp32_cache):
    with pytest.raises(SherlError, match=r"train.precision.*fp16.*(auto|fp32|bf16)"):
        pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run", 'precision = "fp16"')


def test_evaluate_and_predict_use_the_precision_the_run_trained_in(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """model.json records what the precision meant where the run trained (auto: fp32 on a CPU, bf16
    on CUDA); evaluation elsewhere uses that, not what the setting would mean on its own device."""
    import json

    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                        'precision = "bf16"\nmax_steps = 2\neval_split = ""\ndevice = "cpu"')
    train(pipe, log=lambda m: None)
    assert json.loads((tmp_path / "run" / "model.json").read_text())["precision"] == "bf16"
    config_file = tmp_path / "run" / "config.json"
    config = json.loads(config_file.read_text())
    config["train"]["precision"] = "auto"  # as a setting, fp32 on this CPU
    config_file.write_text(json.dumps(config))
    with ProductDtypes() as dtypes:
        api.evaluate(tmp_path / "run", split="validation")
        assert dtypes.take()["other"] == {torch.bfloat16}
        api.predict(tmp_path / "run", ["a good film"])
        assert torch.bfloat16 in dtypes.take()["other"]


def test_bf16_extraction_stays_near_fp32_and_live_runs_as_the_cache_was_made(tmp_path, labeled_csv):
    """extract.precision = bf16: the early layers run under bf16 autocast, the tiers are stored as
    extract.dtype says, close to fp32's; the manifest says so, and live training runs its early
    layers in bf16 too, so cached and live batches agree as in fp32."""
    from conftest import make_backbone
    from sherl_pipe.cache import Cache
    from train_helpers import batch_losses_and_grads

    backbone = make_backbone(tmp_path / "nodrop", "bert", dropout=0.0)
    got = batch_losses_and_grads(tmp_path, backbone, labeled_csv, tmp_path / "bf16", 'dtype = "float32"\n'
                                 'precision = "bf16"', batches=4)
    cache = Cache(tmp_path / "bf16")
    assert cache.manifest["precision"] == "bf16"
    for (loss_c, grads_c), (loss_l, grads_l) in zip(got["cached"], got["live"]):
        assert abs(loss_c - loss_l) <= BF16_LIVE_TOL, (loss_c, loss_l)
        for name, g in grads_c.items():
            scale = max(1.0, float(g.abs().max()))
            assert float((g - grads_l[name]).abs().max()) <= BF16_LIVE_TOL * scale, name
    (tmp_path / "f").mkdir()
    fp32 = batch_losses_and_grads(tmp_path / "f", backbone, labeled_csv, tmp_path / "fp32", 'dtype = "float32"',
                                  modes=("cached",), batches=4)
    ref = Cache(tmp_path / "fp32")
    assert "precision" not in ref.manifest  # fp32 caches are written as before it existed
    for t in ref.tiers:
        a, b = cache.read("train", f"h{t}").astype(np.float32), ref.read("train", f"h{t}").astype(np.float32)
        rel = np.abs(a - b).max() / max(1e-6, np.abs(b).max())
        assert rel < 0.05 and (rel > 0 or t == 0), (t, rel)  # layers' products in bf16; h0 has none
    assert fp32["cached"][0][0] == pytest.approx(got["cached"][0][0], abs=0.05)


def test_fp16_extraction_is_refused_on_the_cpu(tmp_path, bert_dir, labeled_csv, monkeypatch):
    from click.testing import CliRunner

    import sherl_pipe.backbone as backbone
    from conftest import write_pipeline
    from sherl_pipe.cli import main

    monkeypatch.setattr(backbone.Backbone, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, tmp_path / "cache", 'precision = "fp16"')
    r = CliRunner().invoke(main, ["extract", str(pipe), "-q", "--set", "backbone.device=cpu"])
    assert r.exit_code == 2 and r.stderr.strip() == ("error: extract.precision = fp16 runs on CUDA only; on the CPU use "
                                                     "bf16 (fast where the CPU has native bf16 instructions) or fp32")
