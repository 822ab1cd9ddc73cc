"""Does an export compute what `predict` does on real data? all-MiniLM-L6-v2 on SST-2: one fp32
cache (every tier) of 1,000 training rows, each method trained briefly (`--steps` steps: the
weights only need to be a trained model's, not a good one's), exported, and run by ONNX Runtime
on 1,000 other SST-2 sentences (train.tsv rows 2,000-2,999: varied lengths, some cut at
max_length) beside `predict` on the same sentences.

Per method: the largest |difference| of the probabilities, and whether the labels agree on every
row; then the first method's export run in a fresh virtualenv that holds onnxruntime, tokenizers
and numpy only (no sherl-pipe, no torch, no transformers: STANDALONE, the tokenizer.json and
labels.json of the export). Last line: one JSON object with each method's (and `fresh_venv`'s)
`max_abs_diff` and `labels_equal`.

    python benchmarks/export_equal.py                     # about 10 minutes on 2 CPU cores
    python benchmarks/export_equal.py --methods sherl     # one method
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, load_avg  # noqa: E402

METHODS = ("sherl", "sherl:late_tuning=lora", "sherl:late_tuning=swr", "unipt", "lst", "linear-probe", "scalar-mix",
           "swr", "lora-finetune", "full-finetune")


def sentences(data: Path, start: int, n: int) -> list[str]:
    with open(data / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows[start:start + n]]


def probabilities(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def onnx_logits(folder: Path, texts: list[str], batch: int = 64) -> np.ndarray:
    """The export run by ONNX Runtime as `sherl-pipe serve` runs it, in batches of BATCH."""
    from sherl_pipe.serve import OnnxModel

    model = OnnxModel(folder)
    return np.concatenate([model.outputs(texts[i:i + batch], None) for i in range(0, len(texts), batch)])


# what a user's service without sherl-pipe runs: onnxruntime, tokenizers and numpy, nothing else
STANDALONE = """
import json, sys
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
folder, texts = sys.argv[1], json.load(open(sys.argv[2]))
info = json.load(open(f"{folder}/labels.json"))
pad = json.load(open(f"{folder}/tokenizer_config.json")).get("pad_token", "[PAD]")
tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
tok.enable_truncation(info["max_length"])
tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)
session = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
names = [i.name for i in session.get_inputs()]
out = []
for i in range(0, len(texts), 64):
    enc = tok.encode_batch(texts[i:i + 64])
    cols = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
            "token_type_ids": [e.type_ids for e in enc]}
    out.append(session.run(["logits"], {k: np.array(cols[k], dtype=np.int64) for k in names})[0])
print(json.dumps(np.concatenate(out).tolist()))
"""


def fresh_venv_logits(work: Path, folder: Path, texts: list[str]) -> np.ndarray:
    """The export run by STANDALONE in a fresh virtualenv holding onnxruntime, tokenizers and numpy
    only (made once in WORK, at this environment's versions), not sherl-pipe nor torch."""
    import venv
    from importlib import metadata

    env = work / "fresh-venv"
    python = (env / "bin" / "python").absolute()
    if not python.exists():
        venv.create(env, with_pip=True)
        pins = [f"{d}=={metadata.version(d)}" for d in ("onnxruntime", "tokenizers", "numpy")]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    bare = {"PATH": "/usr/bin:/bin"}  # and run from WORK: no checkout of sherl-pipe on its path
    missing = [m for m in ("sherl_pipe", "torch", "transformers")
               if subprocess.run([str(python), "-c", f"import {m}"], capture_output=True, cwd=work,
                                 env=bare).returncode != 0]
    assert len(missing) == 3, f"the fresh virtualenv imports {set(('sherl_pipe', 'torch', 'transformers')) - set(missing)}"
    (work / "standalone.py").write_text(STANDALONE)
    (work / "texts.json").write_text(json.dumps(texts))
    out = subprocess.run([str(python), "standalone.py", str(folder.absolute()), "texts.json"],
                         capture_output=True, text=True, check=True, cwd=work, env=bare)
    return np.array(json.loads(out.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/export-equal"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    import torch

    from sherl_pipe.compare.variants import variant_pipeline
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.export import export
    from sherl_pipe.extraction import extract
    from sherl_pipe.prediction import Predictor
    from sherl_pipe.training import train

    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    print(load_avg(), flush=True)
    pipe = work / "pipeline.toml"
    pipe.write_text(f'[data]\ntrain = "{args.data / "train.tsv"}"\ntext_column = "sentence"\nlimit = 1000\n'
                    f'validation_size = 200\n[extract]\ncache = "{work / "cache"}"\ndtype = "float32"\n'
                    f'late_layers = 0\nthreads = {args.threads}\n[train]\nthreads = {args.threads}\n'
                    f'max_steps = {args.steps}\nepochs = 2\n')
    base = load_pipeline(str(pipe))
    extract(base, log=lambda m: None)
    texts = sentences(args.data, 2000, 1000)
    results = {}
    for label in args.methods.split(","):
        name = label.replace(":", "-").replace("=", "-")
        run, folder = work / "runs" / name, work / "exports" / name
        pipeline = variant_pipeline(base, label).with_overrides("train", run_dir=str(run))
        if label.split(":")[0] == "swr" or "late_tuning=swr" in label:  # a search and a fine-tuning epoch
            pipeline = pipeline.with_overrides("train", max_steps=0)
        if not folder.exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            train(pipeline, overwrite=True, log=lambda m: None)
            export(run, folder, log=print)
        want = probabilities(Predictor.load(run).outputs(texts).numpy())
        got = probabilities(onnx_logits(folder, texts))
        results[label] = {"max_abs_diff": float(np.abs(got - want).max()),
                          "labels_equal": bool((got.argmax(1) == want.argmax(1)).all())}
        print(f"  {label:<24} max |probability difference| {results[label]['max_abs_diff']:.2e}, labels "
              f"{'equal' if results[label]['labels_equal'] else 'DIFFER'} on {len(texts)} sentences", flush=True)
    first = args.methods.split(",")[0]
    name = first.replace(":", "-").replace("=", "-")
    want = probabilities(Predictor.load(work / "runs" / name).outputs(texts).numpy())
    got = probabilities(fresh_venv_logits(work, work / "exports" / name, texts))
    results["fresh_venv"] = {"method": first, "max_abs_diff": float(np.abs(got - want).max()),
                             "labels_equal": bool((got.argmax(1) == want.argmax(1)).all())}
    print(f"  {first} export in a fresh virtualenv (onnxruntime, tokenizers, numpy; no sherl-pipe, no torch): "
          f"max |probability difference| {results['fresh_venv']['max_abs_diff']:.2e} on {len(texts)} sentences")
    print(load_avg())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
