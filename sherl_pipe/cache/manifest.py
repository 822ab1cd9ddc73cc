"""The cache manifest: what a cache holds, how two manifests are matched, and its fingerprint.

The manifest lives in the group's attributes under "sherl_pipe". It is written once, when the
cache is created, and never rewritten by writers.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import numpy as np

FORMAT_VERSION = 1
MANIFEST_KEY = "sherl_pipe"
# Fields that describe how or when a cache was made, not what it holds: never matched. File paths
# are volatile too: what a path held is matched by the module hashes and the rows' fingerprints.
VOLATILE = {"tool_version", "created", "config"}


def is_volatile(path: tuple) -> bool:
    return ((len(path) == 1 and path[0] in VOLATILE) or path == ("backbone", "source")
            or (len(path) == 3 and path[0] == "splits" and path[2] == "source"))


def manifest_diff(old: dict, new: dict) -> list[str]:
    """Dotted paths of the non-volatile fields that differ, with both values."""
    out: list[str] = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if not is_volatile(path + (key,)):
                    walk(a.get(key), b.get(key), path + (key,))
        elif a != b:
            out.append(f"{'.'.join(path)}: cache has {_show(a)}, request has {_show(b)}")

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


def build_manifest(pipeline, backbone_identity: dict, tokenizer: dict, dataset, tokenized: dict,
                   cut: int, tiers: list[int]) -> dict:
    """The manifest of a cache for this pipeline (format and tool version are added by the writer)."""
    cfg = pipeline.extract
    splits = {}
    for name, split in dataset.splits.items():
        tok = tokenized[name]
        splits[name] = {
            "source": split.source,
            "fingerprint": split.fingerprint(),
            "rows": len(split),
            "tokens": int(tok.lengths.sum()),
            "max_len": tok.max_len,
            "blocks": -(-len(split) // cfg.chunk_size),
            "label_counts": (np.bincount(split.labels, minlength=len(dataset.label_names)).tolist()
                             if dataset.label_names else None),
        }
    data = pipeline.data
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": backbone_identity,
        "tokenizer": {**tokenizer, "max_length": pipeline.backbone.max_length},
        "cut": cut,
        "late_layers": backbone_identity["num_layers"] - cut,
        "tiers": tiers,
        "dtype": cfg.dtype,
        "codec": {"name": cfg.codec, "level": cfg.clevel},
        "chunk_size": cfg.chunk_size,
        "time_chunk": cfg.time_chunk,
        "storage_order": "length, ties shuffled with seed 0",
        "task": {"type": dataset.task_type, "text_column": data.text_column,
                 "text_pair_column": data.text_pair_column or None, "label_column": data.label_column,
                 "label_names": dataset.label_names},
        "data": pipeline.to_dict()["data"],
        "splits": splits,
        "config": pipeline.to_dict(),
    }
