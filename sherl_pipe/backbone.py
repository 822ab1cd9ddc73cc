"""Pretrained encoders: load, fingerprint per module, split at the cut, run the early route.

A family is supported through a small `Family` adapter keyed by the config's `model_type`. Adding
one (say `electra`) means telling where its embeddings, layers and pooler live and which classes
build a single layer and the pooler from a config.

Stage two never loads the whole model: `load_modules` builds only the requested modules from the
config and reads only their tensors from the weights file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sherl_pipe.errors import SherlError
from sherl_pipe.resources import resolve_model


@dataclass(frozen=True)
class Family:
    model_type: str
    layer_cls: Callable[[], type]  # builds one encoder layer: cls(config, layer_idx=i)
    pooler_cls: Callable[[], type]  # builds the pooler: cls(config)
    checkpoint_prefixes: tuple[str, ...]  # what a task checkpoint puts before "embeddings." etc.
    post_ln: bool = True  # post-LN blocks: the consolidation output is wrapped in LayerNorm
    default_pooling: str = "cls-pooler"


def _bert_layer():
    from transformers.models.bert.modeling_bert import BertLayer
    return BertLayer


def _bert_pooler():
    from transformers.models.bert.modeling_bert import BertPooler
    return BertPooler


def _roberta_layer():
    from transformers.models.roberta.modeling_roberta import RobertaLayer
    return RobertaLayer


def _roberta_pooler():
    from transformers.models.roberta.modeling_roberta import RobertaPooler
    return RobertaPooler


FAMILIES = {
    "bert": Family("bert", _bert_layer, _bert_pooler, ("", "bert.")),
    "roberta": Family("roberta", _roberta_layer, _roberta_pooler, ("", "roberta.")),
}


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise SherlError(f"backbone model_type '{model_type}' is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def load_config(folder: Path, attn_implementation: str = "sdpa"):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SherlError(f"backbone folder {folder}: cannot read config.json ({exc})") from None
    family_of(config.model_type)
    config._attn_implementation = attn_implementation
    return config


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, use_fast=True)
    except (OSError, ValueError) as exc:
        raise SherlError(f"backbone folder {folder}: cannot load its tokenizer ({exc})") from None


def tokenizer_identity(folder: Path, tokenizer) -> dict:
    """A hash of the tokenizer's files: two tokenizers with the same files give the same ids."""
    h = hashlib.sha256()
    names = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "spm.model", "sentencepiece.bpe.model")
    for name in names:
        if (folder / name).is_file():
            h.update(name.encode() + b"\x00" + (folder / name).read_bytes())
    return {"class": type(tokenizer).__name__, "hash": h.hexdigest(), "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id}


def module_hash(module: nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes, bytes), independent of where it came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sentence_transformers_pooling(folder: Path) -> str | None:
    """'mean' or 'cls' when the folder is a sentence-transformers model that says so, else None."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    try:
        for mod in json.loads(modules.read_text()):
            if mod.get("type", "").endswith("Pooling"):
                cfg = json.loads((folder / mod.get("path", "") / "config.json").read_text())
                if cfg.get("pooling_mode_mean_tokens"):
                    return "mean"
                if cfg.get("pooling_mode_cls_token"):
                    return "cls"
    except (OSError, ValueError):
        return None
    return None


def describe_backbone(config, folder: Path) -> dict:
    """What identifies a backbone beside its weights (read from its folder without loading them)."""
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "attn_implementation": config._attn_implementation,
        "sentence_transformers_pooling": sentence_transformers_pooling(folder),
        "config": config.to_diff_dict(),
    }


def position_limit(config, tokenizer) -> int:
    """The longest input (in tokens) the model's position embeddings cover."""
    limit = config.max_position_embeddings
    if config.model_type == "roberta":  # positions start after the padding index
        limit -= (config.pad_token_id or 0) + 1
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**6:
        limit = min(limit, tok_max)
    return limit


class Backbone:
    """A whole pretrained encoder, for stage one (and live runs): embeddings + layers + pooler.

    Always loaded in fp32, whatever dtype its config declares: a bf16 or fp16 checkpoint is upcast,
    so the cache holds fp32 computations and stage two (which builds its layers in fp32) verifies
    the same module hashes."""

    def __init__(self, source: str, attn_implementation: str = "sdpa", device: str = "cpu"):
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bar is the one that matters
        self.source = source
        self.folder = resolve_model(source)
        self.config = load_config(self.folder, attn_implementation)
        self.family = family_of(self.config.model_type)
        self.tokenizer = load_tokenizer(self.folder)
        try:
            self.model = AutoModel.from_pretrained(self.folder, config=self.config, local_files_only=True,
                                                   attn_implementation=attn_implementation, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise SherlError(f"backbone folder {self.folder}: cannot load the weights ({exc})") from None
        self.model.eval().to(device)
        self.device = torch.device(device)
        self.num_layers = self.config.num_hidden_layers
        self.has_pooler = getattr(self.model, "pooler", None) is not None and _file_has_pooler(self.folder)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def module_hashes(self) -> dict[str, str]:
        out = {"embeddings": module_hash(self.model.embeddings)}
        out.update({f"layer.{i}": module_hash(layer) for i, layer in enumerate(self.layers)})
        if self.has_pooler:
            out["pooler"] = module_hash(self.model.pooler)
        return out

    def identity(self) -> dict:
        return {"source": self.source, **describe_backbone(self.config, self.folder),
                "module_hashes": self.module_hashes()}

    def embed(self, input_ids, token_type_ids=None):
        return self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def early_states(self, input_ids, attention_mask, token_type_ids=None, upto: int | None = None):
        """[h[0], ..., h[upto]] for a padded batch: the embedding output and each early layer's output."""
        upto = self.num_layers if upto is None else upto
        hidden = self.embed(input_ids, token_type_ids)
        mask = attention_mask_for(self.config, hidden, attention_mask)
        states = [hidden]
        for layer in self.layers[:upto]:
            hidden = run_layer(layer, hidden, mask)
            states.append(hidden)
        return states


def attention_mask_for(config, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """The mask a layer expects, made by transformers itself for the attention implementation in use."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)


def run_layer(layer: nn.Module, hidden: torch.Tensor, mask) -> torch.Tensor:
    out = layer(hidden, mask)
    # transformers 5 layers return a tensor; older releases returned a tuple.
    return out[0] if isinstance(out, tuple) else out


# --- partial loading for stage two -------------------------------------------------------------

def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise SherlError(f"backbone folder {folder}: no model.safetensors or pytorch_model.bin")


def _iter_tensor_names(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            yield from f.keys()
    else:
        yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()


def _file_has_pooler(folder: Path) -> bool:
    return any(".pooler." in "." + k or k.startswith("pooler.") for f in _weight_files(folder) for k in _iter_tensor_names(f))


def read_tensors(folder: Path, module_prefix: str, family: Family) -> dict[str, torch.Tensor]:
    """Only the tensors of one module (e.g. 'encoder.layer.5.'), keys relative to it."""
    out: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    rel = _relative_key(key, module_prefix, family)
                    if rel is not None:
                        out[rel] = f.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for key, value in state.items():
                rel = _relative_key(key, module_prefix, family)
                if rel is not None:
                    out[rel] = value
    return out


def _relative_key(key: str, module_prefix: str, family: Family) -> str | None:
    for p in family.checkpoint_prefixes:
        if key.startswith(p + module_prefix):
            return key[len(p + module_prefix):]
    return None


def load_module(folder: Path, config, family: Family, name: str) -> nn.Module:
    """Build 'layer.i' or 'pooler' from the config and load just its weights (strictly)."""
    if name == "pooler":
        module, prefix = family.pooler_cls()(config), "pooler."
    else:
        i = int(name.split(".")[1])
        module, prefix = family.layer_cls()(config, layer_idx=i), f"encoder.layer.{i}."
    tensors = read_tensors(folder, prefix, family)
    if not tensors:
        raise SherlError(f"backbone folder {folder}: the weights file has no tensors for '{name}' "
                         f"(expected keys starting with '{prefix}')")
    try:
        result = module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a size mismatch: weights of another model than the cache's
        first = str(exc).split("size mismatch for ", 1)[-1].split("\n")[0].strip()
        raise SherlError(f"backbone folder {folder}: '{name}' does not fit the cache's model ({first}); use "
                         f"the backbone the cache was extracted from") from None
    if result.missing_keys:
        raise SherlError(f"backbone folder {folder}: '{name}' is missing tensors {result.missing_keys[:3]}")
    return module.eval()
