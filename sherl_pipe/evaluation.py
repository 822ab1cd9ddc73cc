"""Load a trained run and evaluate it on a cached split.

A run folder is self-contained for building its model: its manifest.json (a copy of the cache's)
holds the backbone config, the task and the label names. Evaluation needs the cache's data: it is
looked up where the run was trained from (an absolute path), or given with --cache after a move.
A method trained live is evaluated on the cached tiers: live training saw the same values.
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
from sherl_pipe.cache.location import as_location, pipeline_location
from sherl_pipe.config import SECTIONS, Pipeline, build_section
from sherl_pipe.devices import pick_device
from sherl_pipe.errors import SherlError
from sherl_pipe.metrics import majority_baseline, mean_baseline
from sherl_pipe.methods.spec import ModelSpec, config_from_manifest
from sherl_pipe.training.checkpoint import atomic_write_json, load_weights, read_run
from sherl_pipe.splits import UNLABELED
from sherl_pipe.training.inference import compute_metrics, predict_split
from sherl_pipe.training.setup import source_for

OUTPUT_SUFFIXES = (".csv", ".jsonl")


@dataclass
class Trained:
    run_dir: Path
    pipeline: Pipeline
    info: dict  # model.json
    manifest: dict  # the cache's manifest as it was at training time
    spec: ModelSpec
    model: torch.nn.Module
    device: str

    @property
    def precision(self) -> str:
        """The precision the run trained in (model.json; runs from before it was recorded: their
        train.precision, resolved on this device)."""
        return self.info.get("precision") or self.pipeline.train.precision


def read_run_manifest(run: Path, info: dict) -> dict:
    """The manifest copy in the run folder (runs made before it existed: the cache's own)."""
    path = run / "manifest.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise SherlError(f"run folder {run}: manifest.json is not valid JSON ({exc}); the folder is damaged") from None
    return open_run_cache(run, info, None).manifest


def load_trained(run_dir, checkpoint: str = "best", device: str = "auto") -> Trained:
    run, config, info = read_run(run_dir)
    try:
        pipeline = Pipeline(**{name: build_section(name, config.get(name, {}), f"{run}/config.json")
                               for name in SECTIONS})
        spec = ModelSpec.from_dict(info["spec"], f"run folder {run}: model.json's method")
    except (TypeError, KeyError) as exc:
        raise SherlError(f"run folder {run}: model.json does not describe a model ({exc}); the folder is damaged") from None
    manifest = read_run_manifest(run, info)
    device = pick_device(device)
    config = config_from_manifest(manifest)
    method = spec.plugin
    model = method.build(spec, config, method.empty_modules(spec, config))
    load_weights(run / "checkpoints" / f"{checkpoint}.safetensors", model, checkpoint)
    method.for_inference(model)
    return Trained(run, pipeline, info, manifest, spec, model.to(device).eval(), device)


def open_run_cache(run: Path, info: dict, cache_path: str | None, options: dict | None = None) -> Cache:
    """The cache a run was trained from (a folder or a URL), or CACHE_PATH after a move. OPTIONS: the
    storage options the run recorded (config.json keeps those that are not credentials, which come
    from the environment)."""
    loc = as_location(cache_path or info["cache"], options)
    if loc.is_local and not loc.path.exists():
        raise SherlError(f"cache {loc}: not found; the run {run} was trained from it: if it moved, give its new "
                         f"place with --cache")
    cache = Cache(loc)
    if manifest_fingerprint(cache.manifest) != info["cache_fingerprint"]:
        raise SherlError(f"run folder {run}: was trained on another cache than {cache.path} (its fingerprint "
                         f"differs: another backbone, data or settings); give the cache it was trained on")
    return cache


def baselines(spec: ModelSpec, cache: Cache, gold: np.ndarray) -> dict:
    """The majority class's accuracy, or the training mean's errors, on the evaluated split."""
    if "train" not in cache.splits:
        return {}
    train_labels = cache.read("train", "labels")
    if spec.task_type == "classification":
        return {"majority_baseline": majority_baseline(train_labels, gold)}
    return {"baseline": mean_baseline(train_labels, gold)}


def evaluate(run_dir, split: str = "test", checkpoint: str = "best", batch_size: int = 128,
             cache_path: str | None = None, storage_options: dict | None = None) -> dict:
    """Metrics on a cached split; writes eval_SPLIT_CHECKPOINT.json and predictions_SPLIT_CHECKPOINT.csv.
    STORAGE_OPTIONS: for a cache on an object store, in place of the run's (which hold no secrets)."""
    t = load_trained(run_dir, checkpoint)
    options = storage_options if storage_options is not None else pipeline_location(t.pipeline, training=True).options
    cache = open_run_cache(t.run_dir, t.info, cache_path, options)
    if split not in cache.splits:
        raise SherlError(f"cache {cache.path}: no split '{split}' to evaluate (has: {', '.join(cache.splits)})")
    if split == UNLABELED:
        raise SherlError(f"cache {cache.path}: split '{split}' (data.unlabeled) has no labels to evaluate against; "
                         f"evaluate a labeled split ({', '.join(x for x in cache.splits if x != UNLABELED)})")
    source = source_for(cache, split, dataclasses.replace(t.spec, source="cached"))  # live runs saw these values
    outputs, labels, index = predict_split(t.model, t.spec, source, None, batch_size, t.device, t.precision)
    gold = labels.numpy()
    result = {"split": split, "checkpoint": checkpoint, "rows": int(len(labels)),
              **compute_metrics(t.spec, outputs, labels), **baselines(t.spec, cache, gold)}
    atomic_write_json(t.run_dir / f"eval_{split}_{checkpoint}.json", result)
    row_ids = cache.read(split, "row_ids")[index]
    write_predictions(t.run_dir / f"predictions_{split}_{checkpoint}.csv", t.spec,
                      t.manifest["task"]["label_names"], outputs, row_ids, gold)
    return result


def prediction_records(spec: ModelSpec, names, outputs: torch.Tensor, row_ids: np.ndarray,
                       gold: np.ndarray | None = None) -> list[dict]:
    """One record per input row, in row order: labels and class probabilities (or values)."""
    order = np.argsort(row_ids, kind="stable")
    records = []
    if spec.task_type == "classification":
        probs = torch.softmax(outputs.float(), -1).numpy()
        for i in order:
            rec = {"row": int(row_ids[i]), "label": names[int(probs[i].argmax())],
                   **{f"prob_{n}": float(p) for n, p in zip(names, probs[i])}}
            if gold is not None:
                rec["gold"] = names[int(gold[i])]
            records.append(rec)
    else:
        for i in order:
            rec = {"row": int(row_ids[i]), "value": float(outputs[i, 0])}
            if gold is not None:
                rec["gold"] = float(gold[i])
            records.append(rec)
    return records


def write_predictions(path: Path, spec: ModelSpec, names, outputs: torch.Tensor, row_ids: np.ndarray,
                      gold: np.ndarray | None = None) -> None:
    """CSV (numbers to 8 decimals) or JSONL (numbers as numbers), by the file's suffix."""
    records = prediction_records(spec, names, outputs, row_ids, gold)
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records)
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(records[0]) if records else ["row"])
        w.writeheader()
        w.writerows({k: (f"{v:.8f}" if isinstance(v, float) else v) for k, v in r.items()} for r in records)
        text = buf.getvalue()
    write_atomically(path, text.encode())
