"""Every backbone family, through the same checks: the cache equals the model's own hidden states,
the late route reproduces the model's output, training from the cache equals training live, each
tuning mode trains what it names, and stage two needs no early weights but refuses changed ones.

Tiny random models of each family are built from configs (conftest.tiny_config) with the options
that change a family's forward pass switched on."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAMILY_TYPES, make_backbone, write_full_pipeline
from sherl_pipe.backbone import Backbone, load_module
from sherl_pipe.cache import Cache
from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.extraction import extract
from sherl_pipe.families import FAMILIES, family_of
from sherl_pipe.methods.sherl import build_sherl_model
from sherl_pipe.methods.spec import ModelSpec, config_from_manifest
from sherl_pipe.model import pool
from sherl_pipe.training import train
from sherl_pipe.training.setup import make_spec
from test_extract import assert_within_one_fp16_step, read_split, split_texts
from train_helpers import step_losses

LAYERS = 3
TEXTS = ["good film", "a very very boring plot and a bad actor but the story is quite fine", "fine",
         "the scene was not nice and the actor was sad really sad"]


def test_every_family_is_tested():
    assert sorted(FAMILY_TYPES) == sorted(FAMILIES)


@pytest.fixture(scope="module")
def family_env(tmp_path_factory, labeled_csv):
    """family -> (backbone folder, fp32 cache of it), built on first use."""
    made = {}

    def get(family: str):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            folder = make_backbone(root / "model", family, layers=LAYERS, dropout=0.0)
            pipe = pipeline(root, folder, labeled_csv, root / "cache", root / "run")
            extract(pipe)
            made[family] = (folder, root / "cache")
        return made[family]

    return get


def pipeline(root, folder, data, cache, run, train_extra="", extract_extra='dtype = "float32"'):
    path = write_full_pipeline(root / "p.toml", folder, data, cache, run, extract_extra, train_extra)
    return load_pipeline(str(path))


def reference(folder, texts=TEXTS):
    """The whole model on one padded batch: its hidden states, output and mask."""
    bb = Backbone(str(folder), "sdpa", "cpu")
    enc = bb.tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        out = bb.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    return bb, out, enc["attention_mask"]


@pytest.mark.parametrize("family", FAMILY_TYPES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cached_tiers_equal_the_models_hidden_states(tmp_path, family_env, labeled_csv, family, dtype):
    folder, fp32_cache = family_env(family)
    cache_path = fp32_cache
    if dtype == "float16":
        pipe = pipeline(tmp_path, folder, labeled_csv, tmp_path / "cache", tmp_path / "run",
                        extract_extra='dtype = "float16"')
        extract(pipe)
        cache_path = tmp_path / "cache"
    cache, tiers, lengths = read_split(cache_path, "train")
    assert cache.tiers == list(range(LAYERS))
    texts = split_texts(fp32_cache.parent / "p.toml", "train", cache)
    _, out, mask = reference(folder, texts)
    mask = mask.numpy()
    assert np.array_equal(mask.sum(1), lengths)
    t_len = int(lengths.max())
    for t, cached in tiers.items():
        expect = out.hidden_states[t].numpy()[:, :t_len] * mask[:, :t_len, None]
        if dtype == "float32":
            np.testing.assert_allclose(cached, expect, atol=1e-5, rtol=0, err_msg=f"h[{t}]")
        else:
            assert_within_one_fp16_step(cached, expect)


def spec_for(late: int, pooling: str, tiers=(), tuning="frozen") -> ModelSpec:
    return ModelSpec.from_dict(dict(task_type="classification", num_outputs=2, num_layers=LAYERS, late_layers=late,
                                    tiers=tuple(tiers), pooling=pooling, projection="gated-mlp", reduction=4,
                                    dropout=0.0, late_tuning=tuning, lora_rank=4, lora_alpha=8.0))


def late_model(folder, late: int, tuning="frozen"):
    """The late route as stage two builds it: modules read one by one from the folder."""
    bb = Backbone(str(folder), "sdpa", "cpu")
    config = config_from_manifest({"backbone": bb.identity()})
    fam = family_of(config.model_type)
    pooling = "cls-pooler" if fam.pooler_path else "mean"
    layers = [load_module(folder, config, fam, f"layer.{i}") for i in range(LAYERS - late, LAYERS)]
    shared = {s.name: load_module(folder, config, fam, s.name) for s in fam.shared}
    pooler = load_module(folder, config, fam, "pooler") if fam.pooler_path else None
    return build_sherl_model(spec_for(late, pooling, tuning=tuning), config, layers, pooler, shared).eval()


@pytest.mark.parametrize("family", FAMILY_TYPES)
@pytest.mark.parametrize("late", [1, 2])
def test_the_late_route_reproduces_the_model(family_env, family, late):
    folder, _ = family_env(family)
    model = late_model(folder, late)
    _, out, mask = reference(folder)
    assert (mask == 0).any()  # padded batch
    with torch.no_grad():
        h_last = model.late_route(out.hidden_states[LAYERS - late], mask)
        pooled = pool(h_last, mask, model.spec.pooling, model.pooler)
    m = mask.bool()
    torch.testing.assert_close(h_last[m], out.last_hidden_state[m], atol=1e-5, rtol=0)
    expect = (out.pooler_output if model.spec.pooling == "cls-pooler"
              else pool(out.last_hidden_state, mask, model.spec.pooling, None))
    torch.testing.assert_close(pooled, expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_training_from_the_cache_equals_training_live(tmp_path, family_env, labeled_csv, family):
    """20 steps, no dropout, every weight trained. Live early layers see other batch compositions
    than extraction did, so their states differ from the cached ones by fp32 noise (~1e-7); Adam
    moves each weight by about lr a step whatever its gradient's size, so where a gradient is near
    zero that noise can flip a step's sign. At lr 1e-5 such flips stay under 1e-5 over 20 steps (at
    1e-4, DeBERTa's consolidation.score.bias differed by 4.4e-5). The step losses, which any data
    mismatch moves from the first step, agree to 1e-5 too."""
    folder, cache = family_env(family)
    weights, losses = {}, {}
    for mode in ("cached", "live"):
        pipe = pipeline(tmp_path, folder, labeled_csv, cache, tmp_path / mode,
                        f'mode = "{mode}"\nmax_steps = 20\neval_split = ""\ndropout = 0.0\nlog_every = 1\n'
                        f'late_tuning = "full"\nlr = 1e-5\nlr_late = 1e-5')
        train(pipe, log=lambda m: None)
        weights[mode] = load_file(tmp_path / mode / "checkpoints" / "last.safetensors")
        losses[mode] = step_losses(tmp_path / mode)
    assert len(losses["cached"]) == 20
    np.testing.assert_allclose(losses["cached"], losses["live"], atol=1e-5, rtol=0)
    assert weights["cached"].keys() == weights["live"].keys()
    for key, value in weights["cached"].items():
        torch.testing.assert_close(value, weights["live"][key], atol=1e-5, rtol=0, msg=key)


def pretrained_parts(model):
    yield from model.late.named_parameters(prefix="late")
    yield from model.shared.named_parameters(prefix="shared")
    if model.pooler is not None:
        yield from model.pooler.named_parameters(prefix="pooler")


def norm_or_bias_names(model) -> set[str]:
    """Found by walking the modules: the parameters of every LayerNorm, and every bias."""
    out = set()
    for root, prefix in ((model.late, "late"), (model.shared, "shared"), (model.pooler, "pooler")):
        if root is None:
            continue
        for mod_name, mod in root.named_modules(prefix=prefix):
            for p_name, _ in mod.named_parameters(recurse=False):
                if isinstance(mod, torch.nn.LayerNorm) or p_name == "bias":
                    out.add(f"{mod_name}.{p_name}")
    return out


@pytest.mark.parametrize("family", FAMILY_TYPES)
@pytest.mark.parametrize("tuning", ["frozen", "norm-bias", "lora", "full"])
def test_each_tuning_mode_trains_what_it_names(family_env, family, tuning):
    folder, _ = family_env(family)
    model = late_model(folder, 2, tuning)
    trained = {n for n, p in pretrained_parts(model) if p.requires_grad}
    everything = {n for n, _ in pretrained_parts(model)}
    assert all(p.requires_grad for p in model.consolidation.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    if tuning == "frozen":
        assert trained == set()
    elif tuning == "full":
        assert trained == everything
    elif tuning == "norm-bias":
        assert trained == norm_or_bias_names(model)
        # each tiny late layer has 2 norms (weight + bias) and 6 linear layers with biases, except
        # ModernBERT's: 2 norms (layer 0: 1) and 4 linear layers
        per_layer = [sum(1 for n in trained if n.startswith(f"late.{i}.")) for i in range(2)]
        assert per_layer == ([8, 8] if family == "modernbert" else [10, 10])
    else:  # lora: every linear layer of the late layers (attention and feed-forward) is wrapped
        assert trained and all("lora_" in n for n in trained)
        plain = late_model(folder, 2, "frozen")
        for layer, before in zip(model.late, plain.late):
            wrapped = {n.rsplit(".base_layer", 1)[0] for n, _ in layer.named_modules() if n.endswith(".base_layer")}
            linear = {n for n, m in before.named_modules() if isinstance(m, torch.nn.Linear)}
            assert wrapped == linear and len(linear) >= 3


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_stage_two_needs_no_early_weights_and_refuses_changed_ones(tmp_path, family_env, labeled_csv, family):
    folder, cache = family_env(family)
    fam = FAMILIES[family]
    manifest = Cache(cache).manifest
    late_only = tmp_path / "late-only"
    shutil.copytree(folder, late_only)
    state = load_file(late_only / "model.safetensors")
    early = tuple(fam.embedding_paths) + tuple(fam.layer_prefix(i) for i in range(LAYERS - 1))
    kept = {k: v for k, v in state.items() if not k.startswith(early)}
    assert len(kept) < len(state)
    save_file(kept, late_only / "model.safetensors", metadata={"format": "pt"})
    pipe = pipeline(tmp_path, late_only, labeled_csv, cache, tmp_path / "run",
                    'max_steps = 3\neval_split = "validation"\nlate_tuning = "full"')
    result = train(pipe, log=lambda m: None)
    assert result.steps == 3 and result.best is not None

    # a changed shared module (or, for families without one, the late layer) is refused by its hash
    name = fam.shared[0].name if fam.shared else f"layer.{LAYERS - 1}"
    prefix = fam.shared[0].prefix if fam.shared else fam.layer_prefix(LAYERS - 1)
    exclude = fam.shared[0].exclude if fam.shared else ()
    key = next(k for k in kept if k.startswith(prefix) and not k[len(prefix):].startswith(exclude))
    kept[key] = kept[key] + 0.01
    save_file(kept, late_only / "model.safetensors", metadata={"format": "pt"})
    assert name in manifest["backbone"]["module_hashes"]
    pipe = pipeline(tmp_path, late_only, labeled_csv, cache, tmp_path / "run2", "max_steps = 3")
    with pytest.raises(SherlError, match=f"module '{name}' differs from the one the cache was made with"):
        train(pipe, log=lambda m: None)


@pytest.mark.parametrize("family", [f for f in FAMILY_TYPES if FAMILIES[f].pooler_path is None])
def test_a_pooler_request_on_a_family_without_one_names_the_alternatives(tmp_path, family_env, labeled_csv,
                                                                          family):
    folder, cache = family_env(family)
    pipe = pipeline(tmp_path, folder, labeled_csv, cache, tmp_path / "run", 'pooling = "cls-pooler"')
    with pytest.raises(SherlError, match=rf"train.pooling = 'cls-pooler': {family} backbones have no pooler; "
                                         r"set train.pooling to 'cls' or 'mean'"):
        make_spec(pipe.train, Cache(cache).manifest)
    auto = make_spec(load_pipeline(str(write_full_pipeline(tmp_path / "q.toml", folder, labeled_csv, cache,
                                                           tmp_path / "r"))).train, Cache(cache).manifest)
    assert auto.pooling in ("cls", "mean")


@pytest.mark.parametrize("family", FAMILY_TYPES)
@pytest.mark.parametrize("mode", ["cached", "full-finetune"])
def test_predict_gives_evaluates_probabilities(tmp_path, family_env, labeled_csv, family, mode):
    """A trained run rebuilt from its folder (late layers, shared modules, head) predicts on raw texts
    what evaluation computed from the cache; full fine-tuning runs the family's own forward."""
    from sherl_pipe.api import evaluate, predict

    folder, cache = family_env(family)
    pipe = pipeline(tmp_path, folder, labeled_csv, cache, tmp_path / "run",
                    f'mode = "{mode}"\nmax_steps = 4\neval_split = ""\nlate_tuning = "full"')
    train(pipe, log=lambda m: None)
    evaluate(tmp_path / "run", "test", checkpoint="last")
    want = [r for r in csv.DictReader(open(tmp_path / "run" / "predictions_test_last.csv"))]
    texts = {int(r): t for r, t in zip(Cache(cache).array("test", "row_ids")[:],
                                       split_texts(cache.parent / "p.toml", "test", Cache(cache)))}
    got = predict(tmp_path / "run", [texts[int(r["row"])] for r in want], checkpoint="last")
    names = [k for k in want[0] if k.startswith("prob_")]
    np.testing.assert_allclose([[g[n] for n in names] for g in got], [[float(w[n]) for n in names] for w in want],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_a_bf16_checkpoint_is_extracted_and_trained_in_fp32(tmp_path, labeled_csv, family):
    """Weights saved in bf16: both stages build fp32 modules holding the upcast weights, so the
    module hashes agree (a bf16 extraction would be refused at training by its hashes)."""
    from transformers import AutoModel

    folder = make_backbone(tmp_path / "model", family, layers=LAYERS, dropout=0.0)
    AutoModel.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    assert '"bfloat16"' in (folder / "config.json").read_text()
    pipe = pipeline(tmp_path, folder, labeled_csv, tmp_path / "cache", tmp_path / "run",
                    'max_steps = 2\neval_split = ""\nlate_tuning = "full"')
    extract(pipe)
    cache = Cache(tmp_path / "cache")
    assert cache.array("train", "h0").dtype == np.float32
    _, out, mask = reference(folder, split_texts(tmp_path / "p.toml", "train", cache))
    h1 = cache.array("train", "h1")[:]
    t_len = h1.shape[1]
    np.testing.assert_allclose(h1, out.hidden_states[1].numpy()[:, :t_len] * mask.numpy()[:, :t_len, None],
                               atol=1e-5, rtol=0)
    assert train(pipe, log=lambda m: None).steps == 2
