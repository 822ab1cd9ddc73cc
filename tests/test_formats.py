"""Lossy tier storage (extract.dtype = int8 | float8): decode error within each format's bound,
caches that hold the encoded forward pass, cached training that equals live training through the
same encoding, predict and evaluate agreeing, and info's bytes per real token."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_backbone, make_text_file, write_pipeline
from sherl_pipe.cache import Cache
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.extraction import extract
from sherl_pipe.formats import SCALE_BYTES, decode, encode
from test_extract import direct_hidden_states, read_split, split_texts
from train_helpers import batch_losses_and_grads


def sample_values() -> torch.Tensor:
    """Tokens of very different magnitudes, one all-zero token (padding) and exact extremes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 64, generator=g) * torch.logspace(-6, 4, 5).view(1, 5, 1)
    x[0, 0] = 0.0
    x[1, 1, :3] = torch.tensor([1e-9, -3.0, 3.0])
    return x


def test_int8_decode_error_is_at_most_half_a_step():
    x = sample_values()
    stored = encode(x, "int8")
    assert stored.dtype == torch.int8 and stored.shape[-1] == 64 + SCALE_BYTES
    got = decode(stored, "int8")
    amax = x.abs().amax(-1, keepdim=True)
    # |x - q s| <= s / 2 with s = max|x| / 127 (plus float32 rounding of x / s and q * s)
    assert bool(((got - x).abs() <= amax / 254 * (1 + 1e-5)).all())
    assert bool((got[0, 0] == 0).all())
    assert bool((got.abs().amax(-1) == amax.squeeze(-1)).all())  # the largest value is exact


def test_float8_decode_error_is_within_e4m3s_precision():
    x = sample_values()
    stored = encode(x, "float8")
    assert stored.dtype == torch.uint8 and stored.shape[-1] == 64 + SCALE_BYTES
    got = decode(stored, "float8")
    scale = x.abs().amax(-1, keepdim=True) / 448
    # 3 mantissa bits: half a step is 2**-4 of the value; below e4m3's smallest normal (2**-6 scaled)
    # the subnormal step is 2**-9, half of it 2**-10 of the scale
    bound = torch.maximum(x.abs() / 16, scale / 1024) * (1 + 1e-5)
    assert bool(((got - x).abs() <= bound).all())
    assert bool((got[0, 0] == 0).all())


@pytest.fixture(scope="module")
def caches(tmp_path_factory, bert_dir):
    """The same data extracted in every format (and its pipeline files)."""
    root = tmp_path_factory.mktemp("formats")
    data = make_text_file(root / "data.csv", n=120, seed=3)
    out = {}
    for fmt in ("float32", "float16", "int8", "float8"):
        pipe = write_pipeline(root / f"{fmt}.toml", bert_dir, data, root / fmt, f'dtype = "{fmt}"')
        extract(load_pipeline(str(pipe)))
        out[fmt] = (root / fmt, pipe)
    return out


@pytest.mark.parametrize("fmt, rel", [("int8", 1 / 254), ("float8", 1 / 16)])
def test_a_lossy_cache_holds_the_encoded_forward_pass(caches, bert_dir, fmt, rel):
    cache_path, pipe = caches[fmt]
    cache, _, lengths = read_split(cache_path, "train")
    texts = split_texts(pipe, "train", cache)
    ref, mask = direct_hidden_states(bert_dir, texts, 24)
    t_len = int(lengths.max())
    for t in cache.tiers:
        stored = cache.array("train", f"h{t}")[:]
        assert stored.shape == (len(texts), t_len, 32 + SCALE_BYTES)
        got = cache.dask_array("train", f"h{t}").compute()  # decoded, as users read it
        np.testing.assert_array_equal(got, decode(torch.from_numpy(stored), fmt).numpy())
        expect = ref[t][:, :t_len] * mask[:, :t_len, None]
        amax = np.abs(expect).max(-1, keepdims=True)
        assert np.all(np.abs(got - expect) <= np.maximum(np.abs(expect) if fmt == "float8" else amax, amax / 448)
                      * rel * 1.01 + 1e-5), f"h[{t}]"
        pad = np.arange(t_len)[None, :] >= lengths[:, None]
        assert np.all(got[pad] == 0)


# Live states pass through the same encoding as the cache's, so the two differ only where fp32 noise
# (~1e-7, from other batch compositions) moves a value across a rounding boundary. Such flips are
# rarer than float16's (a boundary every max|x|/127 of a token for int8, every 1/8 of a value for
# float8, against 2**-11 of a value for float16), and one flip moves a loss or gradient of these
# tiny models by well under 1e-3: the tolerance is float16's, 2e-3 (measured: 6e-8 on the loss and
# 3e-7 on the gradients, for both formats). A data mismatch moves them by far more.
@pytest.mark.parametrize("fmt", ["int8", "float8"])
def test_cached_and_live_batches_agree_through_a_lossy_format(tmp_path, labeled_csv, fmt):
    backbone = make_backbone(tmp_path / "nodrop", "bert", dropout=0.0)
    got = batch_losses_and_grads(tmp_path, backbone, labeled_csv, tmp_path / "cache", f'dtype = "{fmt}"')
    assert len(got["cached"]) == len(got["live"]) == 15
    for (loss_c, grads_c), (loss_l, grads_l) in zip(got["cached"], got["live"]):
        assert abs(loss_c - loss_l) <= 2e-3
        for name, g in grads_c.items():
            scale = max(1.0, float(g.abs().max()))
            assert float((g - grads_l[name]).abs().max()) <= 2e-3 * scale, name


def test_training_and_predict_read_a_lossy_cache(tmp_path, caches):
    from sherl_pipe.api import evaluate, predict
    from sherl_pipe.training import train

    cache_path, pipe_file = caches["int8"]
    text = pipe_file.read_text() + f'\n[train]\nrun_dir = "{tmp_path / "run"}"\nmax_steps = 6\nbatch_size = 8\n' \
                                   f'threads = 1\neval_split = ""\n'
    (tmp_path / "p.toml").write_text(text)
    train(load_pipeline(str(tmp_path / "p.toml")), log=lambda m: None)
    evaluate(tmp_path / "run", "test", checkpoint="last")
    want = list(csv.DictReader(open(tmp_path / "run" / "predictions_test_last.csv")))
    cache = Cache(cache_path)
    texts = dict(zip(cache.array("test", "row_ids")[:].tolist(), split_texts(pipe_file, "test", cache)))
    got = predict(tmp_path / "run", [texts[int(r["row"])] for r in want], checkpoint="last")
    names = [k for k in want[0] if k.startswith("prob_")]
    np.testing.assert_allclose([[g[n] for n in names] for g in got], [[float(w[n]) for n in names] for w in want],
                               atol=1e-3, rtol=0)


def test_info_reports_bytes_per_real_token_per_tier(caches):
    per_token = {}
    for fmt in ("float16", "int8", "float8"):
        out = CliRunner().invoke(main, ["info", str(caches[fmt][0])])
        assert out.exit_code == 0 and "bytes per real token: h0 " in out.output
        report = CliRunner().invoke(main, ["info", "--json", str(caches[fmt][0])]).output
        import json

        per_token[fmt] = json.loads(report)["splits"]["train"]["tier_bytes_per_real_token"]
    assert list(per_token["int8"]) == ["h0", "h1", "h2"]
    for fmt in ("int8", "float8"):  # width 32: 32 codes + 4 scale bytes against 64 bytes of fp16
        assert all(per_token[fmt][t] < 0.7 * per_token["float16"][t] for t in per_token[fmt])


def test_float16_fast_path_equals_clear_check_encode():
    """to_storage's float16 path (convert, clear in place, check the converted values) gives what
    clearing, checking and converting one after the other gives, and refuses the same inputs."""
    from sherl_pipe.errors import SherlError
    from sherl_pipe.formats import check_range, clear_padding, encode, to_storage

    torch.manual_seed(0)
    h = torch.randn(3, 5, 8) * 100
    mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [1] + [0] * 4])
    h[1, 3] = float("nan")  # garbage at padded positions is cleared, not refused
    h[2, 1:] = float("inf")
    expect = clear_padding(h, mask)
    check_range(expect, "float16", "here", 0)
    assert torch.equal(to_storage(h, mask, "float16", "here", 0), encode(expect, "float16"))
    for bad in (7e4, float("nan"), float("-inf")):
        g = h.clone()
        g[0, 2, 3] = bad
        with pytest.raises(SherlError, match=r"here: tier h\[0\] has values up to .*beyond float16's range"):
            to_storage(g, mask, "float16", "here", 0)


def test_float16_input_is_not_changed_in_place():
    from sherl_pipe.formats import to_storage

    h = torch.ones(2, 3, 4, dtype=torch.float16)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = to_storage(h, mask, "float16", "here", 0)
    assert torch.all(h == 1) and torch.all(out[mask == 0] == 0)


def test_a_caches_storage_format_need_not_be_repeated_to_train_from_it(tmp_path, bert_dir, text_csv):
    """`extract --dtype int8`, then `train` and `sweep`'s cache check with the pipeline as it is:
    the cache was refused ('dtype: cache has int8, request has float16') until --set extract.dtype=int8."""
    from sherl_pipe.request import cache_ready

    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache")
    pipe.write_text(pipe.read_text() + f'\n[train]\nrun_dir = "{tmp_path / "run"}"\nmax_steps = 2\nthreads = 1\n')
    r = CliRunner().invoke(main, ["extract", str(pipe), "-q", "--dtype", "int8"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["train", str(pipe), "-q"])
    assert r.exit_code == 0, r.output
    import json

    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["dtype"] == "int8"
    assert cache_ready(load_pipeline(str(pipe)))
    r = CliRunner().invoke(main, ["extract", str(pipe), "-q"])  # writing it in another format is refused
    assert r.exit_code == 2 and 'dtype: cache has "int8", request has "float16"' in r.stderr, r.output
