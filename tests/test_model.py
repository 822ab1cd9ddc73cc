"""The late route reproduces the backbone, and padding cannot leak into the loss."""

import numpy as np
import pytest
import torch

from sherl_pipe.backbone import Backbone, family_of, load_module
from sherl_pipe.model import ModelSpec, SherlModel, config_from_manifest, pool


def spec_for(layers, late=1, pooling="cls-pooler", tiers=(0, 1)):
    return ModelSpec(mode="cached", task_type="classification", num_outputs=2, num_layers=layers, late_layers=late,
                     tiers=tuple(tiers), pooling=pooling, projection="gated-mlp", reduction=4, dropout=0.0,
                     late_tuning="frozen", lora_rank=4, lora_alpha=8.0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("late", [1, 2])
def test_late_route_reproduces_the_full_model(backbones, family, late):
    folder = backbones[family]
    bb = Backbone(str(folder), "sdpa", "cpu")
    manifest = {"backbone": bb.identity()}
    config = config_from_manifest(manifest)  # built from the stored config, as stage two does
    family_ = family_of(config.model_type)
    layers = [load_module(folder, config, family_, f"layer.{i}") for i in range(3 - late, 3)]
    pooler = load_module(folder, config, family_, "pooler")
    model = SherlModel(spec_for(3, late, tiers=()), config, layers, pooler).eval()
    tok = bb.tokenizer(["good film", "a very very boring plot and a bad actor", "fine"], padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        ref = bb.model(**tok, output_hidden_states=True)
        h_c = ref.hidden_states[3 - late]
        h_last = model.late_route(h_c, tok["attention_mask"])
    m = tok["attention_mask"].bool()
    torch.testing.assert_close(h_last[m], ref.last_hidden_state[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(pool(h_last, tok["attention_mask"], "cls-pooler", pooler), ref.pooler_output,
                               atol=1e-5, rtol=0)


def test_padding_values_do_not_change_the_loss(fp32_cache):
    from sherl_pipe.cache import Cache
    from sherl_pipe.training.batches import SplitSource
    from sherl_pipe.model import build_sherl_model, empty_late_modules

    cache = Cache(fp32_cache)
    config = config_from_manifest(cache.manifest)
    for pooling in ("mean", "cls-pooler", "cls"):
        spec = spec_for(3, 1, pooling=pooling)
        torch.manual_seed(0)
        late, pooler = empty_late_modules(spec, config)
        model = build_sherl_model(spec, config, late, pooler).eval()
        source = SplitSource(cache, "train", [0, 1, 2])
        idx = np.arange(0, source.n, max(1, source.n // 8))[:8]
        batch = source.make_batch(idx, {c: source._read_chunk(c) for c in np.unique(idx // source.chunk_size)})
        assert (batch.mask == 0).any()
        loss = torch.nn.functional.cross_entropy(model(batch.states, batch.mask), batch.labels)
        noisy = {t: torch.where(batch.mask[..., None].bool(), s, torch.randn_like(s) * 1e3)
                 for t, s in batch.states.items()}
        loss2 = torch.nn.functional.cross_entropy(model(noisy, batch.mask), batch.labels)
        torch.testing.assert_close(loss, loss2, atol=1e-6, rtol=0)
