"""Fetching a cache's chunks ahead of their use, many requests at once.

The reader knows an epoch's whole order of chunks before it starts (the sampler lays it out), so
it asks for the stored bytes of the chunks it will decode next while it decodes the current ones
and the trainer trains: up to `ahead` requests are in flight on zarr's event loop at any time
(the store's `get`, concurrently), and the reader takes their results in order. A store with
milliseconds of latency per request (S3) then costs about one request's latency per `ahead`
chunks instead of one per chunk; a local folder's reads overlap the decoding.
"""

from __future__ import annotations

from collections import deque

from sherl_pipe.cache import access
from sherl_pipe.cache.location import Location, submit


def _get(store, key: str):
    from zarr.core.buffer import default_buffer_prototype

    return store.get(key, prototype=default_buffer_prototype())


class Prefetcher:
    """The stored bytes of KEYS, in order (None for a key that is not stored), with at most AHEAD
    requests in flight."""

    def __init__(self, loc: Location, store, keys: list[str], ahead: int):
        self.loc, self.store, self.ahead = loc, store, max(1, ahead)
        self._keys = iter(keys)
        self._flight: deque = deque()
        self._fill()

    def _fill(self) -> None:
        while len(self._flight) < self.ahead:
            key = next(self._keys, None)
            if key is None:
                return
            self._flight.append((key, submit(_get(self.store, key))))

    def next(self, key: str):
        """The bytes of KEY, which must be the next key of the order."""
        expected, future = self._flight.popleft()
        assert expected == key, f"prefetch order: asked for {key}, next is {expected}"
        self._fill()
        with access.translated(self.loc, key):
            return future.result()

    def close(self) -> None:
        """Cancel what is still in flight (an epoch cut short)."""
        while self._flight:
            self._flight.popleft()[1].cancel()
