"""Conformance of the embedded API server as seen by the official Python `kubernetes` client.

Run by `cargo test -p local-cluster --test python`, which starts a cluster and points
KUBECONFIG at it. Pods use images that exist only as names: the node runs them on the host root.
"""
import json
import os
import uuid

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException


@pytest.fixture(scope="module")
def core():
    config.load_kube_config(config_file=os.environ["KUBECONFIG"])
    return client.CoreV1Api()


@pytest.fixture
def ns(core):
    name = "py-" + uuid.uuid4().hex[:8]
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


def sleeper(name, labels=None):
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels or {}),
        spec=client.V1PodSpec(
            termination_grace_period_seconds=1,
            containers=[client.V1Container(name="main", image="busybox", command=["sleep", "3600"])],
        ),
    )


def status_of(exc):
    body = json.loads(exc.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure"
    assert body["code"] == exc.status
    return body


def test_generate_name_and_defaults(core, ns):
    pod = sleeper(None)
    pod.metadata.generate_name = "gen-"
    created = core.create_namespaced_pod(ns, pod)
    assert created.metadata.name.startswith("gen-") and len(created.metadata.name) == 9
    assert created.spec.restart_policy == "Always"
    assert created.spec.containers[0].image_pull_policy == "Always"
    assert created.status.phase == "Pending"
    assert core.read_namespaced_service_account("default", ns).metadata.name == "default"


def test_list_with_selectors(core, ns):
    for name, labels in [("a", {"app": "web"}), ("b", {"app": "db"}), ("c", {"app": "web", "tier": "x"})]:
        core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels=labels)))
    names = lambda **kw: sorted(o.metadata.name for o in core.list_namespaced_config_map(ns, **kw).items if len(o.metadata.name) == 1)
    assert names(label_selector="app=web") == ["a", "c"]
    assert names(label_selector="app in (db),!tier") == ["b"]
    assert names(label_selector="app,tier notin (x)") == ["a", "b"]
    assert names(field_selector="metadata.name=b") == ["b"]
    every = core.list_config_map_for_all_namespaces(label_selector="app=web")
    assert sorted(o.metadata.name for o in every.items) == ["a", "c"]


def test_watch_sees_pod_life(core, ns):
    rv = core.list_namespaced_pod(ns).metadata.resource_version
    core.create_namespaced_pod(ns, sleeper("life"))
    seen = []
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_pod, ns, resource_version=rv, timeout_seconds=120):
        pod = ev["object"]
        seen.append((ev["type"], pod.status.phase, pod.metadata.deletion_timestamp is not None))
        if ev["type"] == "MODIFIED" and pod.status.phase == "Running" and pod.metadata.deletion_timestamp is None:
            core.delete_namespaced_pod("life", ns, grace_period_seconds=1)
        if ev["type"] == "DELETED":
            w.stop()
    kinds = [s[0] for s in seen]
    assert kinds[0] == "ADDED" and kinds[-1] == "DELETED"
    assert set(kinds[1:-1]) == {"MODIFIED"}
    assert any(s[1] == "Running" for s in seen)
    assert any(s[2] for s in seen[:-1]), "the deletion mark is visible before DELETED"


def test_watch_replay_and_gone(core, ns):
    first = core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="one")))
    core.patch_namespaced_config_map("one", ns, {"data": {"k": "v"}})
    core.delete_namespaced_config_map("one", ns)
    events = []
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_config_map, ns, resource_version=first.metadata.resource_version, timeout_seconds=30):
        events.append((ev["type"], ev["object"].metadata.name))
        if len(events) == 2:
            w.stop()
    assert events == [("MODIFIED", "one"), ("DELETED", "one")]
    # The Rust driver keeps only 100 events of history: push the first version out of it.
    for i in range(110):
        core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"fill-{i}")))
    with pytest.raises(ApiException) as gone:
        for _ in watch.Watch().stream(core.list_namespaced_config_map, ns, resource_version=first.metadata.resource_version, timeout_seconds=5):
            pass
    assert gone.value.status == 410


def test_conflict_and_error_bodies(core, ns):
    cm = core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cfg"), data={"k": "1"}))
    cm.data = {"k": "2"}
    core.replace_namespaced_config_map("cfg", ns, cm)
    cm.data = {"k": "3"}
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_config_map("cfg", ns, cm)
    body = status_of(conflict.value)
    assert (body["code"], body["reason"], body["details"]["name"], body["details"]["kind"]) == (409, "Conflict", "cfg", "configmaps")

    with pytest.raises(ApiException) as nf:
        core.read_namespaced_pod("nope", ns)
    body = status_of(nf.value)
    assert (body["reason"], body["message"], body["details"]) == ("NotFound", 'pods "nope" not found', {"name": "nope", "kind": "pods"})

    with pytest.raises(ApiException) as exists:
        core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cfg")))
    assert status_of(exists.value)["reason"] == "AlreadyExists"

    bad = client.V1Pod(
        metadata=client.V1ObjectMeta(name="bad"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="a", image="x"), client.V1Container(name="a", image="")]),
    )
    with pytest.raises(ApiException) as invalid:
        core.create_namespaced_pod(ns, bad)
    body = status_of(invalid.value)
    assert (body["code"], body["reason"], body["details"]["kind"], body["details"]["name"]) == (422, "Invalid", "Pod", "bad")
    fields = [(c["field"], c["reason"]) for c in body["details"]["causes"]]
    assert fields == [("spec.containers[1].name", "FieldValueDuplicate"), ("spec.containers[1].image", "FieldValueRequired")]


def test_patches(core, ns):
    core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="p", labels={"a": "1"}), data={"x": "1"}))
    merged = core.patch_namespaced_config_map("p", ns, {"metadata": {"labels": {"b": "2"}}, "data": {"y": "2"}})
    assert merged.metadata.labels == {"a": "1", "b": "2"} and merged.data == {"x": "1", "y": "2"}
    jp = core.patch_namespaced_config_map("p", ns, [{"op": "remove", "path": "/data/x"}])
    assert jp.data == {"y": "2"}


def test_owner_gc_and_deletion(core, ns):
    owner = core.create_namespaced_pod(ns, sleeper("owner"))
    ref = client.V1OwnerReference(api_version="v1", kind="Pod", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_secret(ns, client.V1Secret(metadata=client.V1ObjectMeta(name="owned", owner_references=[ref]), string_data={"t": "x"}))
    rv = core.list_namespaced_secret(ns).metadata.resource_version
    core.delete_namespaced_pod("owner", ns, body=client.V1DeleteOptions(grace_period_seconds=0, propagation_policy="Background"))
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_secret, ns, resource_version=rv, timeout_seconds=60):
        if ev["type"] == "DELETED" and ev["object"].metadata.name == "owned":
            w.stop()
            break
    else:
        pytest.fail("the owned secret was not garbage-collected")
    with pytest.raises(ApiException) as nf:
        core.read_namespaced_secret("owned", ns)
    assert nf.value.status == 404


def test_chunked_list_pages_and_tokens(core, ns):
    for i in range(12):
        core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"page-{i:02}")))
    names, token, pages = [], None, []
    while True:
        page = core.list_namespaced_config_map(ns, limit=5, _continue=token)
        pages.append(page.metadata)
        names += [o.metadata.name for o in page.items]
        token = page.metadata._continue
        if not token:
            break
        if len(pages) == 1:
            # Not visible in the later pages of this list.
            core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="page-99")))
    assert names == [f"page-{i:02}" for i in range(12)]
    assert [p.remaining_item_count for p in pages] == [7, 2, None]
    assert len({p.resource_version for p in pages}) == 1

    with pytest.raises(ApiException) as bad:
        core.list_namespaced_config_map(ns, limit=5, _continue="garbage")
    assert status_of(bad.value)["code"] == 400

    # Push the first page's version out of the 100-event history: 410 Expired, and the Status
    # carries a token that continues (inconsistently) at the latest version.
    token = core.list_namespaced_config_map(ns, limit=5).metadata._continue
    for i in range(110):
        core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"later-{i:03}")))
    with pytest.raises(ApiException) as expired:
        core.list_namespaced_config_map(ns, limit=5, _continue=token)
    body = status_of(expired.value)
    assert (body["code"], body["reason"]) == (410, "Expired")
    rest = core.list_namespaced_config_map(ns, _continue=body["metadata"]["continue"])
    assert [o.metadata.name for o in rest.items][:5] == ["page-05", "page-06", "page-07", "page-08", "page-09"]
    assert not rest.metadata._continue


def test_dry_run_and_server_side_apply(core, ns):
    cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dry"), data={"k": "v"})
    would_be = core.create_namespaced_config_map(ns, cm, dry_run="All")
    assert would_be.metadata.uid and would_be.metadata.resource_version is None
    with pytest.raises(ApiException) as nf:
        core.read_namespaced_config_map("dry", ns)
    assert nf.value.status == 404
    with pytest.raises(ApiException) as unknown:
        core.create_namespaced_config_map(ns, cm, dry_run="Sometimes")
    body = status_of(unknown.value)
    assert (body["code"], body["reason"], body["details"]["causes"][0]["field"]) == (422, "Invalid", "dryRun")

    manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"mode": "fast"}}
    apply = lambda m, **kw: core.patch_namespaced_config_map("ssa", ns, m, field_manager="py", _content_type="application/apply-patch+yaml", **kw)
    assert apply(manifest).data == {"mode": "fast"}
    manifest["data"] = {"mode": "safe"}
    assert apply(manifest).data == {"mode": "safe"}
    manifest["data"] = {"mode": "dry"}
    assert apply(manifest, dry_run="All").data == {"mode": "dry"}
    assert core.read_namespaced_config_map("ssa", ns).data == {"mode": "safe"}
