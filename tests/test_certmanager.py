"""The certificate manager's decisions, without a cluster: what the Secret must become (plan), the
caBundle every webhook gets, and when a pod starts serving a new pair. The API calls and the
watches run against a real API server in tests/test_apiserver_tier.py."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509

from app import certmanager, certs
from app.certmanager import (
    MAX_PREVIOUS,
    PREVIOUS_KEY,
    UNTIL_ANNOTATION,
    CertManager,
    Pair,
    bundle_patch,
    ca_bundle,
    fingerprint,
    parse_secret,
    plan,
    renewal_time,
    secret_body,
    split_certificates,
    trusted,
)
from app.config import Settings

NOW = dt.datetime(2027, 3, 1, 12, 0, tzinfo=dt.UTC)
OVERLAP = dt.timedelta(hours=1)
SERVICE, NAMESPACE = "poolkeeper", "poolkeeper-system"


def issued(days: int = 365, at: dt.datetime = NOW, service: str = SERVICE) -> Pair:
    ca, cert, key, _ = certs.issue_pair(service, NAMESPACE, days, at)
    return Pair(ca, cert, key)


def decide(pair: Pair | None, *, now: dt.datetime = NOW, served: bytes | None = None):
    return plan(pair, now=now, served_ca=served, service=SERVICE, namespace=NAMESPACE,
                days=365, overlap=OVERLAP)


def good(pair: Pair, now: dt.datetime = NOW) -> bool:
    certs.check_pair(pair.ca, pair.cert, pair.key, SERVICE, NAMESPACE, now=now)
    return True


def test_certmanager_creates_the_secret_when_there_is_none():
    change = decide(None)
    assert change is not None and change.action == "created"
    assert "did not exist" in change.reason
    assert good(change.pair) and change.pair.previous == ()
    assert change.pair.previous_until is None


def test_certmanager_a_deleted_secret_is_created_again_trusting_what_the_pod_serves():
    # Deleting the Secret forces a new CA; the pods serve the old pair until they have the new.
    served = issued()
    change = decide(None, served=served.ca)
    assert change.action == "created" and good(change.pair)
    assert change.pair.previous == (served.ca,)
    assert change.pair.previous_until == NOW + OVERLAP


def test_certmanager_keeps_a_good_pair_it_serves():
    pair = issued()
    assert decide(pair, served=pair.ca) is None
    assert decide(pair, served=None) is None  # a pod that serves nothing yet


def test_certmanager_renews_at_two_thirds_of_the_lifetime_and_trusts_the_old_ca_meanwhile():
    pair = issued(days=90)
    due = renewal_time(pair.cert)
    cert = x509.load_pem_x509_certificate(pair.cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert due == cert.not_valid_before_utc + lifetime * 2 / 3
    assert decide(pair, now=due - dt.timedelta(seconds=1), served=pair.ca) is None

    change = decide(pair, now=due, served=pair.ca)
    assert change is not None and change.action == "renewed"
    assert "two thirds through its lifetime" in change.reason
    renewed = change.pair
    assert good(renewed, due) and fingerprint(renewed.ca) != fingerprint(pair.ca)
    assert renewed.previous == (pair.ca,)
    assert renewed.previous_until == due + OVERLAP
    # The bundle trusts both while the pods move to the new pair.
    assert split_certificates(base64.b64decode(ca_bundle(renewed))) == [renewed.ca, pair.ca]


@pytest.mark.parametrize("broken", ["key", "names", "garbage", "expired"])
def test_certmanager_replaces_an_unusable_pair_keeping_its_ca_trusted_if_it_can(broken):
    pair = issued()
    if broken == "key":
        pair = Pair(pair.ca, pair.cert, issued().key)
    elif broken == "names":
        pair = issued(service="other")
    elif broken == "garbage":
        pair = Pair(b"not a certificate", b"", b"")
    now = NOW + dt.timedelta(days=400) if broken == "expired" else NOW
    change = decide(pair, now=now)
    assert change is not None and change.action == "renewed"
    assert "its pair is unusable" in change.reason
    assert good(change.pair, now)
    if broken in ("key", "names"):  # the CA still parses and is valid: pods may serve its pair
        assert change.pair.previous == (pair.ca,)
        assert change.pair.previous_until == now + OVERLAP
    else:
        assert change.pair.previous == () and change.pair.previous_until is None


def test_certmanager_a_replaced_pair_keeps_the_ca_this_pod_still_serves_trusted():
    # Someone (poolkeeper certs --force and kubectl apply) replaced the Secret's pair with one
    # of a new CA: this pod still serves the old one until its new CA is trusted.
    served, replaced = issued(), issued()
    change = decide(replaced, served=served.ca)
    assert change is not None and change.action == "replaced"
    assert (change.pair.ca, change.pair.cert, change.pair.key) == (replaced.ca, replaced.cert,
                                                                    replaced.key)
    assert change.pair.previous == (served.ca,)
    assert change.pair.previous_until == NOW + OVERLAP
    # Every replica serving it decides the same, once: then it is known.
    assert decide(change.pair, served=served.ca) is None
    # An expired CA is not worth trusting again.
    assert decide(replaced, now=NOW + dt.timedelta(days=200),
                  served=issued(days=100).ca) is None


def test_certmanager_drops_the_previous_cas_when_the_overlap_ends():
    old, pair = issued(), issued()
    during = Pair(pair.ca, pair.cert, pair.key, (old.ca,), NOW + OVERLAP)
    assert decide(during, served=old.ca) is None
    assert decide(during, served=pair.ca) is None
    change = decide(during, now=NOW + OVERLAP, served=pair.ca)
    assert change is not None and change.action == "overlap_ended"
    assert change.pair == Pair(pair.ca, pair.cert, pair.key)
    # A previous list without its time (someone edited the annotation) counts as ended.
    assert decide(Pair(pair.ca, pair.cert, pair.key, (old.ca,), None)).pair.previous == ()


def test_certmanager_keeps_at_most_a_few_previous_cas():
    pair = issued()
    previous = tuple(issued().ca for _ in range(MAX_PREVIOUS))
    crowded = Pair(pair.ca, pair.cert, pair.key, previous, NOW + OVERLAP)
    served = issued().ca
    change = decide(crowded, served=served)
    assert len(change.pair.previous) == MAX_PREVIOUS and change.pair.previous[-1] == served


def test_certmanager_bundle_patch_covers_every_webhook_by_name():
    # Generic over the configuration's webhooks, whatever their names and number.
    pair = issued()
    bundle = ca_bundle(pair)
    config = {"metadata": {"name": "poolkeeper", "resourceVersion": "42"}, "webhooks": [
        {"name": "placement.poolkeeper.io", "clientConfig": {"caBundle": bundle}},
        {"name": "placement-system.poolkeeper.io", "clientConfig": {}},
        {"name": "defaults.poolkeeper.io", "clientConfig": {"caBundle": "Zm9v"}}]}
    assert bundle_patch(config, bundle) == {
        "metadata": {"resourceVersion": "42"},
        "webhooks": [{"name": "placement-system.poolkeeper.io",
                      "clientConfig": {"caBundle": bundle}},
                     {"name": "defaults.poolkeeper.io", "clientConfig": {"caBundle": bundle}}]}
    for webhook in config["webhooks"]:
        webhook["clientConfig"]["caBundle"] = bundle
    assert bundle_patch(config, bundle) is None
    assert bundle_patch({"metadata": {}, "webhooks": []}, bundle) is None


def test_certmanager_trusted_is_what_every_webhook_trusts():
    a, b = issued(), issued()
    both = ca_bundle(Pair(a.ca, b"", b"", (b.ca,)))
    config = {"webhooks": [{"name": "x", "clientConfig": {"caBundle": both}},
                           {"name": "y", "clientConfig": {"caBundle": ca_bundle(a)}}]}
    assert trusted(config) == {fingerprint(a.ca)}
    config["webhooks"].append({"name": "z", "clientConfig": {}})
    assert trusted(config) == set()
    assert trusted({"webhooks": [{"name": "x", "clientConfig": {"caBundle": "!!"}}]}) == set()


def test_certmanager_secret_round_trip_keeps_what_others_put_there():
    old, pair = issued(), issued()
    during = Pair(pair.ca, pair.cert, pair.key, (old.ca,), NOW + OVERLAP)
    created = secret_body(None, during, NAMESPACE, "poolkeeper-tls")
    assert created["type"] == "kubernetes.io/tls"
    assert created["metadata"]["annotations"] == {UNTIL_ANNOTATION: "2027-03-01T13:00:00+00:00"}
    assert parse_secret(created) == during

    live = {**created, "metadata": {**created["metadata"], "resourceVersion": "7",
                                    "managedFields": [{"manager": "kubectl"}],
                                    "labels": {"team": "platform"},
                                    "annotations": {**created["metadata"]["annotations"],
                                                    "note": "kept"}}}
    updated = secret_body(live, Pair(pair.ca, pair.cert, pair.key), NAMESPACE, "poolkeeper-tls")
    assert updated["metadata"]["resourceVersion"] == "7"  # the update is conditional
    assert "managedFields" not in updated["metadata"]
    assert updated["metadata"]["labels"] == {"team": "platform"}
    assert updated["metadata"]["annotations"] == {"note": "kept"}
    assert PREVIOUS_KEY not in updated["data"]
    assert parse_secret(updated) == Pair(pair.ca, pair.cert, pair.key)
    # What does not decode is empty, for plan() to replace.
    assert parse_secret({"data": {"tls.crt": "%%%"}}) == Pair(b"", b"", b"")


def settings(tmp_path) -> Settings:
    return Settings(cert_dir=str(tmp_path), manage_certs=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_certmanager_a_pod_serves_a_new_ca_only_after_every_webhook_trusted_it_a_while(tmp_path):
    # Nothing here needs the API server: the Secret and the configuration are already what the
    # plan wants, so reconcile() only decides about this pod's files.
    clock = Clock()
    manager = CertManager(None, settings(tmp_path), clock=clock, now=lambda: NOW)
    old = issued()
    config = {"metadata": {"resourceVersion": "1"},
              "webhooks": [{"name": "placement.poolkeeper.io",
                            "clientConfig": {"caBundle": ca_bundle(old)}}]}
    manager.observe_secret(secret_body(None, old, NAMESPACE, "poolkeeper-tls"))
    manager.observe_configuration(config)
    manager.reconcile()  # trusted before this process started: served at once
    assert (tmp_path / "tls.crt").read_bytes() == old.cert

    new = issued()
    rotated = Pair(new.ca, new.cert, new.key, (old.ca,), NOW + OVERLAP)
    manager.observe_secret(secret_body(None, rotated, NAMESPACE, "poolkeeper-tls"))
    # (here the manager patches the bundle; its answer, as the watch would report it:)
    manager.observe_configuration({**config, "webhooks": [
        {"name": "placement.poolkeeper.io", "clientConfig": {"caBundle": ca_bundle(rotated)}}]})
    wait = manager.reconcile()
    assert wait == pytest.approx(certmanager.SETTLE)
    assert (tmp_path / "tls.crt").read_bytes() == old.cert
    clock.now += certmanager.SETTLE
    manager.reconcile()
    assert (tmp_path / "tls.crt").read_bytes() == new.cert
    assert (tmp_path / "ca.crt").read_bytes() == new.ca


def test_certmanager_without_a_webhook_configuration_serves_at_once(tmp_path):
    manager = CertManager(None, settings(tmp_path), clock=Clock(), now=lambda: NOW)
    pair = issued()
    manager.observe_secret(secret_body(None, pair, NAMESPACE, "poolkeeper-tls"))
    manager.observe_configuration(None)  # not installed yet: nobody calls this pod
    manager.reconcile()
    assert (tmp_path / "tls.key").read_bytes() == pair.key
