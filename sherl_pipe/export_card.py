"""What an export folder says about its model: `labels.json`, the model card (`README.md`), and
the int8 model's measured scores beside the fp32 one's on the run's evaluation split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sherl_pipe.errors import SherlError
from sherl_pipe.evaluation import Trained, open_run_cache
from sherl_pipe.cache.location import pipeline_location
from sherl_pipe.training.batches import ChunkSampler, SplitSource
from sherl_pipe.training.inference import compute_metrics


def labels_file(t: Trained) -> dict:
    """What the outputs mean, and the input contract a caller needs beside the tokenizer."""
    task = t.manifest["task"]
    contract = {"max_length": t.manifest["tokenizer"]["max_length"], "pairs": bool(t.pipeline.data.text_pair_column)}
    if t.spec.task_type == "classification":
        return {"task": "classification", "labels": list(task["label_names"]), "output": "logits, one per label",
                **contract}
    return {"task": "regression", "target": t.pipeline.data.label_column,
            "output": "logits[:, 0]: the predicted value in the target's units", **contract}


def onnx_outputs(session, source: SplitSource, with_types: bool, batch_size: int = 64) -> np.ndarray:
    """ONNX Runtime's outputs over a cached split, from its stored input_ids (storage order)."""
    sampler = ChunkSampler(source.n, source.chunk_size, batch_size, 1, 0, shuffle=False)
    outs = []
    for batch in source.iterate(sampler.batches(0), prefetch=2):
        feed = {"input_ids": batch.input_ids.numpy().astype(np.int64),
                "attention_mask": batch.mask.numpy().astype(np.int64)}
        if with_types:
            types = batch.token_type_ids
            feed["token_type_ids"] = (np.zeros_like(feed["input_ids"]) if types is None
                                      else types.numpy().astype(np.int64))
        outs.append(session.run(["logits"], feed)[0])
    return np.concatenate(outs)


def quantized_scores(t: Trained, folder: Path, with_types: bool, log) -> dict | None:
    """The fp32 and int8 models' metrics on the run's evaluation split (train.eval_split, else
    evaluate.split), or None where the cache is not reachable (the card then says so)."""
    import onnxruntime as ort

    split = t.pipeline.train.eval_split or t.pipeline.evaluate.split
    try:
        cache = open_run_cache(t.run_dir, t.info, None, pipeline_location(t.pipeline, training=True).options)
    except SherlError as exc:
        log(f"export: the int8 model's accuracy is not measured: {exc}")
        return None
    if split not in cache.splits:
        log(f"export: the int8 model's accuracy is not measured: the cache has no split {split!r}")
        return None
    source = SplitSource(cache, split, [], read_tiers=False)
    labels = torch.from_numpy(np.asarray(cache.read(split, "labels")))
    order = source_order(source)
    scores = {"split": split, "rows": int(len(labels))}
    for name in ("model.onnx", "model.int8.onnx"):
        session = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        out = torch.from_numpy(onnx_outputs(session, source, with_types))
        scores[name] = compute_metrics(t.spec, out, labels[order])
    return scores


def source_order(source: SplitSource) -> np.ndarray:
    sampler = ChunkSampler(source.n, source.chunk_size, 64, 1, 0, shuffle=False)
    return np.concatenate(sampler.batches(0))


def scores_lines(spec, scores: dict | None) -> list[str]:
    if scores is None:
        return ["The int8 model's accuracy was not measured: the run's cache was not reachable at export."]
    key = "accuracy" if spec.task_type == "classification" else "pearson"
    fp32, int8 = scores["model.onnx"][key], scores["model.int8.onnx"][key]
    return [f"On the run's `{scores['split']}` split ({scores['rows']:,} rows): {key} {fp32:.4f} with "
            f"`model.onnx`, {int8:.4f} with `model.int8.onnx` ({100 * (int8 - fp32):+.2f} points)."]


def model_card(t: Trained, summary: dict, with_types: bool, quantized: bool, scores: dict | None,
               name: str) -> str:
    backbone = t.manifest["backbone"]
    spec = t.spec.to_dict()
    test = _test_metrics(t.run_dir)
    inputs = "`input_ids`, `attention_mask`" + (", `token_type_ids`" if with_types else "")
    feed = ", ".join(f'"{k}": enc["{k}"]' for k in (["input_ids", "attention_mask"]
                                                   + (["token_type_ids"] if with_types else [])))
    max_length = t.manifest["tokenizer"]["max_length"]
    lines = [
        f"# {name}", "",
        f"A `{t.spec.method}` model exported by sherl-pipe from the run `{t.run_dir}`: it runs with ONNX Runtime "
        "and the tokenizer in this folder alone.", "",
        "## Model", "",
        f"- Backbone: `{t.info.get('backbone_source', '')}` ({backbone.get('model_type')}, "
        f"{backbone.get('num_layers')} layers, width {backbone.get('hidden_size')}); the tiers rounded as the "
        f"cache stored them ({t.manifest['dtype']}).",
        f"- Method and settings: `{json.dumps(spec, sort_keys=True)}`",
        f"- Training: {summary.get('epochs')} epoch(s), {summary.get('steps')} steps, best "
        f"{json.dumps(summary.get('best'))}",
        f"- Test metrics of the run: {json.dumps(test) if test else 'not evaluated (sherl-pipe evaluate RUN)'}", "",
        "## Input and output", "",
        f"Inputs: {inputs}, int64, shape (batch, sequence), from the tokenizer in this folder with "
        f"`truncation=True, max_length={max_length}` and padding to the batch's longest; any batch size and "
        f"sequence length from 1 to {max_length}. Output: `logits`, float32, shape (batch, outputs): see "
        "`labels.json`. The graph runs in fp32.", "",
        "```python",
        "import onnxruntime as ort",
        "from transformers import AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'session = ort.InferenceSession("{name}/model.onnx")',
        f'enc = tok(["a text"], padding=True, truncation=True, max_length={max_length}, return_tensors="np")',
        f'logits = session.run(["logits"], {{{feed}}})[0]',
        "```", "",
    ]
    if quantized:
        lines += ["## int8", "", "`model.int8.onnx`: the same graph with ONNX Runtime's dynamic int8 quantization "
                  "of its weights (`quantize_dynamic`, QInt8).", ""] + scores_lines(t.spec, scores)
    return "\n".join(lines) + "\n"


def _test_metrics(run: Path) -> dict | None:
    for name in ("eval_test_best.json", "eval_test_last.json"):
        if (run / name).is_file():
            return json.loads((run / name).read_text())
    return None
