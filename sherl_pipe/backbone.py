"""Pretrained encoders: load, fingerprint per module, split at the cut, run the early route.

What differs between families (where modules live, how a layer is called, what it needs beside
the hidden states) is asked of the family's adapter in `sherl_pipe.families`; nothing here names
a family.

Stage two never loads the whole model: `load_module` builds only the requested module from the
config and reads only its tensors from the weights file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from sherl_pipe.errors import SherlError
from sherl_pipe.families import FAMILIES, Family, family_of
from sherl_pipe.resources import resolve_model
from sherl_pipe.devices import early_autocast

__all__ = ["FAMILIES", "Backbone", "family_of", "load_config", "load_module", "module_hash"]


def load_config(folder: Path, attn_implementation: str = "sdpa"):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SherlError(f"backbone folder {folder}: cannot read config.json ({exc})") from None
    # MPNet and DeBERTa have eager attention only: they run with it whatever was asked for
    config._attn_implementation = family_of(config.model_type).attention_for(attn_implementation)
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
    limit = family_of(config.model_type).position_limit(config)
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
                                                   attn_implementation=self.config._attn_implementation,
                                                   dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise SherlError(f"backbone folder {self.folder}: cannot load the weights ({exc})") from None
        self.model.eval().to(device)
        self.device = torch.device(device)
        self.num_layers = self.config.num_hidden_layers
        self.has_pooler = self.family.pooler(self.model) is not None and _file_has_pooler(self.folder, self.family)
        # the modules the layers need beside the hidden states, as stage two builds them
        self.modules = {s.name: shared_from_model(self.model, self.family, s.name) for s in self.family.shared}
        self.modules.update({k: m.to(device) for k, m in self.family.helpers(self.config).items()})

    @property
    def layers(self) -> nn.ModuleList:
        return self.family.layers(self.model)

    def module_hashes(self) -> dict[str, str]:
        out = {"embeddings": module_hash(self.family.embedding_modules(self.model))}
        out.update({f"layer.{i}": module_hash(layer) for i, layer in enumerate(self.layers)})
        if self.has_pooler:
            out["pooler"] = module_hash(self.family.pooler(self.model))
        out.update({s.name: module_hash(self.modules[s.name]) for s in self.family.shared})
        return out

    def identity(self) -> dict:
        return {"source": self.source, **describe_backbone(self.config, self.folder),
                "module_hashes": self.module_hashes()}

    def early_states(self, input_ids, attention_mask, token_type_ids=None, upto: int | None = None,
                     precision: str = "fp32"):
        """[h[0], ..., h[upto]] for a padded batch: the embedding output and each early layer's
        output, computed in PRECISION (extract.precision: fp32, or bf16/fp16 autocast)."""

        upto = self.num_layers if upto is None else upto
        family = self.family
        with early_autocast(self.device, precision):
            hidden = family.embed(self.model, input_ids, attention_mask, token_type_ids)
            context = family.prepare(self.config, self.modules, hidden, attention_mask)
            states = [hidden]
            for i, layer in enumerate(self.layers[:upto]):
                hidden = family.run_layer(layer, hidden, context, i, self.modules)
                states.append(hidden)
        return states


def shared_from_model(model: nn.Module, family: Family, name: str) -> nn.Module:
    """A shared module built as stage two builds it, holding the whole model's tensors: both stages
    then hash the same module."""
    spec = next(s for s in family.shared if s.name == name)
    state = {k[len(spec.prefix):]: v for k, v in model.state_dict().items() if _is_part(k, spec.prefix, spec.exclude)}
    module = family.build_shared(model.config, name)
    module.load_state_dict(state, strict=True)
    device = next(iter(model.parameters())).device
    return module.to(device).eval()


def _is_part(key: str, prefix: str, exclude: tuple[str, ...]) -> bool:
    return key.startswith(prefix) and not key[len(prefix):].startswith(exclude)


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


def _iter_tensors(path: Path, rename):
    """(rename(key), tensor) for the keys of one weights file that `rename` maps to a name (not
    None); only those tensors are read."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if (name := rename(key)) is not None:
                    yield name, f.get_tensor(key)
    else:
        for key, value in torch.load(path, map_location="cpu", weights_only=True, mmap=True).items():
            if (name := rename(key)) is not None:
                yield name, value


def _file_has_pooler(folder: Path, family: Family) -> bool:
    prefixes = tuple(p + family.pooler_path + "." for p in family.checkpoint_prefixes)
    return any(True for f in _weight_files(folder)  # stops at the first pooler tensor
               for _ in _iter_tensors(f, lambda k: k if k.startswith(prefixes) else None))


def read_tensors(folder: Path, family: Family, prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Only the tensors of one module (keys under `prefix`, say 'encoder.layer.5.'), keys relative to it."""
    def relative(key: str) -> str | None:
        for p in family.checkpoint_prefixes:
            if _is_part(key, p + prefix, exclude):
                return _modern_name(key[len(p + prefix):])
        return None

    return {name: tensor for path in _weight_files(folder) for name, tensor in _iter_tensors(path, relative)}


def _modern_name(key: str) -> str:
    """Older checkpoints name LayerNorm parameters gamma/beta; transformers renames them on load,
    and so does stage two's partial loading."""
    if key.endswith("LayerNorm.gamma"):
        return key[:-len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[:-len("beta")] + "bias"
    return key


def empty_module(config, family: Family, name: str) -> tuple[nn.Module, str, tuple[str, ...]]:
    """(module built from the config, the key prefix its tensors have, keys under it that are not its)."""
    if name == "pooler":
        return family.build_pooler(config), family.pooler_path + ".", ()
    if name.startswith("layer."):
        i = int(name.split(".")[1])
        return family.build_layer(config, i), family.layer_prefix(i), ()
    spec = next((s for s in family.shared if s.name == name), None)
    if spec is None:
        raise SherlError(f"backbone module '{name}' is not one of the {family.model_type} family's")
    return family.build_shared(config, name), spec.prefix, spec.exclude


def load_module(folder: Path, config, family: Family, name: str) -> nn.Module:
    """Build 'layer.i', 'pooler' or a shared module from the config and load just its weights (strictly)."""
    module, prefix, exclude = empty_module(config, family, name)
    tensors = read_tensors(folder, family, prefix, exclude)
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
