"""Load a trained run and evaluate it on a cached split.

Evaluation reads the cache's tiers (for every SHERL mode: live training saw the same values).
Prediction (prediction.py) runs the early layers live on new text.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sherl_pipe.atomic import write_atomically
from sherl_pipe.cache import Cache, manifest_fingerprint
from sherl_pipe.config import SECTIONS, Pipeline, build_section
from sherl_pipe.devices import pick_device
from sherl_pipe.errors import SherlError
from sherl_pipe.metrics import majority_baseline
from sherl_pipe.model import FullFinetuneModel, ModelSpec, build_sherl_model, config_from_manifest, empty_late_modules
from sherl_pipe.training.checkpoint import atomic_write_json, load_weights, read_run
from sherl_pipe.training.inference import compute_metrics, predict_split
from sherl_pipe.training.setup import source_for


@dataclass
class Trained:
    run_dir: Path
    pipeline: Pipeline
    spec: ModelSpec
    cache: Cache
    model: torch.nn.Module
    device: str


def load_trained(run_dir, checkpoint: str = "best", cache_path: str | None = None, device: str = "auto") -> Trained:
    run, config, info = read_run(run_dir)
    try:
        pipeline = Pipeline(**{name: build_section(name, config.get(name, {}), f"{run}/config.json")
                               for name in SECTIONS})
        spec = ModelSpec.from_dict(info["spec"])
    except (TypeError, KeyError) as exc:
        raise SherlError(f"run folder {run}: model.json does not describe a model ({exc}); the folder is damaged") from None
    cache = Cache(cache_path or info["cache"])
    if manifest_fingerprint(cache.manifest) != info["cache_fingerprint"]:
        raise SherlError(f"run folder {run}: was trained on another cache than {cache.path} (its fingerprint "
                         f"differs: another backbone, data or settings); give the cache it was trained on")
    device = pick_device(device)
    manifest = cache.manifest
    config = config_from_manifest(manifest)
    if spec.mode == "full-finetune":
        from transformers import AutoModel

        model = FullFinetuneModel(spec, AutoModel.from_config(config))
    else:
        late, pooler = empty_late_modules(spec, config)
        model = build_sherl_model(spec, config, late, pooler)
    load_weights(run / "checkpoints" / f"{checkpoint}.safetensors", model, checkpoint)
    return Trained(run, pipeline, spec, cache, model.to(device).eval(), device)


def evaluate(run_dir, split: str = "test", checkpoint: str = "best", batch_size: int = 128,
             cache_path: str | None = None) -> dict:
    t = load_trained(run_dir, checkpoint, cache_path)
    if split not in t.cache.splits:
        raise SherlError(f"cache {t.cache.path}: no split '{split}' to evaluate (has: {', '.join(t.cache.splits)})")
    # Every SHERL mode is evaluated on the cached tiers: live training saw the same values.
    data_spec = t.spec if t.spec.mode == "full-finetune" else dataclasses.replace(t.spec, mode="cached")
    source = source_for(t.cache, split, data_spec)
    outputs, labels, index = predict_split(t.model, t.spec, source, None, batch_size, t.device)
    result = {"split": split, "checkpoint": checkpoint, "rows": int(len(labels)),
              **compute_metrics(t.spec, outputs, labels)}
    names = t.cache.manifest["task"]["label_names"]
    if t.spec.task_type == "classification" and "train" in t.cache.splits:
        train_labels = t.cache.array("train", "labels")[:]
        result["majority_baseline"] = majority_baseline(train_labels, labels.numpy())
    atomic_write_json(t.run_dir / f"eval_{split}.json", result)
    row_ids = source.cache.array(split, "row_ids")[:][index]
    write_predictions(t.run_dir / f"predictions_{split}.csv", t.spec, names, outputs, row_ids,
                      labels.numpy())
    return result


def write_predictions(path: Path, spec: ModelSpec, names, outputs: torch.Tensor, row_ids: np.ndarray,
                      gold: np.ndarray | None = None) -> None:
    """One line per input row, in row order: labels and class probabilities (or regression values)."""
    order = np.argsort(row_ids, kind="stable")
    buf = io.StringIO()
    w = csv.writer(buf)
    if spec.task_type == "classification":
        probs = torch.softmax(outputs.float(), -1).numpy()
        w.writerow(["row", "label"] + [f"prob_{n}" for n in names] + (["gold"] if gold is not None else []))
        for i in order:
            pred = int(probs[i].argmax())
            w.writerow([int(row_ids[i]), names[pred]] + [f"{p:.6f}" for p in probs[i]]
                       + ([names[int(gold[i])]] if gold is not None else []))
    else:
        w.writerow(["row", "value"] + (["gold"] if gold is not None else []))
        for i in order:
            w.writerow([int(row_ids[i]), f"{float(outputs[i, 0]):.6f}"] + ([f"{float(gold[i]):.6f}"] if gold is not None else []))
    text = buf.getvalue()
    if path.suffix == ".jsonl":
        rows = list(csv.DictReader(io.StringIO(text)))
        text = "".join(json.dumps(r) + "\n" for r in rows)
    write_atomically(path, text.encode())


