"""Reading, writing, listing and deleting a cache's keys through its zarr store, with what a remote
store refuses turned into one line that names the URL and what to do.

Every call runs on zarr's event loop (location.run). Many keys at once (a block's chunks, a
verify pass) go out as concurrent requests, at most location.CONCURRENCY in flight, so a store
with milliseconds of latency per request costs milliseconds per batch of keys, not per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from sherl_pipe.cache.location import CONCURRENCY, Location, _clean, first_line, run
from sherl_pipe.errors import SherlError, naming


def _buffer(data):
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype().buffer.from_bytes(data)


def _prototype():
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype()


@contextlib.contextmanager
def translated(loc: Location, key: str = ""):
    """Backend errors as SherlError lines; a local OSError keeps its own line, naming the file."""
    try:
        if loc.is_local:
            with naming(loc.path / key if key else loc.path):
                yield
        else:
            yield
    except SherlError:
        raise
    except Exception as exc:
        if loc.is_local and isinstance(exc, OSError):
            raise
        message = storage_problem(loc, exc)
        if message is None:
            raise
        raise SherlError(message) from None


def _endpoint(loc: Location) -> str:
    opts = {**loc.options.get("client_kwargs", {}), **loc.options}
    return str(opts.get("endpoint_url") or opts.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL")
               or "the service's default endpoint")


def _bucket(loc: Location) -> str:
    return loc.url.partition("://")[2].split("/", 1)[0]


def storage_problem(loc: Location, exc: BaseException) -> str | None:
    """One line for a remote store's refusal, or None for anything else (a bug keeps its traceback)."""
    text = f"{type(exc).__name__} {exc}"
    why = _clean(exc, loc)
    if isinstance(exc, TypeError) and "unexpected keyword argument" in text:
        # s3fs builds its session at the first request, so a bad option surfaces here, not when
        # the store is made (where a TypeError is caught too: location._fsspec)
        return (f"cache {loc}: the storage options are not valid ({why}); check extract.storage_options "
                f"(and train.storage_options)")
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return (f"cache {loc}: the bucket '{_bucket(loc)}' does not exist at {_endpoint(loc)}; create it "
                f"(for example `aws s3 mb s3://{_bucket(loc)}`) or fix the URL")
    # obstore with no credentials anywhere ends asking the instance metadata service (IMDS) for them
    if any(s in text for s in ("NoCredentials", "Unable to locate credentials", "169.254.169.254",
                               "/latest/api/token", "/latest/meta-data", "credentials not found")):
        return (f"cache {loc}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                f"extract.storage_options key and secret; anon = true for a public bucket)")
    if isinstance(exc, PermissionError) or any(s in text for s in (
            "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "PermissionDenied", "Unauthenticated",
            "403 Forbidden", "Forbidden")):
        return (f"cache {loc}: access denied ({why}); check the credentials (AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or extract.storage_options key and secret) and that they may read and "
                f"write this bucket")
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)) or any(s in text for s in (
            "error sending request", "Connection refused", "Could not connect", "ClientConnector",
            "EndpointConnectionError", "dns error", "timed out", "Name or service not known")):
        return (f"cache {loc}: cannot reach the storage endpoint {_endpoint(loc)} ({why}); check endpoint_url "
                f"in extract.storage_options (or AWS_ENDPOINT_URL) and that the server is up")
    if from_backend(exc):
        return f"cache {loc}: the store failed ({type(exc).__name__}: {why}); {RETRY_HINT}"
    return None


# Storage backends whose exceptions are the store's or the network's, not a bug of ours: a server's
# 5xx after the client's retries, a reset connection, a throttled bucket.
BACKENDS = frozenset({"obstore", "botocore", "aiobotocore", "s3fs", "aiohttp", "gcsfs", "adlfs", "fsspec",
                      "google", "azure"})
SERVER_WORDS = ("InternalError", "ServiceUnavailable", "SlowDown", "500 Internal", "502 Bad Gateway",
                "503 Service", "504 Gateway")
RETRY_HINT = ("rerun the command (what was finished is kept: extract redoes only the blocks not done, train "
              "with --resume); if it keeps failing, check the URL and the storage service")


def from_backend(exc: BaseException) -> bool:
    module = type(exc).__module__.split(".")[0]
    return module in BACKENDS or any(w in f"{type(exc).__name__} {exc}" for w in SERVER_WORDS)


def backend_error_line(exc: BaseException) -> str | None:
    """One line for a storage backend's error raised where no cache location is at hand (inside
    zarr's reads): the CLI's last resort before a traceback; None for anything else."""
    if not from_backend(exc):
        return None
    return f"the storage backend failed ({type(exc).__name__}: {first_line(exc, {})}); {RETRY_HINT}"


async def _bounded(coros, limit: int = CONCURRENCY):
    gate = asyncio.Semaphore(limit)

    async def one(c):
        async with gate:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


def get(loc: Location, key: str, store=None):
    """A key's stored bytes (a zarr Buffer), or None if it is not there."""
    store = store or loc.store(read_only=True)
    with translated(loc, key):
        return run(store.get(key, prototype=_prototype()))


def get_many(loc: Location, keys: list[str], store=None) -> list:
    """Several keys' bytes (None where absent), fetched concurrently, in the order asked."""
    store = store or loc.store(read_only=True)
    with translated(loc):
        return run(_bounded([store.get(k, prototype=_prototype()) for k in keys]))


def put(loc: Location, key: str, data, store=None) -> None:
    store = store or loc.store()
    with translated(loc, key):
        run(store.set(key, _buffer(data)))


def put_many(loc: Location, items: list[tuple[str, bytes]], store=None, where: str = "") -> None:
    """Write several keys concurrently; each is one PUT (one rename locally): all or none of a key.
    WHERE (a prefix of them) names the place in an error without a path (a full disk)."""
    store = store or loc.store()
    with translated(loc, items[0][0] if len(items) == 1 else where):
        run(_bounded([store.set(k, _buffer(v)) for k, v in items]))


def put_new(loc: Location, key: str, data, store=None) -> bool:
    """Create KEY only if it does not exist, in one conditional request (S3: a PUT with
    If-None-Match: *): True if this call created it. Never a check-then-set."""
    store = store or loc.store()
    with translated(loc, key):
        return run(_put_new(store, key, data))


async def _put_new(store, key: str, data) -> bool:
    from zarr.storage import FsspecStore, LocalStore, ObjectStore

    if isinstance(store, ObjectStore):
        import obstore

        try:
            await obstore.put_async(store.store, key, data, mode="create")
        except obstore.exceptions.AlreadyExistsError:
            return False
        return True
    if isinstance(store, FsspecStore):
        return await _fsspec_put_new(store, key, data)
    if isinstance(store, LocalStore):
        from zarr.storage._local import _put

        try:
            await asyncio.to_thread(_put, store.root / key, _buffer(data), True)  # os.link: exclusive
        except FileExistsError:
            return False
        return True
    raise SherlError(f"store {store}: has no conditional create; sherl-pipe cannot lock a cache there")


def modified(loc: Location, key: str, store=None) -> float | None:
    """When KEY was last written, by the store's own clock (seconds since the epoch), or None
    where the store does not say."""
    store = store or loc.store(read_only=True)
    with translated(loc, key):
        return run(_modified(store, key))


async def _modified(store, key: str) -> float | None:
    from zarr.storage import FsspecStore, LocalStore, ObjectStore

    if isinstance(store, ObjectStore):
        import obstore

        meta = await obstore.head_async(store.store, key)
        return meta["last_modified"].timestamp()
    if isinstance(store, FsspecStore):
        fs, path = store.fs, f"{store.path.rstrip('/')}/{key}"
        info = await fs._info(path) if getattr(fs, "async_impl", False) else fs.info(path)
        for name in ("LastModified", "last_modified", "mtime", "created"):
            value = info.get(name)
            if value is not None:
                return value.timestamp() if hasattr(value, "timestamp") else float(value)
        return None
    if isinstance(store, LocalStore):
        return os.stat(store.root / key).st_mtime
    return None


def store_now(loc: Location, prefix: str = "") -> float | None:
    """The store's clock now: the time it gives a probe object written and deleted under PREFIX
    (None where it gives none)."""
    import uuid

    key = f"{prefix}clock-{uuid.uuid4().hex}.probe"
    put(loc, key, b"")
    try:
        return modified(loc, key)
    finally:
        delete_many(loc, [key])


async def _fsspec_put_new(store, key: str, data) -> bool:
    """s3fs sends If-None-Match: *; fsspec's memory filesystem opens with 'xb'. Other filesystems'
    `mode="create"` may be a check-then-set, which cannot lock a cache: refused."""
    fs = getattr(store.fs, "sync_fs", store.fs)
    kind = type(fs).__name__
    if kind not in ("S3FileSystem", "MemoryFileSystem"):
        raise SherlError(f"cache {store.path}: {kind} offers no conditional create (If-None-Match) to lock a cache "
                         f"with; install obstore (pip install obstore) to write caches at such URLs")
    path = f"{store.path.rstrip('/')}/{key}"
    try:
        if fs is store.fs:
            await fs._pipe_file(path, bytes(data), mode="create")
        else:
            fs.pipe_file(path, bytes(data), mode="create")
    except FileExistsError:
        return False
    return True


def keys(loc: Location, prefix: str = "", store=None) -> list[str]:
    """Every key under PREFIX, in one listing."""
    store = store or loc.store(read_only=True)
    with translated(loc, prefix):
        return run(_collect(lambda: store.list_prefix(prefix)))


def size(loc: Location, prefix: str = "", store=None) -> int:
    """Bytes stored under PREFIX."""
    store = store or loc.store(read_only=True)
    with translated(loc, prefix):
        return run(store.getsize_prefix(prefix))


def delete_many(loc: Location, names: list[str], store=None) -> None:
    store = store or loc.store()
    with translated(loc):
        run(_bounded([store.delete(k) for k in names]))


def any_key(loc: Location, prefix: str = "", store=None) -> bool:
    """Whether anything is stored under PREFIX (the first key of a listing; a missing bucket or a
    refused listing is an error)."""
    store = store or loc.store(read_only=True)
    with translated(loc, prefix):
        return run(_first(store.list_prefix(prefix))) is not None


async def _collect(listing) -> list:
    """Every item of LISTING(), an async iterator made here, on the running loop."""
    return [item async for item in listing()]


async def _first(aiter):
    async for item in aiter:
        return item
    return None


def probe_write(loc: Location) -> None:
    """Write and delete a probe key: a store that refuses writes is named before any work."""
    import uuid

    key = f"sherl-write-test.{uuid.uuid4().hex}"
    put(loc, key, b"")
    delete_many(loc, [key])


def clear(loc: Location) -> None:
    """Delete everything under a location (a local folder itself stays, and so a lock on it)."""
    store = loc.store()
    with translated(loc):
        # listed on zarr's loop: obstore's list_dir starts its request when called, which outside a
        # running loop is "RuntimeError: no running event loop" (--overwrite on S3 crashed so)
        entries = run(_collect(lambda: store.list_dir("")))
        # zarr.json last: cut off half-way, what is left is still recognisably a cache (which
        # --overwrite may clear again), never a folder that looks like someone else's
        for entry in sorted(entries, key=lambda e: e == "zarr.json"):
            run(store.delete(entry))  # a file, or (local) a folder and all in it
            if not loc.is_local:
                run(store.delete_dir(entry))  # every key under the prefix
