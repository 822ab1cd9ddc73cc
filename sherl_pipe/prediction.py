"""Predict labels (or values) for new raw text with a trained run.

The early layers run live on the new text with the cache's tokenizer and max_length, the tiers are
rounded through the cache's storage dtype (the values the cache would hold), then the trained
stage two applies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sherl_pipe.backbone import Backbone, tokenizer_identity
from sherl_pipe.data import Split, read_columns, rows_text
from sherl_pipe.devices import autocast
from sherl_pipe.errors import SherlError
from sherl_pipe.evaluation import load_trained, write_predictions
from sherl_pipe.extraction import forward_batches, storage_order, tokenize
from sherl_pipe.training.setup import verify_backbone


def predict(run_dir, input_path: str, output_path: str, checkpoint: str = "best", batch_size: int = 128,
            fmt: str = "auto", encoding: str = "utf-8", backbone_source: str | None = None,
            text_column: str | None = None, text_pair_column: str | None = None) -> int:
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
