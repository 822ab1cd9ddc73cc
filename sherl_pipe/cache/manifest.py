"""The cache manifest: what a cache holds, how two manifests are matched, and its fingerprint.

The manifest lives in the group's attributes under "sherl_pipe". It is written once, when the
cache is created, and never rewritten by writers.

Matching compares what a cache holds, never where its inputs were or which tools made it: file
paths (the data files, the backbone folder) are matched by their contents (the rows' fingerprints,
the module and tokenizer hashes), and the transformers version, the checkpoint's declared dtype
and architecture and the tokenizer's class name are informational.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from sherl_pipe.splits import UNLABELED

FORMAT_VERSION = 2  # 2: every chunk carries a CRC-32C
MANIFEST_KEY = "sherl_pipe"
# arrays: where an object-store cache's arrays live (store.data_location), not what they hold
VOLATILE = {"tool_version", "created", "config", "arrays"}
VOLATILE_PATHS = {("backbone", "source"), ("tokenizer", "class")}
VOLATILE_DATA = {"source", "train", "validation", "test"}
VOLATILE_CONFIG = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"}
# What only says how the cache was cut: whether a cache serves a training request is decided by
# the tiers it holds (the method asks: methods/spec.make_spec), not by these.
CUT_FIELDS = {"cut", "late_layers", "tiers"}
# How a cache stores its values: a reader (train, sweep) decodes whatever the cache holds, so
# these are matched when writing a cache, never when reading one (`extract --dtype int8` then
# `train` needed `--set extract.dtype=int8` again).
STORAGE_FIELDS = {"dtype", "codec", "chunk_size", "time_chunk", "precision"}  # precision: how it was computed


def is_volatile(path: tuple) -> bool:
    return ((len(path) == 1 and path[0] in VOLATILE) or path in VOLATILE_PATHS
            or (len(path) == 3 and path[0] == "splits" and path[2] == "source")
            or (len(path) == 2 and path[0] == "data" and path[1] in VOLATILE_DATA)
            or (len(path) == 3 and path[:2] == ("backbone", "config") and path[2] in VOLATILE_CONFIG))


@dataclass(frozen=True)
class Diff:
    path: tuple
    cache: object
    request: object

    def __str__(self) -> str:
        return f"{'.'.join(self.path)}: cache has {_show(self.cache)}, request has {_show(self.request)}"


def manifest_diff(old: dict, new: dict) -> list[Diff]:
    """The non-volatile fields that differ, with both values."""
    out: list[Diff] = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if not is_volatile(path + (key,)):
                    walk(a.get(key), b.get(key), path + (key,))
        elif a != b:
            out.append(Diff(path, a, b))

    walk(old, new, ())
    return out


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def manifest_fingerprint(manifest: dict) -> str:
    """A hash of everything a cache holds (the manifest less its volatile fields)."""

    def strip(d, path=()):
        if not isinstance(d, dict):
            return d
        return {k: strip(v, path + (k,)) for k, v in d.items() if not is_volatile(path + (k,))}

    return hashlib.sha256(json.dumps(strip(manifest), sort_keys=True).encode()).hexdigest()


def describe_request(pipeline, backbone: dict, tokenizer: dict, dataset) -> dict:
    """What a pipeline asks a cache to hold, short of the module hashes and of what tokenizing
    derives (token counts): enough for `train` to tell a stale cache without the early weights."""
    cfg, data = pipeline.extract, pipeline.data
    return jsonable({
        "backbone": backbone,
        "tokenizer": {**tokenizer, "max_length": pipeline.backbone.max_length},
        "dtype": cfg.dtype,
        # the early layers' computation; fp32 is left out, as caches made before it existed are
        **({"precision": cfg.precision} if cfg.precision != "fp32" else {}),
        "codec": {"name": cfg.codec, "level": cfg.clevel},
        "chunk_size": cfg.chunk_size,
        "time_chunk": cfg.time_chunk,
        "storage_order": "length, ties shuffled with seed 0",
        "task": {"type": dataset.task_type, "text_column": data.text_column,
                 "text_pair_column": data.text_pair_column or None, "label_column": data.label_column,
                 "label_names": dataset.label_names},
        "data": pipeline.to_dict()["data"],
        "splits": {name: {"fingerprint": s.fingerprint(), "rows": len(s)} for name, s in dataset.splits.items()},
    })


def build_manifest(pipeline, backbone_identity: dict, tokenizer: dict, dataset, tokenized: dict,
                   cut: int, tiers: list[int]) -> dict:
    """The manifest of a cache for this pipeline (format and tool version are added by the writer)."""
    chunk = pipeline.extract.chunk_size
    manifest = describe_request(pipeline, backbone_identity, tokenizer, dataset)
    for name, split in dataset.splits.items():
        tok = tokenized[name]
        manifest["splits"][name] = {
            "source": split.source, **manifest["splits"][name],
            "tokens": int(tok.lengths.sum()), "max_len": tok.max_len, "blocks": -(-len(split) // chunk),
            "label_counts": (np.bincount(split.labels, minlength=len(dataset.label_names)).tolist()
                             if dataset.label_names and name != UNLABELED else None)}  # none: no labels there
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **manifest,
            "cut": cut, "late_layers": backbone_identity["num_layers"] - cut, "tiers": tiers,
            "config": pipeline.to_dict()}


def project(manifest, template):
    """The part of a manifest that has the keys of TEMPLATE (recursively)."""
    if not isinstance(template, dict) or not isinstance(manifest, dict):
        return manifest
    return {k: project(manifest.get(k), v) for k, v in template.items()}


def stale_fields(manifest: dict, request: dict) -> list[Diff]:
    """How a cache differs from what a pipeline describes (split names included), for reading
    it: its storage settings are its own (STORAGE_FIELDS)."""
    request = {k: v for k, v in request.items() if k not in STORAGE_FIELDS}
    diffs = manifest_diff(project(manifest, request), request)
    if sorted(manifest["splits"]) != sorted(request["splits"]):
        diffs.insert(0, Diff(("splits",), sorted(manifest["splits"]), sorted(request["splits"])))
    return diffs

