"""Caches on an object store: a real S3 server (moto's, on 127.0.0.1, started once for the session)
serves extract -> info -> verify -> train -> evaluate -> predict; a SIGKILLed extraction resumes to
an equal cache; damage is named by verify and repaired by --mark-bad + extract; two workers write
the same cache as one process; a sweep's trials read it; what S3 refuses is one error line; no
secret is written or printed. Nothing leaves the machine."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import conftest
from conftest import skip_unless_ci, write_full_pipeline
from sherl_pipe.cache import Cache
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.extraction import extract

SECRET = "sherl-fake-secret-Zq7Kx93"  # a distinctive fake secret key: must appear nowhere
KEY_ID = "AKIASHERLTESTFAKE"
BUCKET = "sherl-test"


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on a free loopback port, a bucket, and fake credentials in the environment
    (workers and subprocesses inherit them); (endpoint URL, boto3 client)."""
    try:
        from moto.server import ThreadedMotoServer
        import boto3
    except ImportError:
        skip_unless_ci('the S3 tests need moto[server] and boto3 (pip install -e ".[test]")')
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield url, client
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def s3_pipeline(tmp: Path, bert_dir, data, endpoint: str, prefix: str, extra: str = "") -> Path:
    """A pipeline whose cache is s3://BUCKET/PREFIX, the endpoint in extract.storage_options."""
    p = write_full_pipeline(tmp / f"{prefix}.toml", bert_dir, data, f"s3://{BUCKET}/{prefix}", tmp / f"run-{prefix}",
                            f'storage_options = {{endpoint_url = "{endpoint}"}}\n{extra}', "max_steps = 3")
    return p


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, bert_dir, labeled_csv):
    """The same pipeline's cache in a local folder, by one process: what every S3 cache must equal."""
    root = tmp_path_factory.mktemp("local")
    p = write_full_pipeline(root / "p.toml", bert_dir, labeled_csv, root / "cache", root / "run")
    extract(load_pipeline(str(p)))
    return root / "cache"


@pytest.fixture(scope="module")
def s3_cache(s3, tmp_path_factory, bert_dir, labeled_csv):
    """A finished S3 cache (its pipeline file), extracted once for the module."""
    root = tmp_path_factory.mktemp("s3cache")
    p = s3_pipeline(root, bert_dir, labeled_csv, s3[0], "shared")
    extract(load_pipeline(str(p)), log=lambda m: None)
    return p


def open_s3(endpoint: str, prefix: str) -> Cache:
    return Cache(f"s3://{BUCKET}/{prefix}", {"endpoint_url": endpoint})


def wait_for_blocks(client, prefix: str, proc, count: int = 3) -> None:
    """Until the extraction PROC writing s3://BUCKET/PREFIX has marked COUNT train blocks done (or
    ended): the moment to cut it off in the middle of the split."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if sum("/train/done/c/" in k for k in keys(client, f"{prefix}/")) >= count:
            return
        time.sleep(0.02)


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def no_secret_anywhere(client, folders: list[Path], outputs: list[str]) -> None:
    """The fake secret is in no object of the bucket, no file of these folders, no output."""
    for key in keys(client, ""):
        assert SECRET.encode() not in client.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key
    for folder in folders:
        for f in folder.rglob("*"):
            assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f
    for text in outputs:
        assert SECRET not in text


def one_error_line(result, *needles):
    conftest.one_error_line(result, *needles)
    assert SECRET not in result.output


@pytest.mark.slow
def test_extract_info_verify_train_evaluate_predict_on_s3(s3, tmp_path, bert_dir, labeled_csv, local_cache):
    endpoint, client = s3
    p = s3_pipeline(tmp_path, bert_dir, labeled_csv, endpoint, "roundtrip")
    url = f"s3://{BUCKET}/roundtrip"
    runner, outputs = CliRunner(), []
    # the credentials given as settings too: used, never written or printed
    creds = ["--set", f"extract.storage_options.key={KEY_ID}", "--set", f"extract.storage_options.secret={SECRET}"]
    for args in (["extract", str(p), *creds], ["train", str(p), *creds]):
        r = runner.invoke(main, args)
        outputs.append(r.output)
        assert r.exit_code == 0, r.output
    assert "complete" in outputs[0] and "run " in outputs[1]
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # info and verify take a URL alone: the endpoint from the environment
    try:
        for args, expect in ((["info", url], "(complete"), (["verify", url], "every chunk checks out")):
            r = runner.invoke(main, args)
            outputs.append(r.output)
            assert r.exit_code == 0 and expect in r.output, r.output
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
    run = tmp_path / "run-roundtrip"
    assert json.loads((run / "model.json").read_text())["cache"] == url
    r = runner.invoke(main, ["evaluate", str(run)])  # the endpoint from the run's config.json
    outputs.append(r.output)
    assert r.exit_code == 0 and "test (40 rows" in r.output, r.output
    (tmp_path / "new.csv").write_text("text\ngood film\nawful plot\n")
    r = runner.invoke(main, ["predict", str(run), "--input", str(tmp_path / "new.csv"), "--output",
                             str(tmp_path / "out.csv")])
    assert r.exit_code == 0 and "wrote 2 predictions" in r.output, r.output
    conftest.assert_same_arrays(Cache(local_cache), open_s3(endpoint, "roundtrip"))
    no_secret_anywhere(client, [tmp_path], outputs)


@pytest.mark.slow
def test_a_killed_extraction_on_s3_resumes_to_an_equal_cache(s3, tmp_path, bert_dir, labeled_csv, local_cache):
    """SIGKILL mid-way: its lease is left behind, held by a dead process of this host, so the rerun
    takes it over at once; it redoes only the blocks not done."""
    endpoint, client = s3
    p = s3_pipeline(tmp_path, bert_dir, labeled_csv, endpoint, "killed")
    small = ["extract.chunk_size=4"]  # many small blocks: the kill lands in the middle
    extract(load_pipeline(str(p), [*small, f"extract.cache={tmp_path / 'local4'}"]))
    proc = subprocess.Popen([sys.executable, "-m", "sherl_pipe", "extract", "-q", str(p), "--set", small[0]],
                            env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_blocks(client, "killed", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    done, total = open_s3(endpoint, "killed").blocks_done("train")
    assert 0 < done < total  # killed in the middle of the train split
    summary = extract(load_pipeline(str(p), small), log=lambda m: None)
    assert summary.resumed and summary.splits["train"].blocks_written == total - done
    conftest.assert_same_arrays(Cache(tmp_path / "local4"), open_s3(endpoint, "killed"))


def copy_prefix(client, source: str, target: str) -> None:
    for key in keys(client, f"{source}/"):
        client.copy_object(Bucket=BUCKET, Key=target + key[len(source):], CopySource={"Bucket": BUCKET, "Key": key})


@pytest.mark.slow
def test_damaged_objects_are_named_by_verify_and_repaired(s3, s3_cache, tmp_path):
    endpoint, client = s3
    copy_prefix(client, "shared", "damaged")
    arrays = f"damaged/{open_s3(endpoint, 'damaged').manifest['arrays']}"  # where its arrays are
    flipped, deleted = f"{arrays}/train/h1/c/2/0/0", f"{arrays}/test/lengths/c/1"
    body = bytearray(client.get_object(Bucket=BUCKET, Key=flipped)["Body"].read())
    body[len(body) // 2] ^= 0x10
    client.put_object(Bucket=BUCKET, Key=flipped, Body=bytes(body))
    client.delete_object(Bucket=BUCKET, Key=deleted)
    url, runner = f"s3://{BUCKET}/damaged", CliRunner()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        r = runner.invoke(main, ["verify", url])
        assert r.exit_code == 1, r.output
        assert "split 'train', array 'h1', chunk (2, 0): checksum mismatch" in r.output
        assert "split 'test', array 'lengths', chunk (1,): missing" in r.output
        r = runner.invoke(main, ["verify", url, "--mark-bad"])
        assert r.exit_code == 1 and "marked 2 block(s) not done" in r.output, r.output
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
    r = runner.invoke(main, ["extract", str(s3_cache), "--cache", url, "-q"])
    assert r.exit_code == 0 and "train: 16 samples extracted, 1/8 blocks written now" in r.output, r.output
    assert "test: 16 samples extracted, 1/3 blocks written now" in r.output
    cache = open_s3(endpoint, "damaged")
    for split in cache.splits:
        assert cache.missing_chunks(split) == {}
    conftest.assert_same_arrays(open_s3(endpoint, "shared"), cache)


async def _die():
    os._exit(1)


@pytest.mark.slow
def test_two_workers_write_to_s3_what_one_process_writes_locally(s3, tmp_path, bert_dir, labeled_csv, local_cache,
                                                                monkeypatch):
    """One worker is killed once the first block is back: its blocks in flight are run again
    elsewhere, and the cache still equals a single process's."""
    import sherl_pipe.distributed_extract as distributed

    real, killed, seen = distributed.run_blocks, [], []

    def run_blocks_killing_a_worker(client, job, tasks, on_done, check_lock=lambda: None):
        def on_done_then_kill(counts):
            on_done(counts)
            seen.append(set(client.scheduler_info(n_workers=-1)["workers"]))
            if not killed:
                killed.append(sorted(client.scheduler_info(n_workers=-1)["workers"])[0])
                client.run(_die, workers=killed[:1], wait=False)  # on the worker's loop, no reply awaited

        return real(client, job, tasks, on_done_then_kill, check_lock)

    monkeypatch.setattr(distributed, "run_blocks", run_blocks_killing_a_worker)
    endpoint, client = s3
    p = s3_pipeline(tmp_path, bert_dir, labeled_csv, endpoint, "twoworkers", "workers = 2")
    said = []
    summary = extract(load_pipeline(str(p)), log=said.append)
    assert killed and any(killed[0] not in workers for workers in seen)  # it died and was replaced
    assert any("local cluster of 2 worker processes" in m for m in said), said
    assert summary.samples == 200 and sum(s.blocks_written for s in summary.splits.values()) == 14
    conftest.assert_same_arrays(Cache(local_cache), open_s3(endpoint, "twoworkers"))


@pytest.mark.slow
def test_a_sweep_reads_a_cache_on_s3(s3, s3_cache, tmp_path, monkeypatch):
    """The credentials only as settings (not in the workers' environment): trials get them in memory."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[sweep]\ntrials = 2\nworkers = 1\nsampler = "grid"\n[sweep.space]\nlr = [0.001, 0.003]\n')
    creds = ["--set", f"extract.storage_options.key={KEY_ID}", "--set", f"extract.storage_options.secret={SECRET}"]
    r = CliRunner().invoke(main, ["sweep", str(s3_cache), "--sweep", str(sweep), "--sweep-dir",
                                  str(tmp_path / "sw"), "-q", *creds])
    assert r.exit_code == 0, r.output
    assert "complete, matches the pipeline" in r.output
    rows = (tmp_path / "sw" / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",complete," in row for row in rows[1:]), rows
    no_secret_anywhere(s3[1], [tmp_path], [r.output])


@pytest.mark.slow
def test_an_fsspec_store_serves_s3_too(s3, tmp_path, bert_dir, labeled_csv, local_cache):
    """An s3fs option obstore does not take (use_ssl) sends the URL through FsspecStore: the same
    cache, the lease taken by s3fs's conditional create."""
    endpoint, client = s3
    p = s3_pipeline(tmp_path, bert_dir, labeled_csv, endpoint, "viafsspec")
    pipe = load_pipeline(str(p), ["extract.storage_options.use_ssl=false"])
    extract(pipe, log=lambda m: None)
    from zarr.storage import FsspecStore

    from sherl_pipe.cache.location import pipeline_location

    loc = pipeline_location(pipe)
    assert isinstance(loc.store(), FsspecStore)
    conftest.assert_same_arrays(Cache(local_cache), Cache(loc))
    assert keys(client, "viafsspec.sherl-lease/") == ["viafsspec.sherl-lease/00000001.json"]


# ---------------------------------------------------------------------------------------------
# What S3 refuses: one line naming the URL and what to do, exit 2, nothing that could pass for a cache


def try_extract(s3, tmp_path, bert_dir, labeled_csv, prefix, *sets, bucket=BUCKET):
    p = s3_pipeline(tmp_path, bert_dir, labeled_csv, s3[0], prefix)
    args = ["extract", str(p), "-q", "--cache", f"s3://{bucket}/{prefix}"]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(main, args)


def refused(s3, tmp_path, bert_dir, labeled_csv, prefix, *sets, bucket=BUCKET):
    r = try_extract(s3, tmp_path, bert_dir, labeled_csv, prefix, *sets, bucket=bucket)
    assert not keys(s3[1], f"{prefix}/zarr.json")  # nothing half-written that could pass for a cache
    return r


def test_an_unreachable_endpoint_is_one_line(s3, tmp_path, bert_dir, labeled_csv):
    r = refused(s3, tmp_path, bert_dir, labeled_csv, "unreach", "extract.storage_options.endpoint_url=http://127.0.0.1:1")
    one_error_line(r, f"s3://{BUCKET}/unreach", "cannot reach the storage endpoint http://127.0.0.1:1", "endpoint_url")


def test_a_missing_bucket_is_one_line(s3, tmp_path, bert_dir, labeled_csv):
    r = refused(s3, tmp_path, bert_dir, labeled_csv, "nob", bucket="no-such-bucket")
    one_error_line(r, "s3://no-such-bucket/nob", "the bucket 'no-such-bucket' does not exist", "create it")


def test_denied_access_is_one_line(s3, tmp_path, bert_dir, labeled_csv, monkeypatch):
    from moto import settings

    with monkeypatch.context() as m:
        m.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys: ours are unknown
        r = try_extract(s3, tmp_path, bert_dir, labeled_csv, "denied")
    assert not keys(s3[1], "denied/zarr.json")
    one_error_line(r, f"s3://{BUCKET}/denied", "access denied", "AWS_SECRET_ACCESS_KEY")


def test_missing_credentials_are_one_line(s3, tmp_path, bert_dir, labeled_csv, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", "http://127.0.0.1:1")  # no cloud instance to ask either
    r = refused(s3, tmp_path, bert_dir, labeled_csv, "nocreds")
    one_error_line(r, f"s3://{BUCKET}/nocreds", "no credentials found", "AWS_ACCESS_KEY_ID")


def test_a_scheme_without_a_backend_names_what_to_install(tmp_path, bert_dir, labeled_csv):
    p = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, "oss://bucket/cache", tmp_path / "run")
    r = CliRunner().invoke(main, ["extract", str(p), "-q"])
    one_error_line(r, "oss://bucket/cache", "no installed backend serves oss:// URLs", "Install ossfs")


@pytest.mark.slow
def test_a_lease_held_elsewhere_refuses_a_second_extraction(s3, tmp_path, bert_dir, labeled_csv):
    """Another host's extraction holds the lease (renewed just now): refused with its host and age;
    once its lease runs out (it crashed), the next extraction takes it over."""
    endpoint, client = s3
    holder = {"host": "worker-7.example", "pid": 4242, "since": time.time() - 30, "renewed": time.time(),
              "seconds": 120, "released": False}
    client.put_object(Bucket=BUCKET, Key="held.sherl-lease/00000001.json", Body=json.dumps(holder).encode())
    start = time.time()
    r = refused(s3, tmp_path, bert_dir, labeled_csv, "held")
    took = time.time() - start
    one_error_line(r, f"s3://{BUCKET}/held", "another extraction is writing it", "host worker-7.example",
                   "pid 4242", "s, lease renewed")
    # the age is read when the refusal is made, up to TOOK seconds after the holder's 30 (a loaded
    # machine took over a second: "for 31 s")
    assert 30 <= int(re.search(r"for (\d+) s, lease renewed", r.stderr).group(1)) <= 30 + took + 1, r.stderr
    # it crashed: not renewed for longer than its lease (2 s here), by the store's clock
    client.put_object(Bucket=BUCKET, Key="held.sherl-lease/00000001.json",
                      Body=json.dumps({**holder, "seconds": 2}).encode())
    time.sleep(3.5)
    p = s3_pipeline(tmp_path, bert_dir, labeled_csv, endpoint, "held")
    assert extract(load_pipeline(str(p)), log=lambda m: None).samples == 200
    mine = json.loads(client.get_object(Bucket=BUCKET, Key="held.sherl-lease/00000002.json")["Body"].read())
    assert mine["released"] and mine["pid"] == os.getpid()


@pytest.mark.slow
def test_only_one_of_two_contenders_takes_a_lease(s3):
    """The conditional create lets exactly one of two contenders in; the other is refused; a
    holder that finds a newer generation (it froze past its expiry) knows it lost the lease."""
    from sherl_pipe.cache.lease import Lease, LeaseHeld
    from sherl_pipe.cache.location import Location
    from sherl_pipe.errors import SherlError

    loc = Location(f"s3://{BUCKET}/contended", {"endpoint_url": s3[0]})
    first, second = Lease(loc, seconds=1.0), Lease(loc, seconds=1.0)
    first.acquire()
    with pytest.raises(LeaseHeld, match="another extraction is writing it"):
        second.acquire()
    first._stop.set()  # first freezes: no renewal
    first._thread.join()
    time.sleep(2.5)  # past its lease by the store's clock, whose times are whole seconds on S3
    second.acquire()  # the expired lease is taken over: generation 2
    assert second.generation == 2
    first._stop.clear()
    first._renew_once()
    with pytest.raises(SherlError, match="lost its lease"):
        first.check()
    second.release()


@pytest.mark.slow
def test_extract_overwrite_on_an_s3_cache_rebuilds_it(s3, tmp_path, bert_dir, labeled_csv, local_cache):
    """Old code: `extract --overwrite` on an existing object-store cache crashed clearing it
    (RuntimeError: no running event loop)."""
    endpoint, client = s3
    p = s3_pipeline(tmp_path, bert_dir, labeled_csv, endpoint, "overwritten")
    extract(load_pipeline(str(p)), log=lambda m: None)
    put = client.put_object(Bucket=BUCKET, Key="overwritten/stray-object", Body=b"x")
    assert put
    r = CliRunner().invoke(main, ["extract", str(p), "-q", "--overwrite"])
    assert r.exit_code == 0, (r.output, __import__("traceback").format_exception(*r.exc_info))
    assert "overwritten/stray-object" not in keys(client, "overwritten/")
    conftest.assert_same_arrays(Cache(local_cache), open_s3(endpoint, "overwritten"))


@pytest.mark.slow
def test_a_paused_writer_never_writes_into_the_cache_that_took_its_place(s3, tmp_path, bert_dir, labeled_csv):
    """Extraction A is stopped (SIGSTOP) mid-way; its lease runs out (extract.lease_seconds = 3);
    extraction B of other rows, same settings, takes the cache with --overwrite and finishes; A is
    continued. Old code: A wrote its blocks in flight and queued into B's cache, which then held
    rows of A's data and read as complete. Now B's arrays live under a key of B's own that its
    manifest names, A checks its lease before each block, and B's cache equals a local extraction
    of B's rows."""
    from conftest import make_text_file
    from sherl_pipe.cache.verify import verify_cache

    endpoint, client = s3
    sets = ["--set", "extract.chunk_size=4", "--set", "extract.lease_seconds=3"]
    p = s3_pipeline(tmp_path, bert_dir, labeled_csv, endpoint, "fenced")
    a = subprocess.Popen([sys.executable, "-m", "sherl_pipe", "extract", "-q", str(p), *sets], env=os.environ.copy(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_blocks(client, "fenced", a)
        a.send_signal(signal.SIGSTOP)
        time.sleep(4)  # past A's lease
        other = make_text_file(tmp_path / "other.csv", n=200, seed=11)
        q = s3_pipeline(tmp_path, bert_dir, other, endpoint, "fenced")
        r = CliRunner().invoke(main, ["extract", str(q), "-q", "--overwrite", *sets])
        assert r.exit_code == 0, r.output
    finally:
        a.send_signal(signal.SIGCONT)
    _, err = a.communicate(timeout=120)
    assert a.returncode == 2 and "lease" in err, err  # A stopped on its lost lease, with one error line
    extract(load_pipeline(str(q), ["extract.chunk_size=4", f"extract.cache={tmp_path / 'b-local'}"]),
            log=lambda m: None)
    b = open_s3(endpoint, "fenced")
    conftest.assert_same_arrays(Cache(tmp_path / "b-local"), b)  # not one row of A's
    assert b.is_complete() and not verify_cache(f"s3://{BUCKET}/fenced", options={"endpoint_url": endpoint}).problems


def test_a_worker_checks_the_lease_before_it_writes_a_block(s3):
    """A dask worker of an extraction that lost the cache's lease writes nothing more (old code:
    workers never checked the lease)."""
    import dataclasses

    from sherl_pipe.blocks import BlockJob, check_generation
    from sherl_pipe.cache.lease import Lease
    from sherl_pipe.cache.location import as_location
    from sherl_pipe.errors import SherlError

    loc = as_location(f"s3://{BUCKET}/generations", {"endpoint_url": s3[0]})
    first = Lease(loc)
    first.acquire()
    first.release()
    second = Lease(loc)
    second.acquire()
    try:
        job = BlockJob(loc, "b", "eager", "cpu", (0,), 8, "float16", 16, {}, "the cache", generation=1)
        with pytest.raises(SherlError, match="lost the cache's lease"):
            check_generation(job)
        check_generation(dataclasses.replace(job, generation=2))  # the holder's own worker writes
    finally:
        second.release()


class AheadClock:
    """time for the lease module of a contender whose clock runs 130 s ahead."""

    def __init__(self, ahead: float):
        self.ahead = ahead

    def time(self) -> float:
        return time.time() + self.ahead

    def __getattr__(self, name):
        return getattr(time, name)


def test_a_contender_whose_clock_runs_ahead_does_not_take_a_fresh_lease(s3, tmp_path, bert_dir, labeled_csv,
                                                                         monkeypatch):
    """Old code compared the contender's clock with the holder's record: 130 s ahead, it took over a
    lease renewed moments before. Expiry is now judged by the store's clock."""
    import sherl_pipe.cache.lease as lease

    endpoint, client = s3
    holder = {"host": "worker-8.example", "pid": 4343, "since": time.time() - 5, "renewed": time.time(),
              "seconds": 120, "released": False}
    client.put_object(Bucket=BUCKET, Key="skewed.sherl-lease/00000001.json", Body=json.dumps(holder).encode())
    monkeypatch.setattr(lease, "time", AheadClock(130.0))
    r = refused(s3, tmp_path, bert_dir, labeled_csv, "skewed")
    one_error_line(r, "another extraction is writing it", "host worker-8.example", "lease renewed ")
    # by the store's clock, seconds ago (its times have whole seconds: 0 or 1 s, more on a busy machine),
    # never the contender's 130 s ahead
    assert int(re.search(r"lease renewed (\d+) s ago", r.stderr).group(1)) < 30, r.stderr
    assert keys(client, "skewed.sherl-lease/") == ["skewed.sherl-lease/00000001.json"]


@pytest.mark.slow
def test_run_with_credentials_only_in_the_pipeline_evaluates_too(s3, tmp_path, bert_dir, labeled_csv, monkeypatch):
    """Old code: `run` trained, then evaluated without the storage options and failed with 'no
    credentials found' (which the pipeline did give)."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    p = s3_pipeline(tmp_path, bert_dir, labeled_csv, s3[0], "runcreds")
    creds = ["--set", f"extract.storage_options.key={KEY_ID}", "--set", f"extract.storage_options.secret={SECRET}"]
    r = CliRunner().invoke(main, ["run", str(p), "-q", *creds])
    assert r.exit_code == 0 and "test (40 rows" in r.output, r.output
    no_secret_anywhere(s3[1], [tmp_path], [r.output])


def test_an_unknown_storage_option_is_one_line(s3, tmp_path, bert_dir, labeled_csv):
    """Old code: s3fs built its session at the first listing, outside the option check: a 74-line
    traceback."""
    r = refused(s3, tmp_path, bert_dir, labeled_csv, "bogus", "extract.storage_options.bogus_option=1")
    one_error_line(r, f"s3://{BUCKET}/bogus", "bogus_option", "extract.storage_options")
