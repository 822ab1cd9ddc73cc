"""Stage one: the cache holds exactly what a direct forward pass gives, and never loses work."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_backbone, make_text_file, require_minilm, require_sst2, write_pipeline, SST2
from sherl_pipe.cache import Cache
from sherl_pipe.config import load_pipeline
from sherl_pipe.data import load_dataset
from sherl_pipe.errors import SherlError
from sherl_pipe.extraction import extract


def direct_hidden_states(folder, texts, max_length, attn="sdpa", token_type=None):
    """The reference: the whole model's output_hidden_states on one padded batch."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation=attn).eval()
    enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states], enc["attention_mask"].numpy()


def assert_within_one_fp16_step(cached: np.ndarray, reference: np.ndarray) -> None:
    """Stored fp16 equals the rounded fp32 reference to one fp16 step. Batch composition moves fp32
    values by ~2e-6, more than an fp16 step near zero, so that fp32 tolerance (1e-5) is added."""
    rounded = reference.astype(np.float16).astype(np.float32)
    step = np.spacing(np.abs(rounded).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(cached.astype(np.float32) - rounded) <= step + 1e-5)


def read_split(cache_path, split):
    cache = Cache(cache_path)
    tiers = {t: cache.array(split, f"h{t}")[:] for t in cache.tiers}
    return cache, tiers, cache.array(split, "lengths")[:]


def split_texts(pipeline_file, split, cache):
    """The split's texts in the cache's storage order (by length), mapped through its row ids."""
    data = load_dataset(load_pipeline(str(pipeline_file)).data).splits[split]
    where = {int(r): i for i, r in enumerate(data.row_ids)}
    return [data.texts[where[int(r)]] for r in cache.array(split, "row_ids")[:]]


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cached_tiers_equal_direct_forward(tmp_path, backbones, text_csv, family, dtype):
    pipe = write_pipeline(tmp_path / "p.toml", backbones[family], text_csv, tmp_path / "cache",
                          f'dtype = "{dtype}"')
    extract(load_pipeline(str(pipe)))
    cache, tiers, lengths = read_split(tmp_path / "cache", "train")
    assert cache.is_complete()
    assert cache.tiers == [0, 1, 2]  # 3 layers, k = 1: h[0..2]
    texts = split_texts(pipe, "train", cache)
    ref, mask = direct_hidden_states(backbones[family], texts, 24)
    assert np.array_equal(mask.sum(1), lengths)
    t_len = int(lengths.max())
    assert tiers[0].shape == (len(texts), t_len, 32)  # time axis is the split's longest sample
    for t, cached in tiers.items():
        expect = ref[t][:, :t_len] * mask[:, :t_len, None]
        got = cached.astype(np.float32)
        if dtype == "float32":
            np.testing.assert_allclose(got, expect, atol=1e-5, rtol=0)
        else:
            assert_within_one_fp16_step(cached, expect)
        # padded positions are exactly zero
        pad = np.arange(t_len)[None, :] >= lengths[:, None]
        assert np.all(cached[pad] == 0)


def test_side_arrays_and_manifest(tmp_path, bert_dir, text_csv):
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache", "tiers = [1]")
    extract(load_pipeline(str(pipe)))
    cache = Cache(tmp_path / "cache")
    assert cache.tiers == [1, 2]  # the anchor h[c] is always stored
    m = cache.manifest
    assert set(m["backbone"]["module_hashes"]) == {"embeddings", "layer.0", "layer.1", "layer.2", "pooler"}
    assert m["cut"] == 2 and m["dtype"] == "float16" and m["task"]["label_names"] == ["neg", "pos"]
    ds = load_dataset(load_pipeline(str(pipe)).data)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_dir)
    for name, split in ds.splits.items():
        info = m["splits"][name]
        assert info["rows"] == len(split) and info["fingerprint"] == split.fingerprint()
        rows = cache.array(name, "row_ids")[:]
        lengths = cache.array(name, "lengths")[:]
        assert sorted(rows.tolist()) == sorted(split.row_ids.tolist())
        assert np.all(np.diff(lengths) >= 0)  # stored by length
        where = {int(r): i for i, r in enumerate(split.row_ids)}
        order = np.array([where[int(r)] for r in rows])
        assert np.array_equal(cache.array(name, "labels")[:], split.labels[order])
        ids = cache.array(name, "input_ids")[:]
        assert ids.dtype == np.int32 and int(lengths.sum()) == info["tokens"]
        for i in range(0, len(split), 7):
            expect = tok(split.texts[order[i]], truncation=True, max_length=24)["input_ids"]
            assert ids[i, : lengths[i]].tolist() == expect
            assert np.all(ids[i, lengths[i]:] == tok.pad_token_id)


def test_text_pair_token_types(tmp_path, bert_dir):
    import csv

    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "label"])
        for i in range(20):
            w.writerow(["good film" * (1 + i % 3), "bad plot", i % 2])
    pipe = tmp_path / "p.toml"
    pipe.write_text(f'[data]\ntrain = "{path}"\ntext_column = "a"\ntext_pair_column = "b"\n'
                    f'[backbone]\nsource = "{bert_dir}"\n[extract]\ncache = "{tmp_path / "c"}"\n'
                    f'dtype = "float32"\nchunk_size = 8\n')
    extract(load_pipeline(str(pipe)))
    cache = Cache(tmp_path / "c")
    types = cache.array("train", "token_type_ids")[:]
    assert types.max() == 1
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_dir)
    model = AutoModel.from_pretrained(bert_dir).eval()
    enc = tok(["good film"] * 1, ["bad plot"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc, output_hidden_states=True).hidden_states[2][0].numpy()
    n = enc["input_ids"].shape[1]
    first = int(np.flatnonzero(cache.array("train", "row_ids")[:] == 0)[0])  # data row 0 is "good film"
    np.testing.assert_allclose(cache.array("train", "h2")[first, :n], ref, atol=1e-5)


def test_mismatched_manifest_is_refused_and_overwrite_replaces(tmp_path, bert_dir, text_csv):
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache")
    extract(load_pipeline(str(pipe)))
    again = extract(load_pipeline(str(pipe)))  # same request: nothing to redo
    assert again.resumed and again.samples == 0
    with pytest.raises(SherlError, match=r"different manifest.*dtype: cache has \"float16\", request has \"float32\""):
        extract(load_pipeline(str(pipe), ["extract.dtype=float32"]))
    with pytest.raises(SherlError, match=r"splits\.train\.fingerprint"):
        extract(load_pipeline(str(pipe), ["data.split_seed=2"]))
    redone = extract(load_pipeline(str(pipe), ["extract.dtype=float32"]), overwrite=True)
    assert not redone.resumed and Cache(tmp_path / "cache").manifest["dtype"] == "float32"


def test_tool_version_is_not_matched(tmp_path, bert_dir, text_csv, monkeypatch):
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache")
    extract(load_pipeline(str(pipe)))
    import sherl_pipe.cache.writer as cache_mod

    monkeypatch.setattr(cache_mod, "__version__", "99.0")
    assert extract(load_pipeline(str(pipe))).resumed


def test_fp16_overflow_is_an_error(tmp_path, text_csv):
    from conftest import make_backbone

    folder = make_backbone(tmp_path / "big", "bert", layers=2)
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state["embeddings.LayerNorm.weight"] = state["embeddings.LayerNorm.weight"] * 1e6
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    pipe = write_pipeline(tmp_path / "p.toml", folder, text_csv, tmp_path / "cache")
    with pytest.raises(SherlError, match=r"beyond float16's range; set extract.dtype = 'float32'"):
        extract(load_pipeline(str(pipe)))
    assert not Cache(tmp_path / "cache").is_complete()


def _assert_same_cache(got: Path, want: Path) -> None:
    """Made in another process (another thread count): the same manifest and integer arrays, the
    activations within one step of the storage format (conftest.assert_same_arrays)."""
    import conftest

    a, b = Cache(got), Cache(want)
    strip = (lambda m: {k: v for k, v in m.items() if k not in ("created", "config")})
    assert strip(a.manifest) == strip(b.manifest)
    conftest.assert_same_arrays(a, b)


@pytest.mark.slow
def test_killed_extraction_resumes_to_an_equal_cache(tmp_path):
    from conftest import make_backbone

    folder = make_backbone(tmp_path / "slow", "bert", layers=4, hidden=128)
    data = make_text_file(tmp_path / "d.csv", n=1200, seed=3)
    extra = "batch_size = 4\nthreads = 1"
    pipe = write_pipeline(tmp_path / "p.toml", folder, data, tmp_path / "killed", extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sherl_pipe", "extract", "-q", str(pipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_dir = tmp_path / "killed" / "train" / "done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        # zarr's LocalStore writes each chunk to "<key>.<uuid>.partial" and renames it; count only
        # committed chunk files, or a done flag still being written passes for a second block.
        if done_dir.is_dir() and sum(p.name.isdigit() for p in done_dir.iterdir()) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "extraction finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = Cache(tmp_path / "killed")
    done, total = partial.blocks_done("train")
    assert 2 <= done < total and not partial.is_complete()

    resumed = extract(load_pipeline(str(pipe)))
    assert resumed.resumed and resumed.splits["train"].blocks_written == total - done
    assert not list((tmp_path / "killed").rglob("*.partial"))
    ref_pipe = write_pipeline(tmp_path / "q.toml", folder, data, tmp_path / "whole", extra)
    extract(load_pipeline(str(ref_pipe)))
    _assert_same_cache(tmp_path / "killed", tmp_path / "whole")


def test_creating_a_cache_keeps_the_folder_its_writer_locked(tmp_path, bert_dir, text_csv):
    from sherl_pipe.cache import CacheWriter
    from sherl_pipe.extraction import planned_manifest
    from sherl_pipe.locks import FolderLock

    pipe = load_pipeline(str(write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache")))
    writer = CacheWriter(tmp_path / "cache", planned_manifest(pipe), log=lambda m: None)
    try:
        assert not FolderLock(tmp_path / "cache").acquire(wait=False)  # a second writer must wait
    finally:
        writer.close()
    assert FolderLock(tmp_path / "cache").acquire(wait=False)


@pytest.mark.slow
def test_two_extractions_started_at_once_on_a_new_folder_write_it_once(tmp_path):
    """The second waits for the first's lock and finds every block done (it crashed with zarr's
    ContainsArrayError, or redid blocks: creating the group deleted the folder the first had locked)."""
    from conftest import make_backbone

    folder = make_backbone(tmp_path / "m", "bert", layers=3, hidden=64)
    data = make_text_file(tmp_path / "d.csv", n=300, seed=3)
    extra = "batch_size = 8\nthreads = 1"
    pipe = write_pipeline(tmp_path / "p.toml", folder, data, tmp_path / "shared", extra)
    procs = [subprocess.Popen([sys.executable, "-m", "sherl_pipe", "extract", "-q", str(pipe)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    stdout = sorted(o[0].splitlines()[0] for o in outs)
    assert stdout == [f"cache {tmp_path / 'shared'}: already complete", f"cache {tmp_path / 'shared'}: complete"]
    ref = write_pipeline(tmp_path / "q.toml", folder, data, tmp_path / "alone", extra)
    extract(load_pipeline(str(ref)))
    _assert_same_cache(tmp_path / "shared", tmp_path / "alone")


def test_stray_partial_files_are_removed_on_rerun(tmp_path, bert_dir, text_csv):
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache")
    extract(load_pipeline(str(pipe)))
    stray = tmp_path / "cache" / "train" / "h0" / "c" / "0.1234.partial"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half")
    extract(load_pipeline(str(pipe)))
    assert not stray.exists()


@pytest.mark.parametrize("setting, message", [
    ("data.text_column=txt", r"no column 'txt' \(columns: text, label, score\)"),
    ("extract.late_layers=9", r"extract.late_layers = 9 is more than the backbone's 3 layers"),
    # a cut at h[0] caches no early layer: training could not use it (train.late_layers < L)
    ("extract.late_layers=3", r"extract.late_layers = 3 is more than the backbone's 3 layers allow: at least one "
                              r"must stay early \(cached\); set extract.late_layers to at most 2$"),
    ("extract.tiers=[7]", r"extract.tiers: tier 7 is outside h\[0..2\]"),
    ("extract.splits=['dev']", r"extract.splits: split 'dev' is not in the data section"),
])
def test_bad_input_leaves_no_cache(tmp_path, bert_dir, text_csv, setting, message):
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache")
    with pytest.raises(SherlError, match=message):
        extract(load_pipeline(str(pipe), [setting]))
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_real_minilm_on_sst2(tmp_path):
    require_sst2()
    require_minilm()
    from sherl_pipe.resources import resolve_model

    pipe = tmp_path / "p.toml"
    pipe.write_text(f'[data]\ntrain = "{SST2 / "train.tsv"}"\ntext_column = "sentence"\nlimit = 300\n'
                    f'[extract]\ncache = "{tmp_path / "c"}"\n')
    extract(load_pipeline(str(pipe)))
    cache, tiers, lengths = read_split(tmp_path / "c", "train")
    texts = split_texts(pipe, "train", cache)
    ref, mask = direct_hidden_states(resolve_model("embedded:all-MiniLM-L6-v2"), texts, 128)
    t_len = int(lengths.max())
    for t, cached in tiers.items():
        assert_within_one_fp16_step(cached, ref[t][:, :t_len] * mask[:, :t_len, None])


def test_unsupported_family_is_named(tmp_path, text_csv):
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    pipe = write_pipeline(tmp_path / "p.toml", folder, text_csv, tmp_path / "cache")
    with pytest.raises(SherlError, match=r"model_type .gpt2. is not supported; supported: bert, deberta-v2, distilbert, electra, modernbert, mpnet, roberta, xlm-roberta"):
        extract(load_pipeline(str(pipe)))


def test_cache_as_dask(tmp_path, bert_dir, text_csv):
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache")
    extract(load_pipeline(str(pipe)))
    cache = Cache(tmp_path / "cache")
    lazy = cache.dask_array("train", "h2")
    assert lazy.chunks[0][0] == 16
    np.testing.assert_array_equal(lazy.sum(axis=(1, 2)).compute(), cache.array("train", "h2")[:].sum(axis=(1, 2)))


@pytest.mark.parametrize("codec", ["blosc-lz4", "blosc-zstd", "zstd", "none"])
def test_direct_chunk_io_matches_zarr_for_every_codec(tmp_path, bert_dir, text_csv, codec):
    """Every stored chunk decodes as zarr decodes it (checksum included); unstored chunks are the
    all-padding ones, which zarr reads as zeros."""
    from sherl_pipe.cache import BlockReader

    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache", f'codec = "{codec}"\ntime_chunk = 4')
    extract(load_pipeline(str(pipe)))
    cache = Cache(tmp_path / "cache")
    arr = cache.array("train", "h1")
    reader = BlockReader(cache.path, "train", "h1", arr)
    full = arr[:]  # zarr's own read path
    chunk, tc = arr.chunks[0], arr.chunks[1]
    out = np.empty(arr.chunks, dtype=arr.dtype)
    stored = cache.chunk_keys("train", "h1")
    assert stored and all(len(c) == 2 for c in stored)
    unstored = np.ones(full.shape[:2], dtype=bool)
    for block, j in stored:
        expected = full[block * chunk:(block + 1) * chunk, j * tc:(j + 1) * tc]
        out[...] = np.nan
        reader.read_time_chunk(block, j, out)
        np.testing.assert_array_equal(out[:expected.shape[0], :expected.shape[1]], expected)
        unstored[block * chunk:(block + 1) * chunk, j * tc:(j + 1) * tc] = False
    assert unstored.any() and np.all(full[unstored] == 0)


def test_overwrite_never_deletes_a_folder_that_is_not_a_cache(tmp_path, bert_dir, text_csv):
    from click.testing import CliRunner

    from sherl_pipe.cli import main

    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "unused")
    r = CliRunner().invoke(main, ["extract", str(pipe), "--cache", str(precious), "--overwrite", "-q"])
    assert r.exit_code == 2 and f"cache {precious}: exists and is not a sherl-pipe cache" in r.stderr, r.output
    assert (precious / "notes.txt").read_text() == "keep me"
    (precious / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    r = CliRunner().invoke(main, ["extract", str(pipe), "--cache", str(precious), "--overwrite", "-q"])
    assert r.exit_code == 2 and "not a sherl-pipe cache" in r.stderr, r.output
    assert (precious / "notes.txt").read_text() == "keep me"


def test_train_refuses_a_stale_cache(tmp_path, bert_dir):
    from sherl_pipe.training import train

    data = make_text_file(tmp_path / "d.csv", n=120, seed=4)
    path = tmp_path / "p.toml"
    write_pipeline(path, bert_dir, data, tmp_path / "cache")
    path.write_text(path.read_text() + f'\n[train]\nrun_dir = "{tmp_path / "run"}"\nmax_steps = 2\n')
    extract(load_pipeline(str(path)))
    with pytest.raises(SherlError, match=r"data.limit: cache has 0, request has 50.*splits.train.fingerprint"):
        train(load_pipeline(str(path), ["data.limit=50"]), log=lambda m: None)
    # how the cache stores its values is its own, not part of what it holds for a reader
    from sherl_pipe.request import check_cache_matches

    check_cache_matches(Cache(tmp_path / "cache"), load_pipeline(str(path), ["extract.dtype=float32",
                                                                            "extract.codec=zstd"]))
    lines = data.read_text().splitlines()
    lines[5] = "an edited sentence," + lines[5].split(",", 1)[1]
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(SherlError, match=r"was made for other data or settings.*splits\.\w+\.fingerprint"):
        train(load_pipeline(str(path)), log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_matching_ignores_file_paths_and_the_transformers_version(tmp_path, bert_dir, text_csv):
    import json

    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache")
    extract(load_pipeline(str(pipe)))
    moved = tmp_path / "elsewhere" / "renamed.csv"
    moved.parent.mkdir()
    shutil.copy(text_csv, moved)
    other_model = tmp_path / "model-copy"
    shutil.copytree(bert_dir, other_model)
    zarr_json = tmp_path / "cache" / "zarr.json"
    meta = json.loads(zarr_json.read_text())
    meta["attributes"]["sherl_pipe"]["backbone"]["config"]["transformers_version"] = "4.0.0"
    zarr_json.write_text(json.dumps(meta))
    again = extract(load_pipeline(str(pipe), [f"data.source={moved}", f"backbone.source={other_model}"]))
    assert again.resumed and again.samples == 0


def test_a_half_precision_checkpoint_is_cached_and_trained_in_fp32(tmp_path, text_csv):
    from transformers import AutoModel

    from sherl_pipe.training import train

    folder = make_backbone(tmp_path / "bf16", "bert")
    model = AutoModel.from_pretrained(folder)
    model.to(torch.bfloat16).save_pretrained(folder)
    assert '"bfloat16"' in (folder / "config.json").read_text()
    path = write_pipeline(tmp_path / "p.toml", folder, text_csv, tmp_path / "cache", 'dtype = "float32"')
    path.write_text(path.read_text() + f'\n[train]\nrun_dir = "{tmp_path / "run"}"\nmax_steps = 2\n')
    extract(load_pipeline(str(path)))
    cache, tiers, lengths = read_split(tmp_path / "cache", "train")
    assert all(a.dtype == np.float32 for a in tiers.values())
    texts = split_texts(path, "train", cache)
    reference = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()  # the bf16 weights, upcast
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(folder)(texts, truncation=True, max_length=24, padding=True,
                                                return_tensors="pt")
    with torch.no_grad():
        ref = reference(**enc, output_hidden_states=True).hidden_states
    t_len = int(lengths.max())
    mask = enc["attention_mask"].numpy()[:, :t_len, None]
    for t, cached in tiers.items():
        np.testing.assert_allclose(cached, ref[t].numpy()[:, :t_len] * mask, atol=1e-5, rtol=0)
    assert train(load_pipeline(str(path)), log=lambda m: None).steps == 2


def test_the_writer_threads_error_does_not_hide_the_one_that_stopped_extraction(tmp_path, bert_dir, text_csv,
                                                                                monkeypatch):
    import sherl_pipe.blocks as blocks
    import sherl_pipe.extraction as extraction

    calls = []
    forward = blocks.forward_block

    def failing_forward(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise SherlError("the forward pass failed")
        return forward(*a, **kw)

    def failing_write(*a, **kw):
        raise RuntimeError("the writer failed")

    monkeypatch.setattr(blocks, "forward_block", failing_forward)
    monkeypatch.setattr(extraction.CacheWriter, "write_block", failing_write)
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache")
    with pytest.raises(SherlError, match="the forward pass failed"):
        extract(load_pipeline(str(pipe)))


def test_a_failed_chunk_write_leaves_its_block_undone(tmp_path, bert_dir, text_csv, monkeypatch):
    """`done` is set only when every chunk of its block is written: a failed chunk write (here the
    store's own `set`, which every chunk goes through) leaves the block to be redone, and the rerun
    completes the cache."""
    from zarr.storage import LocalStore

    from sherl_pipe.cache import Cache

    real = LocalStore.set
    written = []

    async def fail_on_the_fifth(self, key, value, *a, **kw):
        if "/c/" in key and "/done/" not in key:  # a block's data chunk
            written.append(key)
            if len(written) == 5:
                raise OSError(28, "No space left on device")
        return await real(self, key, value, *a, **kw)

    monkeypatch.setattr(LocalStore, "set", fail_on_the_fifth)
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache")
    with pytest.raises(OSError, match="No space left"):
        extract(load_pipeline(str(pipe)))
    failed = written[4].split("/")  # split/array/c/block/time/0
    assert failed[2] == "c" and Cache(tmp_path / "cache").done_flags(failed[0])[int(failed[3])] == 0
    monkeypatch.setattr(LocalStore, "set", real)
    again = extract(load_pipeline(str(pipe)))
    assert Cache(tmp_path / "cache").done_flags("train").all()
    done_before = int(failed[3])  # the blocks finished before the failure are not redone
    assert again.splits["train"].blocks_written == again.splits["train"].blocks_total - done_before


def test_a_cache_path_that_is_a_file_is_named(tmp_path, bert_dir, text_csv):
    from click.testing import CliRunner

    from sherl_pipe.cli import main

    (tmp_path / "afile").write_text("x")
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "afile")
    for args in (["extract", str(pipe), "-q"], ["info", str(tmp_path / "afile")]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and f"cache {tmp_path / 'afile'}: is a file, not a cache folder" in r.stderr, r.output


def test_a_late_layers_mismatch_says_whether_the_cache_already_serves_it(tmp_path, bert_dir, text_csv):
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "cache")
    extract(load_pipeline(str(pipe)))  # late_layers 1: tiers h0..h2
    with pytest.raises(SherlError, match=r"already serves train.late_layers = 2 .*keep extract.late_layers = 1"):
        extract(load_pipeline(str(pipe), ["extract.late_layers=2", "train.late_layers=2"]))
    small = write_pipeline(tmp_path / "q.toml", bert_dir, text_csv, tmp_path / "small", "tiers = [2]")
    extract(load_pipeline(str(small)))  # only h2 stored
    with pytest.raises(SherlError, match=r"does not serve train.late_layers = 2 .*--overwrite"):
        extract(load_pipeline(str(small), ["extract.late_layers=2", "train.late_layers=2", "extract.tiers=[]"]))
