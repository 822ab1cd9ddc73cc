"""Cache locations other than a local folder, without a server: fsspec's memory:// filesystem,
file:// URLs, storage options on the command line and kept out of everything written; and the
trainer's reader hiding a store's latency."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

import conftest
from conftest import write_full_pipeline
from sherl_pipe.cache import Cache
from sherl_pipe.config import dumps, load_pipeline, to_toml
from sherl_pipe.extraction import extract
from sherl_pipe.training import train


def test_a_cache_in_memory_is_extracted_trained_on_and_equal_to_a_folder(tmp_path, bert_dir, labeled_csv,
                                                                        fp32_cache):
    """memory:// goes through FsspecStore (the fallback for every scheme obstore does not serve);
    its lease through the memory filesystem's exclusive create."""
    from zarr.storage import FsspecStore

    p = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, "memory://sherl/cache", tmp_path / "run",
                            'dtype = "float32"', "max_steps = 2")
    pipe = load_pipeline(str(p))
    extract(pipe, log=lambda m: None)
    cache = Cache("memory://sherl/cache")
    assert isinstance(cache.store, FsspecStore)
    conftest.assert_same_arrays(Cache(fp32_cache), cache)  # within one float32 step: see conftest
    assert train(pipe, log=lambda m: None).steps == 2
    assert json.loads((tmp_path / "run" / "model.json").read_text())["cache"] == "memory://sherl/cache"


def test_a_file_url_is_the_local_folder(fp32_cache):
    assert Cache(f"file://{fp32_cache}").location.is_local
    assert Cache(f"file://{fp32_cache}").manifest == Cache(fp32_cache).manifest


def test_storage_options_are_set_key_by_key_and_credentials_never_shown():
    pipe = load_pipeline(None, ["extract.cache=s3://b/c", "extract.storage_options.endpoint_url=http://h:1",
                                "extract.storage_options.client_kwargs.region_name=eu-west-1",
                                "extract.storage_options.secret=TOPSECRET", "train.storage_options.key=AKIA1"])
    assert pipe.extract.storage_options == {"endpoint_url": "http://h:1", "client_kwargs": {"region_name": "eu-west-1"},
                                            "secret": "TOPSECRET"}
    for text in (dumps(pipe), to_toml(pipe), json.dumps(pipe.to_dict())):
        assert "TOPSECRET" not in text and "AKIA1" not in text and "http://h:1" in text
    assert pipe.to_dict(secrets=True)["extract"]["storage_options"]["secret"] == "TOPSECRET"  # in memory only


def test_the_reader_fetches_chunks_concurrently_so_a_stores_latency_does_not_add_up(fp32_cache, monkeypatch):
    """Every chunk request takes 50 ms (a distant object store): one at a time an epoch would wait
    50 ms per chunk; fetched ahead, concurrently, it waits a few such delays in all."""
    from zarr.storage import LocalStore

    from sherl_pipe.training.batches import SplitSource

    real = LocalStore.get
    requests = []

    async def slow_get(self, key, *args, **kwargs):
        if "/c/" in key:
            requests.append(key)
            await asyncio.sleep(0.05)
        return await real(self, key, *args, **kwargs)

    cache = Cache(fp32_cache)
    source = SplitSource(cache, "train", cache.tiers)
    batches = source.sampler(8, 4, 32, seed=0).batches(0)
    monkeypatch.setattr(LocalStore, "get", slow_get)
    start = time.perf_counter()
    seen = sum(len(b.index) for b in source.iterate(batches))
    elapsed = time.perf_counter() - start
    assert seen == source.n and len(requests) >= 20
    assert elapsed < 0.05 * len(requests) / 3, (elapsed, len(requests))


def test_a_cache_at_a_buckets_root_is_refused_before_any_work(tmp_path, bert_dir, labeled_csv):
    """Its lease would sit inside it (beside a cache means beside the prefix), so the cache was
    taken for someone else's objects once the lease existed, and could never be written."""
    from click.testing import CliRunner

    from sherl_pipe.cli import main

    p = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, "memory://rootcache", tmp_path / "run")
    r = CliRunner().invoke(main, ["extract", str(p), "-q"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: cache memory://rootcache: a cache on an object store needs a prefix inside the bucket, e.g. "
        "memory://rootcache/my-cache; set extract.cache (or --cache) to one"], r.output


def test_clearing_a_cache_deletes_its_zarr_json_last(fp32_cache, tmp_path, monkeypatch):
    """An --overwrite cut off half-way leaves something still recognisably a cache (which a rerun
    may clear), never a folder refused ever after as someone else's."""
    import shutil

    from zarr.storage import LocalStore

    from sherl_pipe.cache import access
    from sherl_pipe.cache.location import Location
    from sherl_pipe.cache.store import is_sherl_cache

    cache = tmp_path / "c"
    shutil.copytree(fp32_cache, cache)
    deleted, real = [], LocalStore.delete

    class Cut(Exception):
        pass

    async def cut_after_the_first(self, key):  # (an exception, not a KeyboardInterrupt: that one
        deleted.append(key)                    # would end zarr's event loop and hang the test)
        if len(deleted) == 2:
            raise Cut
        return await real(self, key)

    listed = LocalStore.list_dir

    async def zarr_json_first(self, prefix):  # a listing's order is the filesystem's: take the worst
        entries = [e async for e in listed(self, prefix)]
        for e in sorted(entries, key=lambda e: e != "zarr.json"):
            yield e

    monkeypatch.setattr(LocalStore, "list_dir", zarr_json_first)
    monkeypatch.setattr(LocalStore, "delete", cut_after_the_first)
    with pytest.raises(Cut):
        access.clear(Location(str(cache)))
    assert deleted[0] != "zarr.json" and is_sherl_cache(Location(str(cache)))


def test_a_pipelines_repr_shows_no_storage_option():
    p = load_pipeline("quickstart", ["extract.storage_options.secret=s3cr3t-value"])
    assert "s3cr3t-value" not in repr(p) and "s3cr3t-value" not in repr(p.extract)


def test_releasing_a_lease_never_hides_the_error_that_ended_the_run(monkeypatch):
    """release() runs in extract's `finally`: a store error there (one the translation does not
    know, as a server's 5xx) replaced the run's own error line with a traceback."""
    from sherl_pipe.cache import access
    from sherl_pipe.cache.lease import Lease
    from sherl_pipe.cache.location import Location

    def failing_put(*args, **kwargs):
        raise RuntimeError("503 Service Unavailable")

    lease = Lease(Location("memory://bucket/cache"))
    lease.generation = 1  # held, without a renewal thread
    monkeypatch.setattr(access, "put", failing_put)
    lease.release()  # no exception: the lease runs out by itself
    assert lease.generation is None


def test_a_store_failure_is_one_line_naming_the_cache_without_its_secret():
    """A server's 5xx after the client's retries (obstore's GenericError) was no known refusal:
    `translated` re-raised it and the user got a traceback."""
    from obstore.exceptions import GenericError

    from sherl_pipe.cache.access import storage_problem
    from sherl_pipe.cache.location import Location

    loc = Location("s3://bucket/cache", {"secret": "s3cr3t-value", "key": "id"})
    line = storage_problem(loc, GenericError("Generic S3 error: 503 Service Unavailable (s3cr3t-value)"))
    assert line.startswith("cache s3://bucket/cache: the store failed (GenericError: ") and "rerun" in line
    assert "s3cr3t-value" not in line
    assert storage_problem(loc, ZeroDivisionError("a bug")) is None  # a bug keeps its traceback


def test_a_store_failure_inside_zarrs_reads_is_one_error_line(fp32_cache, monkeypatch):
    """Reads zarr makes itself (arrays, not our access calls) raise the backend's own exception; the
    CLI turned none of them into a line."""
    from click.testing import CliRunner
    from obstore.exceptions import GenericError
    from zarr.storage import LocalStore

    from conftest import one_error_line
    from sherl_pipe.cli import main

    async def failing_get(self, key, *args, **kwargs):
        if key.endswith("zarr.json"):
            return await real_get(self, key, *args, **kwargs)
        raise GenericError("Generic S3 error: 503 Service Unavailable")

    real_get = LocalStore.get
    monkeypatch.setattr(LocalStore, "get", failing_get)
    result = CliRunner().invoke(main, ["verify", str(fp32_cache)])
    one_error_line(result, "GenericError: Generic S3 error: 503 Service Unavailable", "rerun the command")


def test_the_cli_turns_a_backend_failure_anywhere_into_one_line_and_keeps_a_bugs_traceback(capsys):
    """The last resort for a backend's exception raised where no location is at hand (inside
    zarr's array reads, behind the training reader)."""
    from obstore.exceptions import GenericError

    import sherl_pipe.cli as cli

    @cli._fail_cleanly
    def store_fails():
        raise GenericError("Generic S3 error: 503 Service Unavailable")

    @cli._fail_cleanly
    def buggy():
        raise ZeroDivisionError("ours")

    with pytest.raises(SystemExit) as stop:
        store_fails()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the storage backend failed (GenericError: "), err
    with pytest.raises(ZeroDivisionError):
        buggy()
