"""The model a run trains, as a run folder keeps it: `ModelSpec`, the fields every method shares
plus the method's own options resolved against the cache, and `make_spec`, which builds it from a
train section. With the backbone config stored in the cache manifest, no backbone folder is needed
to rebuild a trained model from its run folder.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from transformers import AutoConfig

from sherl_pipe.errors import SherlError
from sherl_pipe.families import family_of
from sherl_pipe.methods import DEFAULT, LEGACY_MODES, get_method
from sherl_pipe.methods.base import Method, Options

# the spec's own fields, in the order model.json writes them (the method's options follow)
SHARED = ("task_type", "num_outputs", "num_layers", "pooling", "dropout")


@dataclass(frozen=True)
class ModelSpec:
    task_type: str
    num_outputs: int
    num_layers: int
    pooling: str
    dropout: float
    method: str = DEFAULT  # train.method (sherl_pipe.methods)
    source: str = "cached"  # train.source: where its activations came from (cached, live)
    options: Options = field(default_factory=Options)  # the method's own, resolved against the cache
    # Regression: the training targets' mean and sd. The head predicts in sd units around the mean
    # and the loss is the MSE in those units, so the defaults hold whatever the targets' scale (a
    # head starting near 0 took many epochs to reach targets around 19 and lost to the mean).
    # Classification, and runs saved before these existed: 0 and 1, no scaling.
    target_mean: float = 0.0
    target_std: float = 1.0
    # Regression: the head standardizes its pooled input (running averages, see model.Head).
    # False for classification and for runs saved before it existed (their state has no norm).
    head_norm: bool = False

    @functools.cached_property
    def plugin(self) -> Method:
        """The method itself, looked up once (a spec is built or read once per run)."""
        return get_method(self.method)

    def __getattr__(self, name: str):
        """The method's options read as spec.KEY (spec.late_layers), as before they were its own."""
        if name not in ("options", "plugin") and not name.startswith("__") and name in self.options.keys():
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__} of method {self.method!r} has no {name!r}")

    @property
    def anchor(self) -> int:
        """The late route's input h[L - k], for a method whose options have late_layers k."""
        return self.num_layers - self.options.late_layers

    @property
    def target_scale(self) -> tuple[float, float] | None:
        return None if (self.target_mean, self.target_std) == (0.0, 1.0) else (self.target_mean, self.target_std)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in SHARED}
        d.update(self.options.to_saved())
        if self.target_scale is not None:  # as runs without target scaling saved it (their resume compares it)
            d.update(target_mean=self.target_mean, target_std=self.target_std)
        if self.head_norm:
            d["head_norm"] = True
        return {**d, "method": self.method, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict, where: str = "model.json's method") -> "ModelSpec":
        """A spec as model.json keeps it; runs saved before methods existed have a `mode`, and runs
        saved before methods owned their settings every method's keys (each method takes its own)."""
        d = dict(d)
        if "mode" in d:
            d["method"], d["source"] = LEGACY_MODES[d.pop("mode")]
        method = d.get("method", DEFAULT)
        plugin = get_method(method, where)
        extra = {k: d[k] for k in ("target_mean", "target_std", "head_norm", "source") if k in d}
        spec = cls(**{k: d[k] for k in SHARED}, method=method, options=plugin.Options.from_saved(d), **extra)
        spec.__dict__["plugin"] = plugin  # the cached property, filled: looked up once
        return spec


def make_spec(cfg, manifest: dict) -> ModelSpec:
    """The model a train section asks for on a cache with this manifest, checked against it (a
    tier the cache lacks is refused before anything runs). Stage one calls it too, on the
    manifest a cache will have, to refuse a training request before extracting."""
    method = cfg.plugin
    source = cfg.source if cfg.source in method.sources else method.sources[0]  # fine-tuning: always live
    task = manifest["task"]
    spec = ModelSpec(
        task_type=task["type"], num_outputs=len(task["label_names"]) if task["type"] == "classification" else 1,
        num_layers=manifest["backbone"]["num_layers"], pooling=resolve_pooling(cfg.pooling, manifest),
        dropout=cfg.dropout, method=cfg.method, source=source, options=method.spec_options(cfg.options, manifest))
    spec.__dict__["plugin"] = method  # the cached property, filled: looked up once, where the pipeline was read
    return spec


def config_from_manifest(manifest: dict, attn_implementation: str | None = None):
    """The backbone's transformers config, rebuilt from the copy stored in the cache manifest."""
    stored = dict(manifest["backbone"]["config"])
    family = family_of(stored["model_type"])
    config = AutoConfig.for_model(stored.pop("model_type"), **stored)
    config._attn_implementation = family.attention_for(attn_implementation or
                                                       manifest["backbone"]["attn_implementation"])
    return config


def resolve_pooling(requested: str, manifest: dict) -> str:
    """`auto`: what a sentence-transformers folder says, else the family's default: `cls-pooler`
    where the family and its weights have a pooler (BERT, RoBERTa, XLM-R, MPNet), otherwise `cls`
    (ModernBERT: its config's classifier_pooling). `cls-pooler` on a family without a pooler (or
    weights without one) is refused here."""
    config = config_from_manifest(manifest)
    family = family_of(config.model_type)
    in_weights = "pooler" in manifest["backbone"].get("module_hashes", {"pooler": ""})
    if requested == "auto":
        requested = manifest["backbone"].get("sentence_transformers_pooling") or family.default_pooling(config)
        return "cls" if requested == "cls-pooler" and not in_weights else requested
    if requested == "cls-pooler" and family.pooler_path is None:
        raise SherlError(f"train.pooling = 'cls-pooler': {config.model_type} backbones have no pooler; set "
                         f"train.pooling to 'cls' or 'mean' (or 'auto': {family.default_pooling(config)})")
    if requested == "cls-pooler" and not in_weights:
        raise SherlError("train.pooling = 'cls-pooler': the backbone's weights file has no pooler; set "
                         "train.pooling to 'cls' or 'mean'")
    return requested
