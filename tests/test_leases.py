"""Lease election and replica records on an in-memory Lease store with the API server's
optimistic concurrency (a write with a stale resourceVersion gets 409); time is moved by hand.
The same code against a real API server and real `poolkeeper serve` processes:
tests/test_audit_cluster.py."""

from __future__ import annotations

import copy

import kubernetes.client
import pytest

from app.leases import (
    LeaseElector,
    ReplicaRecord,
    delete_expired_records,
    list_replicas,
    micro_time,
    parse_time,
    record_name,
)


class Conflict(kubernetes.client.ApiException):
    def __init__(self, status: int = 409) -> None:
        super().__init__(status=status, reason="Conflict" if status == 409 else "Not Found")


class Store:
    """LeaseApi's calls on a dict, as the API server answers them."""

    def __init__(self) -> None:
        self.leases: dict[tuple[str, str], dict] = {}
        self.version = 0

    def _stamp(self, body: dict) -> dict:
        self.version += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self.version)
        return stored

    def get(self, namespace, name):
        found = self.leases.get((namespace, name))
        return copy.deepcopy(found) if found else None

    def create(self, namespace, body):
        key = (namespace, body["metadata"]["name"])
        if key in self.leases:
            raise Conflict()
        self.leases[key] = self._stamp(body)
        return copy.deepcopy(self.leases[key])

    def replace(self, namespace, body):
        key = (namespace, body["metadata"]["name"])
        if key not in self.leases:
            raise Conflict(404)
        if body["metadata"].get("resourceVersion") != self.leases[key]["metadata"][
                "resourceVersion"]:
            raise Conflict()
        self.leases[key] = self._stamp(body)
        return copy.deepcopy(self.leases[key])

    def delete(self, namespace, name, resource_version=None):
        self.leases.pop((namespace, name), None)

    def list(self, namespace, label_selector):
        key, _, value = label_selector.partition("=")
        return [copy.deepcopy(v) for (ns, _), v in self.leases.items()
                if ns == namespace and v["metadata"]["labels"].get(key) == value]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store():
    return Store()


@pytest.fixture
def clock():
    return Clock()


def elector(store, clock, identity):
    return LeaseElector(store, "ns", "poolkeeper-audit", identity, clock=clock, wall=clock)


def test_leases_one_candidate_wins_and_the_other_waits(store, clock):
    a, b = elector(store, clock, "pod-a_1"), elector(store, clock, "pod-b_2")
    assert a.try_acquire_or_renew() and a.is_leader()
    assert not b.try_acquire_or_renew() and not b.is_leader()
    assert b.holder == "pod-a_1"
    clock.now += 10
    assert a.try_acquire_or_renew()  # renewed: b sees a new record and waits again
    clock.now += 10
    assert not b.try_acquire_or_renew()
    spec = store.get("ns", "poolkeeper-audit")["spec"]
    assert (spec["holderIdentity"], spec["leaseDurationSeconds"], spec["leaseTransitions"]) == \
        ("pod-a_1", 15, 0)


def test_leases_a_dead_holder_is_replaced_after_the_lease_duration(store, clock):
    a, b = elector(store, clock, "pod-a_1"), elector(store, clock, "pod-b_2")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # b observes the record now
    clock.now += 11  # a stops renewing (killed): past the renew deadline it is no leader
    assert not a.is_leader()
    assert not b.try_acquire_or_renew()  # same record for 11 s < 15 s
    clock.now += 5
    assert b.try_acquire_or_renew() and b.is_leader()
    assert store.get("ns", "poolkeeper-audit")["spec"]["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew()  # back again: b holds it now


def test_leases_a_released_lease_is_taken_at_once(store, clock):
    a, b = elector(store, clock, "pod-a_1"), elector(store, clock, "pod-b_2")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert not a.is_leader()
    assert "holderIdentity" not in store.get("ns", "poolkeeper-audit")["spec"]
    assert b.try_acquire_or_renew()
    a.release()  # not the holder: nothing happens
    assert store.get("ns", "poolkeeper-audit")["spec"]["holderIdentity"] == "pod-b_2"


def test_leases_two_candidates_racing_on_one_record_only_one_wins(store, clock):
    a, b = elector(store, clock, "pod-a_1"), elector(store, clock, "pod-b_2")
    assert a.try_acquire_or_renew()
    a.release()
    stale = store.get("ns", "poolkeeper-audit")  # c reads the released record, then b wins
    assert b.try_acquire_or_renew()

    class StaleRead(Store):
        def get(self, namespace, name):
            return copy.deepcopy(stale)

    late = StaleRead()
    late.leases, late.version = store.leases, store.version
    c = LeaseElector(late, "ns", "poolkeeper-audit", "pod-c_3", clock=clock, wall=clock)
    assert not c.try_acquire_or_renew() and not c.is_leader()  # its write got 409
    assert store.get("ns", "poolkeeper-audit")["spec"]["holderIdentity"] == "pod-b_2"

    class NoneYet(Store):
        def get(self, namespace, name):
            return None  # it saw no Lease, but another candidate has created one since

    d = LeaseElector(NoneYet(), "ns", "poolkeeper-audit", "pod-d_4", clock=clock, wall=clock)
    d.api.leases = store.leases
    assert not d.try_acquire_or_renew()


def test_leases_replica_record_carries_the_digest_and_is_renewed(store, clock):
    class Rules:
        digest, loaded_at = "a" * 64, 999_000.0

    rules = Rules()
    record = ReplicaRecord(store, "ns", "poolkeeper-7c9d-x2k4j", 7, rules, version="0.1.0",
                           wall=clock)
    record.publish()
    clock.now += 20
    rules.digest = "b" * 64
    record.publish()
    store.leases[("ns", record.name)]["metadata"]["resourceVersion"] = "changed-elsewhere"
    record.publish()  # 409: read again and write
    (replica,) = list_replicas(store, "ns")
    assert (replica.pod, replica.pid, replica.digest, replica.version) == (
        "poolkeeper-7c9d-x2k4j", "7", "b" * 64, "0.1.0")
    assert replica.loaded_at == 999_000.0 and replica.renewed_at == pytest.approx(clock.now)
    assert replica.live(clock.now) and not replica.live(clock.now + 61)
    assert record.name == "poolkeeper-replica-poolkeeper-7c9d-x2k4j-7"
    clock.now += 61 + 600 + 1
    assert delete_expired_records(store, "ns", clock.now) == 1
    assert list_replicas(store, "ns") == []


def test_leases_names_and_times():
    assert record_name("My_Laptop.local", 42) == "poolkeeper-replica-my-laptop.local-42"
    assert micro_time(0.5) == "1970-01-01T00:00:00.500000Z"
    assert parse_time("1970-01-01T00:00:01.000000Z") == 1.0
    assert parse_time("yesterday") is None and parse_time(None) is None
