"""`sherl-pipe export RUN OUT`: a trained run as one folder that runs without sherl-pipe, the cache
or the backbone's weights file: `model.onnx` (the whole inference path: embeddings and early
layers, the tiers rounded as the cache stores them, the method's own modules, late layers with
LoRA or SWR merged, pooling and head), the tokenizer's files, `labels.json` and a model card
(`README.md`); with --quantize int8 also `model.int8.onnx` (ONNX Runtime's dynamic quantization)
and its accuracy on the run's evaluation split.

The graph is exported by torch.onnx (torch.export, then onnxscript's translation; opset 18) with
dynamic batch and sequence axes; it runs in fp32 whatever precision the cache was extracted in (ONNX Runtime's CPU kernels
have no bf16 matmul): the early layers' bf16 or fp16 rounding is the one thing predict has that
the export does not, a difference within the cache's own rounding. The folder is written under a
temporary name beside OUT and renamed when complete, so nothing half-written can pass for an export.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sherl_pipe.atomic import write_atomically
from sherl_pipe.backbone import Backbone
from sherl_pipe.errors import SherlError
from sherl_pipe.evaluation import Trained, load_trained
from sherl_pipe.formats import rounded
from sherl_pipe.training.batches import Batch

OPSET = 18
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class InferenceGraph(nn.Module):
    """A trained run's inference path as one module: the tokenizer's tensors in, the head's
    outputs (logits, or the regression value) out, as `predict` computes them."""

    def __init__(self, trained: Trained, backbone: Backbone):
        super().__init__()
        self.model = trained.model
        self.reads = trained.spec.plugin.reads(trained.spec)
        self.fmt = trained.manifest["dtype"]
        if self.reads:  # the early route's modules registered here, so that the export holds their weights
            self.embedder = backbone.model
            self.shared = nn.ModuleDict(backbone.modules)
            object.__setattr__(self, "backbone", backbone)  # runs them, as predict does (Backbone.early_states)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        states = {}
        if self.reads:
            tiers = self.backbone.early_states(input_ids, attention_mask, token_type_ids, upto=max(self.reads))
            # as the cache stores them: padding zero, rounded to its format (range checks are predict's)
            states = {k: rounded(tiers[k], attention_mask, self.fmt) for k in self.reads}
        # no positions in a split here (nothing in a forward pass reads them)
        batch = Batch(np.zeros(0, dtype=np.int64), states, attention_mask, None, input_ids, token_type_ids)
        return self.model.forward_batch(batch).float()


@contextlib.contextmanager
def libraries_quiet():
    """The exporter's and the quantizer's chatter (progress lines, deprecation and fallback
    warnings, a root-logger hint) kept off the user's terminal; levels restored after."""
    loggers = [logging.getLogger(name) for name in ("torch", "")]  # a failed export logs its graph: pages
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def merge_adapters(model: nn.Module) -> None:
    """LoRA adapters (peft) merged into their base weights: one matmul per projection, as trained."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and not module.merged:
            module.merge()


def check_destination(out: Path) -> None:
    if out.exists():
        raise SherlError(f"OUT {out}: exists; give a new folder (export never replaces one)")
    if not out.parent.is_dir():
        raise SherlError(f"OUT {out}: folder {out.parent} does not exist; create it or export elsewhere")


def check_finished(run: Path) -> dict:
    summary = run / "summary.json"
    if not summary.is_file():
        raise SherlError(f"run {run}: has not finished (no summary.json); finish it (sherl-pipe train --resume) "
                         f"before exporting")
    result = json.loads(summary.read_text())
    if result.get("stop_reason") == "interrupted":
        raise SherlError(f"run {run}: was interrupted; finish it (sherl-pipe train --resume) before exporting")
    return result


def onnx_file(module: nn.Module, args: tuple, path: Path, names: list[str], shapes: dict | None) -> None:
    """MODULE exported to PATH. Without onnxscript's graph optimizer: it dropped UniPT's `+ 1e-8`
    from `scores / (scores.sum() + 1e-8)`, so a token whose scores were all 0 gave NaN (about half
    of SST-2's sentences through a MiniLM UniPT); ONNX Runtime optimizes the graph when it loads it."""
    torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, output_names=["logits"],
                      dynamic_shapes=shapes, opset_version=OPSET, external_data=False, verbose=False, optimize=False)


def example_inputs(tokenizer, with_types: bool) -> tuple:
    ids = torch.tensor([[101, 7, 8, 9, 102], [101, 7, 102, 0, 0]]).clamp(max=len(tokenizer) - 1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return (ids, mask, torch.zeros_like(ids)) if with_types else (ids, mask)


def write_onnx(graph: InferenceGraph, path: Path, with_types: bool, tokenizer, max_length: int) -> None:
    """torch.onnx's exporter (torch.export, then onnxscript's translation) with dynamic batch and
    sequence axes (a sequence up to MAX_LENGTH, the cache's)."""
    from torch.export import Dim

    names = list(INPUTS if with_types else INPUTS[:2])
    batch, sequence = Dim("batch"), Dim("sequence", max=max_length)
    shapes = {n: {0: batch, 1: sequence} for n in names}
    with torch.no_grad(), libraries_quiet():
        try:
            onnx_file(graph, example_inputs(tokenizer, with_types), path, names, shapes)
        except Exception as exc:  # torch.export and the translation raise many types: the method's modules did
            cause = exc
            while cause.__cause__ is not None:  # the exporter wraps what torch.export met
                cause = cause.__cause__
            first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
            raise SherlError(f"export: the model cannot be exported to ONNX ({type(cause).__name__}: {first[:300]}); "
                             f"its method's modules need what torch.export or the ONNX translation lacks (a branch "
                             f"on the data's values, an op without a translation)") from None


def write_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic int8 quantization of the weights, on the graph ONNX Runtime's basic
    optimizations (constant folding: a Linear's transposed weight becomes a constant again) leave:
    the quantizer finds a weight only as a constant input of MatMul (on the unfolded graph it
    quantized none: int8 ran at fp32's speed). The intermediate shapes are dropped first: the
    quantizer infers its own, and refused a model where one of the exporter's disagreed."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folded = target.with_name("folded.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(folded))
        del model.graph.value_info[:]
        onnx.save(model, str(folded))
        quantize_dynamic(str(folded), str(target), weight_type=QuantType.QInt8)
    finally:
        folded.unlink(missing_ok=True)


def export(run_dir, out, fmt: str = "onnx", quantize: str | None = None, log=print) -> Path:
    """Export RUN_DIR to the new folder OUT (see the module's docstring); returns OUT."""
    from sherl_pipe.export_card import labels_file, model_card, quantized_scores

    run, out = Path(run_dir).absolute(), Path(out)
    if fmt != "onnx":
        raise SherlError(f"--format {fmt}: the one format is onnx")
    if quantize not in (None, "int8"):
        raise SherlError(f"--quantize {quantize}: the one quantization is int8")
    check_destination(out)
    summary = check_finished(run)
    trained = load_trained(run, device="cpu")
    from sherl_pipe.prediction import Predictor

    predictor = Predictor(trained)  # the backbone, checked against the cache's hashes and tokenizer
    merge_adapters(trained.model)
    tokenizer = predictor.backbone.tokenizer
    with_types = "token_type_ids" in tokenizer.model_input_names
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # an earlier export that died: never read as an export
    partial.mkdir()
    try:
        write_onnx(InferenceGraph(trained, predictor.backbone).eval(), partial / "model.onnx", with_types, tokenizer,
                   trained.manifest["tokenizer"]["max_length"])
        tokenizer.save_pretrained(partial)
        write_atomically(partial / "labels.json", (json.dumps(labels_file(trained), indent=2) + "\n").encode())
        scores = None
        if quantize == "int8":
            with libraries_quiet():
                write_int8(partial / "model.onnx", partial / "model.int8.onnx")
            scores = quantized_scores(trained, partial, with_types, log)
        card = model_card(trained, summary, with_types, quantize == "int8", scores, out.name)
        write_atomically(partial / "README.md", card.encode())
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
