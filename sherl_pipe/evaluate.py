"""Load a trained run and evaluate it on a cached split; predict labels for new raw text.

Evaluation reads the cache's tiers (for every SHERL mode: live training saw the same values).
Prediction runs the early layers live on the new text with the cache's tokenizer and max_length,
rounds the tiers through the cache's storage dtype, then applies the trained stage two.
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
from sherl_pipe.backbone import Backbone, tokenizer_identity
from sherl_pipe.cache import Cache, manifest_fingerprint
from sherl_pipe.checkpoint import atomic_write_json, load_weights, read_run
from sherl_pipe.config import SECTIONS, Pipeline, build_section
from sherl_pipe.errors import SherlError
from sherl_pipe.data import Split, read_columns, rows_text
from sherl_pipe.extract import forward_batches, pick_device, storage_order, tokenize
from sherl_pipe.metrics import majority_baseline
from sherl_pipe.model import FullFinetuneModel, ModelSpec, build_sherl_model, config_from_manifest, empty_late_modules
from sherl_pipe.train import autocast, compute_metrics, predict_split, source_for, verify_backbone


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
    load_weights(run / "checkpoints" / f"{checkpoint}.safetensors", model)
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


def predict(run_dir, input_path: str, output_path: str, checkpoint: str = "best", batch_size: int = 128,
            fmt: str = "auto", encoding: str = "utf-8", backbone_source: str | None = None) -> int:
    """Labels for new raw text; returns the number of rows written."""
    if not Path(output_path).parent.is_dir():  # checked before any work, not after it
        raise SherlError(f"--output {output_path}: folder {Path(output_path).parent} does not exist; "
                         f"create it or write elsewhere")
    t = load_trained(run_dir, checkpoint)
    manifest = t.cache.manifest
    task = manifest["task"]
    columns = [task["text_column"]] + ([task["text_pair_column"]] if task["text_pair_column"] else [])
    table = read_columns(Path(input_path), fmt, encoding, columns)
    for col in columns:
        empty = [i for i, v in enumerate(table[col]) if v is None or not str(v).strip()]
        if empty:
            raise SherlError(f"input file {input_path}: column '{col}' is empty in data rows {rows_text(empty)}")
    texts = [str(v) for v in table[columns[0]]]
    pairs = [str(v) for v in table[columns[1]]] if len(columns) > 1 else None
    if not texts:
        raise SherlError(f"input file {input_path}: no rows")

    backbone = Backbone(backbone_source or t.pipeline.backbone.source, manifest["backbone"]["attn_implementation"],
                        t.device)
    if tokenizer_identity(backbone.folder, backbone.tokenizer)["hash"] != manifest["tokenizer"]["hash"]:
        raise SherlError(f"backbone {backbone.folder}: its tokenizer differs from the cache's; use the backbone "
                         f"the cache was extracted from")
    if t.spec.mode == "full-finetune":
        needed = []
    else:
        needed = ["embeddings"] + [f"layer.{i}" for i in range(t.spec.anchor)]
    verify_backbone(backbone, manifest, needed)
    rows = np.arange(len(texts))
    tok = tokenize(backbone.tokenizer, Split("input", input_path, texts, pairs, rows, rows),
                   manifest["tokenizer"]["max_length"])
    order = storage_order(tok.lengths)
    dtype = getattr(torch, manifest["dtype"])
    tiers = list(t.spec.tiers) + [t.spec.anchor]
    outputs = torch.zeros(len(texts), t.spec.num_outputs)
    pad_id = backbone.tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for pos, input_ids, mask, tt in forward_batches(tok, order, batch_size, pad_id, t.device):
            rows = order[pos]
            with autocast(t.device):
                if t.spec.mode == "full-finetune":
                    out = t.model(input_ids, mask, tt)
                else:
                    states = backbone.early_states(input_ids, mask, tt, upto=t.spec.anchor)
                    # The same values the cache would hold: zero padding, rounded to the storage dtype.
                    feed = {k: states[k].to(dtype).float() * mask[..., None] for k in tiers}
                    out = t.model(feed, mask)
            outputs[torch.from_numpy(rows)] = out.float().cpu()
    write_predictions(Path(output_path), t.spec, task["label_names"], outputs, np.arange(len(texts)))
    return len(texts)
