"""An object store's lease (cache/lease.py) without a server: fsspec's memory:// filesystem serves
the conditional create. What a holder must notice by itself, before another extraction can take
the cache over."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from sherl_pipe.cache import access
from sherl_pipe.cache.lease import Lease
from sherl_pipe.cache.location import Location
from sherl_pipe.errors import SherlError


def fresh(name: str, seconds: float) -> Lease:
    return Lease(Location(f"memory://leases/{name}-{time.monotonic_ns()}"), seconds=seconds)


def test_a_holder_whose_renewals_fail_stops_before_its_lease_can_run_out(monkeypatch):
    """Old code: check() only looked for a newer generation, which a holder that cannot reach the
    store never sees; it went on writing after its lease had run out for everyone else."""
    lease = fresh("failing", 0.8)
    lease.acquire()
    try:
        lease.check()  # just renewed: fine

        def failing_put(*args, **kwargs):
            raise OSError("connection reset")

        monkeypatch.setattr(access, "put", failing_put)
        time.sleep(0.7)  # past 3/4 of the lease: the store's record may be about to run out
        with pytest.raises(SherlError, match=r"could not renew its lease for \d+ s .*connection reset"):
            lease.check()
    finally:
        monkeypatch.undo()
        lease.release()


def test_a_frozen_holder_stops_before_it_sees_the_lease_taken(monkeypatch):
    """A holder frozen past its expiry (its renewal thread did not run) stops at its next check,
    before its next renewal would have shown it the newer generation."""
    lease = fresh("frozen", 0.6)
    lease.acquire()
    lease._stop.set()  # the process froze: no renewal
    lease._thread.join()
    time.sleep(0.5)
    assert lease.lost is None  # it has not seen anyone take over ...
    with pytest.raises(SherlError, match="could not renew its lease"):
        lease.check()  # ... and still stops
    lease.release()


@pytest.mark.slow
def test_a_renewal_that_fails_once_is_retried_soon_and_the_lease_holds(monkeypatch):
    """One failed PUT must not end a long extraction: the renewal is retried well before the
    holder would stop."""
    lease = fresh("retry", 2.4)  # renewed every 0.8 s, retried 0.2 s after a failure, stops at 1.8 s
    real_put, failures = access.put, []

    def flaky_put(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise OSError("timeout")
        return real_put(*args, **kwargs)

    lease.acquire()
    monkeypatch.setattr(access, "put", flaky_put)
    try:
        time.sleep(2.5)  # more than the lease: renewals (one failed) kept it
        assert failures
        lease.check()
    finally:
        monkeypatch.undo()
        lease.release()


def test_a_dead_pid_of_this_host_in_another_pid_namespace_still_holds(monkeypatch):
    """Two containers can share a host name and reuse each other's pids: a pid that is not alive
    here says nothing about a holder in another pid namespace, which keeps its lease until it
    runs out."""
    lease = fresh("pidns", 60)
    dead = 2 ** 22 + 1  # above the kernel's pid limit: never alive here
    record = {"host": socket.gethostname(), "pid": dead, "since": time.time(), "renewed": time.time(),
              "seconds": 60, "released": False}
    assert not lease.holds({**record, "pidns": lease.record_fields()["pidns"]})  # same namespace: dead
    assert lease.holds({**record, "pidns": "pid:[1]"})  # another namespace: held until it runs out
    assert lease.holds({k: v for k, v in record.items()})  # a record without a namespace: the same


def test_the_pid_namespace_is_recorded(monkeypatch):
    lease = fresh("ns", 60)
    fields = lease.record_fields()
    if os.path.exists("/proc/self/ns/pid"):
        assert fields["pidns"] == os.readlink("/proc/self/ns/pid")
    else:
        assert fields["pidns"] is None


def test_a_store_that_ignores_conditional_creates_is_refused(monkeypatch):
    """Old code trusted If-None-Match: * without checking it: on a store that ignores it two
    extractions would each take the lease. Now a second create of the same generation must fail."""
    lease = fresh("ignoring", 60)

    def ignoring_put_new(loc, key, data, store=None):
        access.put(loc, key, data, store)  # an unconditional PUT: every contender "wins"
        return True

    monkeypatch.setattr(access, "put_new", ignoring_put_new)
    with pytest.raises(SherlError, match="ignores If-None-Match"):
        lease.acquire()
    assert lease.generation is None


def test_expiry_is_judged_by_the_stores_clock_not_the_records(monkeypatch):
    """A record whose `renewed` field lies (a holder whose clock runs 200 s behind) still holds
    while the store says it was written just now."""
    lease = fresh("store-clock", 60)
    holder = Lease(lease.cache, seconds=60)
    holder.acquire()
    try:
        record = {**holder.record_fields(), "host": "elsewhere", "renewed": time.time() - 200}
        access.put(holder.place, holder._key(holder.generation), json.dumps(record).encode())
        ago = lease.renewed_ago(holder.generation)
        assert ago is not None and ago < 5
        assert lease.holds(record, ago) and not lease.holds(record)  # by the record's clock it ran out
        with pytest.raises(SherlError, match="another extraction is writing it"):
            lease.acquire()
    finally:
        holder.release()
