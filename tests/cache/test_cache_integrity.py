"""Damaged caches are detected and named; `verify` finds every bad chunk and `extract` redoes
exactly the blocks it marks; two writers never both do the work or delete each other's files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

import conftest
from click.testing import CliRunner

from conftest import write_full_pipeline, write_pipeline
from sherl_pipe.cache import Cache
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.extraction import extract
from sherl_pipe.training import train


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, bert_dir, labeled_csv):
    """A cache with several time chunks per block, and a run trained on it."""
    root = tmp_path_factory.mktemp("pristine")
    pipe = write_full_pipeline(root / "p.toml", bert_dir, labeled_csv, root / "cache", root / "run",
                               'time_chunk = 4', "max_steps = 2")
    extract(load_pipeline(str(pipe)))
    train(load_pipeline(str(pipe)), log=lambda m: None)
    return root


def chunk_file(cache_dir, split, name, coords):
    """The file of chunk COORDS (tier arrays have a third, width, axis in one chunk: 0)."""
    coords = tuple(coords) + ((0,) if name.startswith("h") else ())
    return cache_dir / split / name / "c" / "/".join(map(str, coords))


def damage(path, how):
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        path.unlink()


TARGETS = [("h1", (1, 1)), ("lengths", (2,)), ("input_ids", (3, 0))]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name, coords", TARGETS, ids=[t[0] for t in TARGETS])
def test_a_damaged_chunk_is_named_by_train_evaluate_and_verify(pristine, tmp_path, how, name, coords):
    cache = tmp_path / "cache"
    shutil.copytree(pristine / "cache", cache)
    target = chunk_file(cache, "train", name, coords)
    assert target.is_file()
    damage(target, how)
    where = f"split 'train', array '{name}', chunk {tuple(coords)}"
    runner = CliRunner()
    r = runner.invoke(main, ["train", str(pristine / "p.toml"), "--cache", str(cache), "--run-dir",
                             str(tmp_path / "run"), "--set", "train.max_steps=0", "--epochs", "1", "-q"])
    assert r.exit_code == 2 and where in r.stderr and "Traceback" not in r.output, r.output
    r = runner.invoke(main, ["evaluate", str(pristine / "run"), "--split", "train", "--cache", str(cache)])
    assert r.exit_code == 2 and where in r.stderr and "Traceback" not in r.output, r.output
    r = runner.invoke(main, ["verify", str(cache)])
    assert r.exit_code == 1 and where in r.output, r.output


def test_verify_marks_bad_blocks_and_extract_redoes_exactly_those(pristine, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(pristine / "cache", cache)
    damage(chunk_file(cache, "train", "h0", (0, 0)), "flip")
    damage(chunk_file(cache, "train", "h2", (4, 1)), "delete")
    damage(chunk_file(cache, "test", "row_ids", (1,)), "truncate")
    runner = CliRunner()
    assert runner.invoke(main, ["verify", str(cache)]).exit_code == 1
    r = runner.invoke(main, ["verify", str(cache), "--mark-bad"])
    assert r.exit_code == 1 and "marked 3 block(s) not done" in r.output, r.output
    r = runner.invoke(main, ["info", str(cache)])
    assert "INCOMPLETE" in r.output
    r = runner.invoke(main, ["extract", str(pristine / "p.toml"), "--cache", str(cache), "-q"])
    assert r.exit_code == 0, r.output
    assert "train: 32 samples extracted, 2/8 blocks written now" in r.stdout
    assert "test: 16 samples extracted, 1/3 blocks written now" in r.stdout
    r = runner.invoke(main, ["verify", str(cache)])
    assert r.exit_code == 0 and "every chunk checks out" in r.output, r.output
    a, b = Cache(cache), Cache(pristine / "cache")
    conftest.assert_same_arrays(a, b)  # within one step of the format: the CLI ran at other threads


def test_extract_redoes_blocks_whose_chunks_were_deleted(pristine, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(pristine / "cache", cache)
    damage(chunk_file(cache, "validation", "h1", (0, 0)), "delete")
    r = CliRunner().invoke(main, ["extract", str(pristine / "p.toml"), "--cache", str(cache), "-q"])
    assert r.exit_code == 0 and "validation: 16 samples extracted, 1/3 blocks written now" in r.stdout, r.output
    assert "1 block(s) had missing chunks" in r.stdout
    assert CliRunner().invoke(main, ["verify", str(cache)]).exit_code == 0


@pytest.mark.slow
def test_a_second_writer_waits_for_the_first_and_leaves_its_files_alone(pristine, tmp_path):
    """The test holds the cache's lock as a running writer would, with a temporary file in flight."""
    import threading

    from sherl_pipe.locks import FolderLock

    cache = tmp_path / "cache"
    shutil.copytree(pristine / "cache", cache)
    in_flight = cache / "train" / "h0" / "c" / "0" / "0" / "0.12345.partial"
    in_flight.write_bytes(b"being written")
    lock = FolderLock(cache)
    assert lock.acquire(wait=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    second = subprocess.Popen([sys.executable, "-m", "sherl_pipe", "extract", "-q", str(pristine / "p.toml"),
                               "--cache", str(cache)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    said = threading.Event()
    err_lines = []

    def read_stderr():
        for line in second.stderr:
            err_lines.append(line)
            if "another sherl-pipe process is writing this cache; waiting" in line:
                said.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert said.wait(timeout=120), "".join(err_lines)
        time.sleep(0.2)
        assert second.poll() is None and in_flight.is_file()  # it waits, and deletes nothing meanwhile
    finally:
        in_flight.unlink()
        lock.release()
    out = second.stdout.read()
    assert second.wait(timeout=120) == 0, "".join(err_lines)
    assert "already complete" in out and "nothing to do" in out
    assert CliRunner().invoke(main, ["verify", str(cache)]).exit_code == 0


def test_info_reports_missing_chunks(pristine, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(pristine / "cache", cache)
    assert "(complete" in CliRunner().invoke(main, ["info", str(cache)]).output
    damage(chunk_file(cache, "test", "h2", (0, 0)), "delete")
    out = CliRunner().invoke(main, ["info", str(cache)]).output
    assert "(DAMAGED" in out and "DAMAGED: 1 chunk(s) missing" in out


def test_every_chunk_of_a_done_block_is_stored_even_when_all_fill(tmp_path, bert_dir):
    """Labels all 0 (the fill value) in a block: the chunk is still written, so that a missing
    chunk always means damage."""
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"good film {i},{'pos' if i >= 8 else 'neg'}\n" for i in range(16)))
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, data, tmp_path / "cache")
    extract(load_pipeline(str(pipe), ["extract.chunk_size=4", "data.split_sizes=[8, 4, 4]"]))
    cache = Cache(tmp_path / "cache")
    for split in cache.splits:
        assert cache.missing_chunks(split) == {}
        assert len(cache.chunk_keys(split, "labels")) == cache.split_info(split)["blocks"]
