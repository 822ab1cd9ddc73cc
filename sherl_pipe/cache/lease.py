"""One extraction writes a cache at a time.

A local folder keeps the kernel's `flock` (locks.py): a second extractor waits for the first, and
a crashed holder's lock dies with its process. An object store has no locks and no rename, so
there the writer holds a *lease*: a small JSON object created by a conditional PUT (If-None-Match:
*), which the store accepts from exactly one of any number of contenders, never a check-then-set.

Leases are numbered generations beside the cache (`s3://b/cache.sherl-lease/00000001.json`; inside
it, under `.sherl-lease/`, for a cache at a bucket's root), so that zarr never sees them. The newest
generation is the lease. Its holder rewrites it every third of LEASE_SECONDS (its `renewed` time)
and marks it released when done. A contender reads the newest generation: released, run out (not
renewed for LEASE_SECONDS: its holder crashed), or held by a dead process of this host (and of the
same pid namespace: containers may share a host name and reuse pids), it may be taken over by
creating the next generation, which again only one contender can do; otherwise
the contender is refused with the holder's host, pid and age (object stores: a second extractor
is refused, not queued). A holder stops before writing more when it finds a newer generation
than its own (it was frozen past the expiry) or when it has not managed to renew its lease for
STOP_SHARE of LEASE_SECONDS (the store unreachable, or the process frozen): by then another
extraction may soon take the cache over, so the holder gives up first rather than learn it later.
A failed renewal is retried every RETRY_SHARE of the lease. A writer that lost the lease while
paused writes where no reader of a cache made since looks (store.data_location) and checks the
lease before each block.

Expiry is judged by the store's own clock, never by comparing two machines' clocks (a contender
whose clock ran 130 s ahead took over a lease renewed moments before): the age of the newest
generation is the store's time now (the Last-Modified of a probe object it is given) minus that
generation's Last-Modified. Only a store that reports no times falls back to the record's
`renewed`, written by the holder's clock. And a lease is only as good as the store's conditional
create: once per acquisition the winner creates its generation a second time, which the store
must refuse; a store that accepts it (ignoring If-None-Match) is refused in one line, since two
writers there would each think they held the cache.
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
STOP_SHARE = 0.75  # a holder that has not renewed for this share of the lease stops writing
RETRY_SHARE = 1 / 12  # a failed renewal is retried after this share of the lease (10 s)
SUFFIX = ".sherl-lease"
WAIT_MESSAGE = "another sherl-pipe process is writing this cache; waiting for it to finish"


class LeaseHeld(SherlError):
    """Another extraction holds the cache's lease."""


def take_cache_lock(loc: Location, log=print, seconds: float | None = None):
    """The cache's writer lock: flock on a local folder (waits), a lease of SECONDS (default
    LEASE_SECONDS; extract.lease_seconds) on an object store (refuses)."""
    if loc.is_local:
        lock = FolderLock(loc.path)
        lock.acquire(wait=True, on_wait=lambda: log(f"cache {loc}: {WAIT_MESSAGE}"))
        return lock
    lease = Lease(loc, seconds)
    lease.acquire()
    return lease


def _pid_namespace() -> str | None:
    """This process's pid namespace (`pid:[4026531836]`), where Linux says; None elsewhere."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


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
        self.renewed_at = time.monotonic()  # the last renewal the store accepted
        self.renew_error: str | None = None

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

    def record_fields(self, released: bool = False) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(), "since": self.since,
                "renewed": time.time(), "seconds": self.seconds, "released": released}

    def record(self, released: bool = False) -> bytes:
        return json.dumps(self.record_fields(released)).encode()

    def acquire(self) -> None:
        for _ in range(20):  # each turn either takes the lease, is refused, or saw a newer generation
            top = max(self.generations(), default=0)
            if top:
                holder, ago = self.read(top), self.renewed_ago(top)
                if self.holds(holder, ago):
                    raise LeaseHeld(self.refusal(holder, ago))
            if access.put_new(self.place, self._key(top + 1), self.record()):
                self.check_conditional(top + 1)
                self.generation, self.renewed_at = top + 1, time.monotonic()
                self._thread = threading.Thread(target=self._renew, daemon=True, name="sherl-lease")
                self._thread.start()
                return
        raise SherlError(f"cache {self.cache}: could not take its lease (other extractions kept taking it); "
                         f"rerun the command")

    def renewed_ago(self, generation: int) -> float | None:
        """Seconds since GENERATION's record was last written, by the store's clock (None where the
        store reports no times)."""
        try:
            written = access.modified(self.place, self._key(generation))
            now = access.store_now(self.place, self.prefix)
        except Exception:  # noqa: BLE001 - a store without times: the record's own clock is the fallback
            return None
        return None if written is None or now is None else max(0.0, now - written)

    def check_conditional(self, generation: int) -> None:
        """The store refuses a second create of the generation just created; one that accepts it
        ignores If-None-Match, and a lease there locks nothing."""
        if access.put_new(self.place, self._key(generation), self.record()):
            raise SherlError(f"cache {self.cache}: the store accepted a second conditional create of the same "
                             f"key (it ignores If-None-Match: *), so it cannot keep two extractions from writing "
                             f"one cache at once; use a store that honours conditional writes (S3, GCS, Azure, "
                             f"MinIO) or a local folder")

    def holds(self, holder: dict, renewed_ago: float | None = None) -> bool:
        """Whether HOLDER (a lease record) still holds the cache; RENEWED_AGO: seconds since its
        last renewal by the store's clock (None: by the record's, written by the holder's clock)."""
        if not holder or holder.get("released"):
            return False
        ago = renewed_ago if renewed_ago is not None else time.time() - float(holder.get("renewed", 0))
        if ago > float(holder.get("seconds", LEASE_SECONDS)):
            return False  # not renewed in time: its holder crashed (or froze), the lease ran out
        here = holder.get("host") == socket.gethostname() and holder.get("pidns") == _pid_namespace()
        if here and not _pid_alive(int(holder.get("pid", 0))):
            return False  # its process on this machine is gone (killed): no need to wait for the expiry
        return True

    def refusal(self, holder: dict, renewed_ago: float | None = None) -> str:
        now = time.time()
        renewed = renewed_ago if renewed_ago is not None else now - float(holder.get("renewed", now))
        # its age: the holder's own account of how long it had held the lease at its last renewal
        age = renewed + float(holder.get("renewed", now)) - float(holder.get("since", now))
        left = float(holder.get("seconds", LEASE_SECONDS)) - renewed
        return (f"cache {self.cache}: another extraction is writing it (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, for {age:.0f} s, lease renewed {renewed:.0f} s ago); one extraction "
                f"writes a cache at a time: rerun the command when it has finished (if it crashed, its lease "
                f"runs out in {max(left, 0):.0f} s)")

    def _renew(self) -> None:
        wait = self.seconds / 3
        while not self._stop.wait(wait):
            if not self._renew_once():
                return
            wait = self.seconds / 3 if self.renew_error is None else self.seconds * RETRY_SHARE

    def _renew_once(self) -> bool:
        """Rewrite this generation with the time now; False once a newer generation shows that
        another extraction took the lease over."""
        try:
            newer = [g for g in self.generations() if g > self.generation]
            if newer:
                self.lost = self.read(newer[-1])
                return False
            access.put(self.place, self._key(self.generation), self.record())
            self.renewed_at, self.renew_error = time.monotonic(), None
        except Exception as exc:  # retried soon; check() stops the writing if none succeeds in time
            self.renew_error = f"{type(exc).__name__}: {exc}"
        return True

    def check(self) -> None:
        """Raise if another extraction took the lease over, or may soon: this one has not renewed
        it for STOP_SHARE of its length (the store unreachable, or this process frozen)."""
        if self.lost is not None:
            raise SherlError(f"cache {self.cache}: this extraction lost its lease to host {self.lost.get('host')} "
                             f"(pid {self.lost.get('pid')}): it was not renewed for {self.seconds:.0f} s; it "
                             f"stops here, and the blocks it finished are kept")
        since = time.monotonic() - self.renewed_at
        if self.generation is not None and since > STOP_SHARE * self.seconds:
            why = f" (last error: {self.renew_error})" if self.renew_error else " (this process did not run)"
            raise SherlError(f"cache {self.cache}: this extraction could not renew its lease for {since:.0f} s"
                             f"{why}; it stops before another extraction may take the cache over; the blocks "
                             f"it finished are kept: rerun the command once the store is reachable")

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
