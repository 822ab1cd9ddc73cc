"""Predict labels (or values) for new raw text with a trained run.

The early layers run live on the new text with the cache's tokenizer and max_length, in fp32 and
outside any autocast as extraction ran them; the tiers are stored as the cache stores them
(padding cleared, range checked, rounded to its dtype); then the trained stage two applies. Needs
the run folder and the backbone folder, not the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sherl_pipe.backbone import Backbone, tokenizer_identity
from sherl_pipe.data import Split, check_texts, read_columns
from sherl_pipe.data.load import layout_of
from sherl_pipe.data.read import Layout, Names
from sherl_pipe.devices import autocast
from sherl_pipe.errors import SherlError
from sherl_pipe.evaluation import OUTPUT_SUFFIXES, Trained, load_trained, write_predictions
from sherl_pipe.encode import forward_batches, storage_order, tokenize
from sherl_pipe.folders import ensure_writable
from sherl_pipe.resources import resolve_model
from sherl_pipe.formats import through_storage
from sherl_pipe.training.batches import Batch
from sherl_pipe.training.setup import verify_backbone

PREDICT_NAMES = Names(encoding="--encoding", format="--format", columns="--text-column (and --text-pair-column)",
                      quoting="the training data's data.quoting")


def check_output(output_path: str, input_path: str, overwrite: bool = False) -> Path:
    """Refuse an output that cannot be written, or would replace a file not asked for (the input
    itself never), before any work."""
    path = Path(output_path)
    if path.exists() and Path(input_path).exists() and path.resolve() == Path(input_path).resolve():
        raise SherlError(f"--output {output_path}: is the input file; write the predictions elsewhere")
    if path.is_file() and not overwrite:
        raise SherlError(f"--output {output_path}: exists; use --overwrite to replace it, or write elsewhere")
    if path.is_dir():
        raise SherlError(f"--output {output_path}: is a folder; give a .csv or .jsonl file")
    if path.suffix not in OUTPUT_SUFFIXES:
        raise SherlError(f"--output {output_path}: give a .csv or .jsonl file")
    if not path.parent.is_dir():
        raise SherlError(f"--output {output_path}: folder {path.parent} does not exist; create it or write elsewhere")
    ensure_writable(path.parent, f"--output {output_path}: folder")
    return path


def backbone_folder(t: Trained, backbone_source: str | None) -> Path:
    """--backbone, else the folder the run was trained with; a folder that moved away is blamed on
    --backbone (the option that fixes it), not on the pipeline's backbone.source."""
    if backbone_source:
        return resolve_model(backbone_source, "--backbone")
    source = t.info.get("backbone_folder") or t.pipeline.backbone.source
    try:
        return resolve_model(source)
    except SherlError:
        raise SherlError(f"run {t.run_dir}: its backbone {source} is gone (no config.json there); give the "
                         f"backbone's new folder with --backbone") from None


class Predictor:
    """A trained run with its backbone's early layers, ready for any number of texts:
    `Predictor.load("runs/x").outputs(["a text", ...])`."""

    @classmethod
    def load(cls, run_dir, checkpoint: str = "best", backbone_source: str | None = None, device: str = "auto"):
        return cls(load_trained(run_dir, checkpoint, device), backbone_source)

    def __init__(self, trained: Trained, backbone_source: str | None = None):
        self.trained = t = trained
        self.backbone = Backbone(str(backbone_folder(t, backbone_source)), t.manifest["backbone"]["attn_implementation"],
                                 t.device)
        if tokenizer_identity(self.backbone.folder, self.backbone.tokenizer)["hash"] != t.manifest["tokenizer"]["hash"]:
            raise SherlError(f"backbone {self.backbone.folder}: its tokenizer differs from the cache's; use the "
                             f"backbone the cache was extracted from (--backbone)")
        self.reads = t.spec.plugin.reads(t.spec)  # the tiers its model reads (none: fine-tuning)
        needed = ["embeddings"] + [f"layer.{i}" for i in range(max(self.reads))] if self.reads else []
        verify_backbone(self.backbone, t.manifest, needed)

    def outputs(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 128) -> torch.Tensor:
        """Model outputs (logits, or values for regression) for each text, in input order."""
        t = self.trained
        rows = np.arange(len(texts))
        tok = tokenize(self.backbone.tokenizer, Split("input", "", texts, pairs, rows, rows),
                       t.manifest["tokenizer"]["max_length"])
        order = storage_order(tok.lengths)
        out = torch.zeros(len(texts), t.spec.num_outputs)
        pad_id = self.backbone.tokenizer.pad_token_id or 0
        with torch.inference_mode():
            for pos, input_ids, mask, types in forward_batches(tok, order, batch_size, pad_id, t.device):
                out[torch.from_numpy(order[pos])] = self._batch(t, input_ids, mask, types).float().cpu()
        return out

    def _batch(self, t: Trained, input_ids, mask, types) -> torch.Tensor:
        """The model's outputs for a padded batch: the tiers its method reads computed by the early
        layers and stored as the cache stores them, then its model, as in training."""
        feed = {}
        if self.reads:
            states = self.backbone.early_states(input_ids, mask, types, upto=max(self.reads),
                                                precision=t.manifest.get("precision", "fp32"))  # as the cache
            feed = {k: through_storage(states[k], mask, t.manifest["dtype"], "predict", k) for k in self.reads}
        batch = Batch(np.arange(len(input_ids)), feed, mask, None, input_ids, types)
        with autocast(t.device, t.precision):
            return t.model.forward_batch(batch)


def read_input(t: Trained, input_path: str, fmt: str, encoding: str, text_column: str | None,
               text_pair_column: str | None, header: bool | None = None) -> tuple[list[str], list[str] | None]:
    """The input's texts (and pairs), in the training data's columns and header setting unless told
    otherwise."""
    task = t.manifest["task"]
    if text_pair_column and not task["text_pair_column"]:
        raise SherlError(f"--text-pair-column {text_pair_column}: the run was trained on single texts (its data "
                         f"has no text_pair_column); leave the option out")
    columns = [text_column or task["text_column"]]
    pair = text_pair_column or task["text_pair_column"]
    columns += [pair] if pair else []
    data = t.pipeline.data
    header = data.header if header is None else header  # the other way, name the columns (--text-column)
    layout = Layout(fmt=fmt, encoding=encoding, header=header, quoting=layout_of(data).quoting)
    table, n = read_columns(Path(input_path), columns, layout, PREDICT_NAMES)
    if n == 0:
        raise SherlError(f"input file {input_path}: no rows")
    for col in columns:
        check_texts(f"input file {input_path}", col, table[col], range(n))
    texts = [str(v) for v in table[columns[0]]]
    return texts, ([str(v) for v in table[columns[1]]] if len(columns) > 1 else None)


def predict(run_dir, input_path: str, output_path: str, checkpoint: str = "best", batch_size: int = 128,
            fmt: str = "auto", encoding: str = "utf-8", backbone_source: str | None = None,
            text_column: str | None = None, text_pair_column: str | None = None, overwrite: bool = False,
            header: bool | None = None) -> int:
    """Labels (and probabilities) or values for the rows of a text file; returns the rows written.
    An existing output file is replaced only with overwrite; the input file never."""
    out_path = check_output(output_path, input_path, overwrite)
    trained = load_trained(run_dir, checkpoint)
    texts, pairs = read_input(trained, input_path, fmt, encoding, text_column, text_pair_column, header)
    outputs = Predictor(trained, backbone_source).outputs(texts, pairs, batch_size)
    write_predictions(out_path, trained.spec, trained.manifest["task"]["label_names"], outputs, np.arange(len(texts)))
    return len(texts)
