"""Where a cache lives: a local folder or an object-store URL, and the one zarr v3 store it maps to.

A location is a path (`sherl-cache/sst2`, `/data/c`, `file:///data/c`) or a URL (`s3://bucket/prefix`,
`gs://…`, `az://…`, `memory://…`, anything fsspec serves). Paths map to zarr's `LocalStore`; s3, gs
and az URLs to zarr's `ObjectStore` over obstore when it is installed, else (and for every other
scheme) to `FsspecStore.from_url`. Every read, write, listing and deletion of a cache goes through
that store's API, run on zarr's own event loop: a store is used from the loop it was first used on
(s3fs's sessions break when a store made on one loop is used from another), and zarr's synchronous
API runs there too.

Options for the remote filesystem (`extract.storage_options`, `train.storage_options`) are written
in s3fs's form (`endpoint_url`, `key`, `secret`, `token`, `client_kwargs = {region_name}`, `anon`)
and translated for obstore; the usual environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, …)
are read by either backend. Options may hold secrets: a Location never prints them, and
`public_options` is what may be written anywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sherl_pipe.errors import SherlError

OBSTORE_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "azure", "abfs", "abfss"}
# what to install for a scheme (fsspec's own registry names the rest)
BACKENDS = {"s3": "obstore (pip install \"sherl-pipe[s3]\") or s3fs", "s3a": "obstore or s3fs",
            "gs": "obstore or gcsfs", "gcs": "obstore or gcsfs", "az": "obstore or adlfs",
            "azure": "obstore or adlfs", "abfs": "obstore or adlfs", "abfss": "obstore or adlfs"}
# option names (any part of them) whose values are credentials: never written or printed
SECRET_WORDS = ("secret", "token", "password", "key", "credential", "sas", "signature")
CONCURRENCY = 16  # requests in flight when many chunks are written or read at once

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_url(text: str) -> bool:
    """A URL with a scheme other than file:// (a path, or file://, is a local folder)."""
    m = _SCHEME.match(str(text))
    return bool(m) and m.group(1).lower() != "file"


def is_secret(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_WORDS)


def public_options(options: dict) -> dict:
    """The options less every credential (nested tables too): what may be written or printed."""
    return {k: public_options(v) if isinstance(v, dict) else v for k, v in options.items() if not is_secret(k)}


@dataclass(frozen=True)
class Location:
    """A cache's place: `url` as the user gave it (a path or a URL), and the remote filesystem's
    options (which may hold secrets: left out of repr and of everything written)."""

    url: str
    options: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self):
        url = str(self.url)
        if url.lower().startswith("file://"):
            url = url[len("file://"):]
        object.__setattr__(self, "url", url)

    @property
    def is_local(self) -> bool:
        return not is_url(self.url)

    @property
    def scheme(self) -> str:
        return "file" if self.is_local else _SCHEME.match(self.url).group(1).lower()

    @property
    def path(self) -> Path:
        """The local folder (only for a local location)."""
        return Path(self.url)

    def __str__(self) -> str:
        return self.url

    def absolute(self) -> "Location":
        """The same place as an absolute path (URLs are absolute already): what a process in
        another directory (a dask worker, a sweep trial) must be given."""
        if not self.is_local:
            return self
        return Location(str(Path(self.url).absolute()), self.options)

    def sibling(self, suffix: str) -> "Location | None":
        """The place beside this one named with SUFFIX (`s3://b/cache` -> `s3://b/cache.lease`), or
        None at a bucket's root, which has no place beside it."""
        scheme, _, rest = self.url.partition("://")
        if "/" not in rest.strip("/"):
            return None
        return Location(f"{scheme}://{rest.rstrip('/')}{suffix}", self.options)

    def child(self, name: str) -> "Location":
        """The place NAME inside this one (`s3://b/cache` -> `s3://b/cache/NAME`)."""
        if self.is_local:
            return Location(str(Path(self.url) / name), self.options)
        return Location(f"{self.url.rstrip('/')}/{name}", self.options)

    def store(self, read_only: bool = False):
        return open_store(self, read_only)


def with_location(pipeline, loc: Location | None):
    """PIPELINE reading its cache at LOC (pipeline_location's, handed to another process): the
    options travel in the Location, never in the pipeline's dict (which drops them)."""
    import dataclasses

    if loc is None:
        return pipeline
    extract = dataclasses.replace(pipeline.extract, cache=loc.url, storage_options=dict(loc.options))
    return dataclasses.replace(pipeline, extract=extract, train=dataclasses.replace(pipeline.train, storage_options={}))


def location_to_json(loc: Location) -> dict:
    """LOC with its options, for a child process's stdin only (never a file: they may hold secrets)."""
    return {"url": loc.url, "options": loc.options}


def as_location(where, options: dict | None = None) -> Location:
    if isinstance(where, Location):
        return where if options is None else Location(where.url, options)
    return Location(str(where), dict(options or {}))


def pipeline_location(pipeline, training: bool = False) -> Location:
    """The pipeline's cache: extract.cache with extract.storage_options (for reading it in
    training, train.storage_options on top: a training cluster may read with other credentials)."""
    options = dict(pipeline.extract.storage_options)
    if training:
        options.update(pipeline.train.storage_options)
    return Location(pipeline.extract.cache, options)


# ---------------------------------------------------------------------------------------------
# Stores, one per location and mode in a process (a worker opens its cache once, not per block)

_STORES: dict = {}
_STORES_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child gets a new zarr loop (zarr resets it): new stores too
    os.register_at_fork(after_in_child=_STORES.clear)


def open_store(loc: Location, read_only: bool = False):
    """The store of LOC, one per place and options in this process (a local path is keyed by its
    absolute form: the same relative path names another folder once the directory changes)."""
    where = str(Path(loc.url).absolute()) if loc.is_local else loc.url
    cache_key = (where, json.dumps(loc.options, sort_keys=True, default=str), read_only)
    with _STORES_LOCK:
        store = _STORES.get(cache_key)
        if store is None:
            store = _STORES[cache_key] = _make_store(loc, read_only)
    return store


def _make_store(loc: Location, read_only: bool):
    if loc.is_local:
        from zarr.storage import LocalStore

        return LocalStore(Path(loc.url).absolute(), read_only=read_only)
    if loc.scheme in OBSTORE_SCHEMES and _has("obstore"):
        config = _obstore_config(loc)
        if config is not None:
            return _obstore(loc, config, read_only)
    return _fsspec(loc, read_only)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _obstore_config(loc: Location) -> dict | None:
    """s3fs-style options as obstore's config, or None when one has no obstore equivalent (then
    fsspec serves the URL, which takes every s3fs option)."""
    if loc.scheme not in ("s3", "s3a"):
        return dict(loc.options)  # gs/az: obstore's own option names
    names = {"key": "access_key_id", "secret": "secret_access_key", "token": "session_token",
             "endpoint_url": "endpoint", "region_name": "region"}
    flat = {**loc.options.get("client_kwargs", {}), **{k: v for k, v in loc.options.items() if k != "client_kwargs"}}
    config = {}
    for name, value in flat.items():
        if name == "anon":
            config["skip_signature"] = bool(value)
        elif name in names:
            config[names[name]] = value
        elif name not in ("asynchronous",):
            return None if _has("s3fs") else _unknown_option(loc, name)
    return config


def _unknown_option(loc: Location, name: str):
    raise SherlError(f"cache {loc}: storage option '{name}' is not one obstore understands for s3 (it takes "
                     f"endpoint_url, key, secret, token, region_name, anon); remove it, or pip install s3fs, "
                     f"which takes every s3fs option")


def _obstore(loc: Location, config: dict, read_only: bool):
    import datetime

    from obstore.store import from_url
    from zarr.storage import ObjectStore

    endpoint = config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
    client = {"connect_timeout": "10s", "timeout": "300s"}
    if str(endpoint).startswith("http://"):
        client["allow_http"] = True  # a local server (moto, minio): plain HTTP is what it speaks
    retry = {"max_retries": 3, "retry_timeout": datetime.timedelta(seconds=60)}
    try:
        store = from_url(loc.url, config=config, client_options=client, retry_config=retry)
    except BaseException as exc:  # obstore panics (a BaseException) on an unknown config key
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise SherlError(f"cache {loc}: the storage options are not valid for obstore ({_clean(exc, loc)}); "
                         f"check extract.storage_options") from None
    return ObjectStore(store, read_only=read_only)


def _fsspec(loc: Location, read_only: bool):
    from fsspec.registry import known_implementations, registry
    from zarr.storage import FsspecStore

    known = known_implementations.get(loc.scheme)
    if loc.scheme not in registry and known is None:
        raise SherlError(f"cache {loc}: no storage backend serves {loc.scheme}:// URLs; give a local folder or an "
                         f"s3://, gs://, az:// or memory:// URL")
    try:
        return FsspecStore.from_url(loc.url, storage_options=dict(loc.options), read_only=read_only)
    except ImportError as exc:
        need = f"install {BACKENDS[loc.scheme]}" if loc.scheme in BACKENDS else (known or {}).get("err") or str(exc)
        raise SherlError(f"cache {loc}: no installed backend serves {loc.scheme}:// URLs: {need}") from None
    except (TypeError, ValueError) as exc:
        raise SherlError(f"cache {loc}: the storage options are not valid ({_clean(exc, loc)}); check "
                         f"extract.storage_options") from None


# ---------------------------------------------------------------------------------------------
# Running a store's coroutines: all on zarr's event loop

def run(coro):
    from zarr.core.sync import sync

    return sync(coro)


def submit(coro):
    """Start a coroutine on zarr's loop; a concurrent.futures.Future of its result."""
    from zarr.core.sync import _get_loop

    return asyncio.run_coroutine_threadsafe(coro, _get_loop())


def _clean(exc: BaseException, loc: Location, limit: int = 160) -> str:
    """The first line of a backend's message, with any secret option value blanked out."""
    return first_line(exc, loc.options, limit)


def first_line(exc: BaseException, options: dict, limit: int = 160) -> str:
    """The first line of EXC's message, with the secret values of OPTIONS (and of the environment)
    blanked out, cut to LIMIT characters."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    for value in _secret_values(options):
        text = text.replace(value, "***")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _secret_values(options: dict) -> list[str]:
    out = []
    for k, v in options.items():
        if isinstance(v, dict):
            out += _secret_values(v)
        elif is_secret(k) and isinstance(v, str) and v:
            out.append(v)
    secret_env = [os.environ.get(n, "") for n in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    return out + [v for v in secret_env if v]
