"""The adapter interface: everything sherl-pipe knows about a backbone family's internals.

The rest of the code (extraction, the late route, live mode, full fine-tuning, tuning modes,
predict) calls only these methods, so a new family is one subclass in one file of this package.
The defaults describe BERT: a post-LN encoder whose layers take (hidden, mask) and need nothing
else, with a pooler and token type embeddings.

Modules a stage works with, by name (the names the manifest hashes and stage two loads):
  embeddings   what turns ids into h[0] (early route only)
  layer.i      the i-th encoder layer
  pooler       the pretrained pooler, when the family has one and the weights file holds it
  <shared>     modules the late route needs beside its layers (`shared`): MPNet's relative
               attention bias, DeBERTa's relative embeddings and their norm, ModernBERT's final norm
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Shared:
    """A module the late route needs beside its layers, read from the weights under `prefix`
    (keys under `prefix + exclude` are not part of it: an encoder's own layers, say)."""
    name: str
    prefix: str
    exclude: tuple[str, ...] = ()


def without_layers(config):
    """A copy of the config with no layers: an encoder built from it holds only its own modules
    (the relative position tables some families keep beside the layers)."""
    bare = copy.deepcopy(config)
    bare.num_hidden_layers = 0
    return bare


def submodule(model: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        model = getattr(model, part, None)
        if model is None:
            return None
    return model


class Family:
    model_type = "bert"
    checkpoint_prefixes: tuple[str, ...] = ("", "bert.")  # what task checkpoints put before the base model
    embedding_paths: tuple[str, ...] = ("embeddings",)
    layers_path = "encoder.layer"
    pooler_path: str | None = "pooler"
    shared: tuple[Shared, ...] = ()
    post_ln = True  # post-LN: the consolidation output is Dropout(LayerNorm(.)); pre-LN: no norm there
    attention: tuple[str, ...] = ("sdpa", "eager")  # implementations transformers has for this family
    lora_targets: tuple[str, ...] = ("query", "key", "value", "dense")
    norm_types: tuple[type, ...] = (nn.LayerNorm,)
    position_offset = False  # positions start after the padding index (RoBERTa's scheme)
    layer_takes_index = True  # the layer class's constructor takes layer_idx

    # --- classes ------------------------------------------------------------------------------
    def layer_class(self):
        from transformers.models.bert.modeling_bert import BertLayer
        return BertLayer

    def pooler_class(self):
        from transformers.models.bert.modeling_bert import BertPooler
        return BertPooler

    def build_layer(self, config, i: int) -> nn.Module:
        return self.layer_class()(config, layer_idx=i) if self.layer_takes_index else self.layer_class()(config)

    def build_pooler(self, config) -> nn.Module:
        return self.pooler_class()(config)

    def build_shared(self, config, name: str) -> nn.Module:
        raise KeyError(name)

    def helpers(self, config) -> dict[str, nn.Module]:
        """Weightless modules built from the config that the layers need (rotary tables)."""
        return {}

    # --- settings -----------------------------------------------------------------------------
    def attention_for(self, requested: str) -> str:
        """The requested implementation, or the one transformers has for this family."""
        return requested if requested in self.attention else self.attention[0]

    def default_pooling(self, config) -> str:
        return "cls-pooler" if self.pooler_path else "cls"

    def uses_token_types(self, config) -> bool:
        return (getattr(config, "type_vocab_size", 0) or 0) > 1

    def layer_norm_eps(self, config) -> float:
        return float(getattr(config, "layer_norm_eps", 1e-12))

    def position_limit(self, config) -> int:
        limit = config.max_position_embeddings
        if self.position_offset:
            limit -= (config.pad_token_id or 0) + 1
        return limit

    # --- where modules live in a whole model ------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return submodule(model, self.layers_path)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."

    def pooler(self, model: nn.Module) -> nn.Module | None:
        return submodule(model, self.pooler_path) if self.pooler_path else None

    def embedding_modules(self, model: nn.Module) -> nn.Module:
        found = {p: submodule(model, p) for p in self.embedding_paths}
        found = {p: m for p, m in found.items() if m is not None}
        if len(found) == 1:
            return next(iter(found.values()))
        return nn.ModuleDict({p.replace(".", "_"): m for p, m in found.items()})

    # --- the forward pass, piece by piece ----------------------------------------------------------
    def embed(self, model: nn.Module, input_ids, mask, token_type_ids=None):
        types = token_type_ids if self.uses_token_types(model.config) else None
        return model.embeddings(input_ids=input_ids, token_type_ids=types)

    def prepare(self, config, modules: dict, hidden, mask):
        """What every layer needs beside the hidden states, computed once per batch: here the
        attention mask, made by transformers itself for the attention implementation in use."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)

    def run_layer(self, layer: nn.Module, hidden, context, index: int, modules: dict):
        out = layer(hidden, context)
        return out[0] if isinstance(out, tuple) else out  # some layers still return tuples

    def finish(self, hidden, modules: dict):
        """After the last layer: the final norm of pre-LN families; nothing for post-LN ones."""
        return hidden

    def forward_kwargs(self, model: nn.Module, input_ids, mask, token_type_ids=None) -> dict:
        """Arguments for the whole model's own forward (full fine-tuning)."""
        kw = {"input_ids": input_ids, "attention_mask": mask}
        if self.uses_token_types(model.config) and token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        return kw
