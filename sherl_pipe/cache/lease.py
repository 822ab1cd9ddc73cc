"""One extraction writes a cache at a time.

A local folder keeps the kernel's `flock` (locks.py): a second extractor waits for the first, and
a crashed holder's lock dies with its process. An object store has no locks and no rename, so
there the writer holds a *lease*: a small JSON object created by a conditional PUT (If-None-Match:
*), which the store accepts from exactly one of any number of contenders, never a check-then-set.

Leases are numbered generations beside the cache (`s3://b/cache.sherl-lease/00000001.json`; inside
it, under `.sherl-lease/`, for a cache at a bucket's root), so that zarr never sees them. The newest
generation is the lease. Its holder rewrites it every third of LEASE_SECONDS (its `renewed` time)
and marks it released when done. A contender reads the newest generation: released, run out (not
renewed for LEASE_SECONDS: its holder crashed), or held by a dead process of this host, it may
be taken over by creating the next generation, which again only one contender can do; otherwise
the contender is refused with the holder's host, pid and age (object stores: a second extractor
is refused, not queued). A holder that finds a newer generation than its own has lost the lease
(it was frozen past the expiry) and stops before writing more; what it wrote is deterministic,
so a block written by both leaves identical bytes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from sherl_pipe.cache import access
from sherl_pipe.cache.location import Location
from sherl_pipe.errors import SherlError
from sherl_pipe.locks import FolderLock

LEASE_SECONDS = 120.0
SUFFIX = ".sherl-lease"
WAIT_MESSAGE = "another sherl-pipe process is writing this cache; waiting for it to finish"


class LeaseHeld(SherlError):
    """Another extraction holds the cache's lease."""


def take_cache_lock(loc: Location, log=print):
    """The cache's writer lock: flock on a local folder (waits), a lease on an object store (refuses)."""
    if loc.is_local:
        lock = FolderLock(loc.path)
        lock.acquire(wait=True, on_wait=lambda: log(f"cache {loc}: {WAIT_MESSAGE}"))
        return lock
    lease = Lease(loc)
    lease.acquire()
    return lease


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, loc: Location, seconds: float | None = None):
        self.cache, self.seconds = loc, float(seconds or LEASE_SECONDS)
        beside = loc.sibling(SUFFIX)
        self.place, self.prefix = (beside, "") if beside is not None else (loc, f"{SUFFIX}/")
        self.generation: int | None = None
        self.lost: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.since = time.time()

    def _key(self, generation: int) -> str:
        return f"{self.prefix}{generation:08d}.json"

    def generations(self) -> list[int]:
        names = [k[len(self.prefix):] for k in access.keys(self.place, self.prefix)]
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def read(self, generation: int) -> dict:
        data = access.get(self.place, self._key(generation))
        try:
            return json.loads(data.to_bytes()) if data is not None else {}
        except ValueError:
            return {}

    def record(self, released: bool = False) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": self.since,
                           "renewed": time.time(), "seconds": self.seconds, "released": released}).encode()

    def acquire(self) -> None:
        for _ in range(20):  # each turn either takes the lease, is refused, or saw a newer generation
            top = max(self.generations(), default=0)
            if top:
                holder = self.read(top)
                if self.holds(holder):
                    raise LeaseHeld(self.refusal(holder))
            if access.put_new(self.place, self._key(top + 1), self.record()):
                self.generation = top + 1
                self._thread = threading.Thread(target=self._renew, daemon=True, name="sherl-lease")
                self._thread.start()
                return
        raise SherlError(f"cache {self.cache}: could not take its lease (other extractions kept taking it); "
                         f"rerun the command")

    def holds(self, holder: dict) -> bool:
        """Whether HOLDER (a lease record) still holds the cache."""
        if not holder or holder.get("released"):
            return False
        if time.time() - float(holder.get("renewed", 0)) > float(holder.get("seconds", LEASE_SECONDS)):
            return False  # not renewed in time: its holder crashed (or froze), the lease ran out
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0))):
            return False  # its process on this machine is gone (killed): no need to wait for the expiry
        return True

    def refusal(self, holder: dict) -> str:
        now = time.time()
        age, renewed = now - float(holder.get("since", now)), now - float(holder.get("renewed", now))
        left = float(holder.get("seconds", LEASE_SECONDS)) - renewed
        return (f"cache {self.cache}: another extraction is writing it (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, for {age:.0f} s, lease renewed {renewed:.0f} s ago); one extraction "
                f"writes a cache at a time: rerun the command when it has finished (if it crashed, its lease "
                f"runs out in {max(left, 0):.0f} s)")

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            if not self._renew_once():
                return

    def _renew_once(self) -> bool:
        """Rewrite this generation with the time now; False once a newer generation shows that
        another extraction took the lease over."""
        try:
            newer = [g for g in self.generations() if g > self.generation]
            if newer:
                self.lost = self.read(newer[-1])
                return False
            access.put(self.place, self._key(self.generation), self.record())
        except Exception:  # a failed renewal is retried; the lease runs out if none succeeds
            pass
        return True

    def check(self) -> None:
        """Raise if another extraction took the lease over (this one froze past the expiry)."""
        if self.lost is not None:
            raise SherlError(f"cache {self.cache}: this extraction lost its lease to host {self.lost.get('host')} "
                             f"(pid {self.lost.get('pid')}): it was not renewed for {self.seconds:.0f} s; it "
                             f"stops here, and the blocks it finished are kept")

    def release(self) -> None:
        if self.generation is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None:
            try:
                access.put(self.place, self._key(self.generation), self.record(released=True))
            except Exception:  # noqa: BLE001 (a release must never hide the error that ended the run)
                pass  # unreleased, it runs out after LEASE_SECONDS
        self.generation = None
