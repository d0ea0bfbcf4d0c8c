//! Conformance of the embedded API server as seen by kube-rs (`Api`, `watcher`, `await_condition`).

mod common;

use common::{cluster, cluster_with, sleeper};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy, WatchEvent, WatchParams,
};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use local_cluster::ClusterOptions;
use serde_json::{Value, json};

fn api_error(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(s) => s,
        other => panic!("expected an API Status error, got {other:?}"),
    }
}

fn cm(name: &str, labels: Value) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_name_and_server_defaults() {
    let c = cluster().await;
    let pods: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    let mut p = sleeper("");
    p.metadata.name = None;
    p.metadata.generate_name = Some("job-".into());
    let created = pods.create(&PostParams::default(), &p).await.unwrap();
    let name = created.metadata.name.clone().unwrap();
    assert!(name.starts_with("job-") && name.len() == "job-".len() + 5, "{name}");
    assert_eq!(created.metadata.uid.as_ref().map(String::len), Some(36));
    assert!(created.metadata.resource_version.is_some() && created.metadata.creation_timestamp.is_some());
    let spec = created.spec.unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirst"));
    assert_eq!(spec.termination_grace_period_seconds, Some(1));
    assert_eq!(spec.service_account_name.as_deref(), Some("default"));
    assert_eq!(spec.node_name.as_deref(), Some(local_cluster::NODE_NAME));
    assert_eq!(spec.containers[0].image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(spec.containers[0].termination_message_path.as_deref(), Some("/dev/termination-log"));
    let status = created.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert_eq!(status.qos_class.as_deref(), Some("BestEffort"));
    // A new namespace gets its default service account.
    let nss: Api<Namespace> = Api::all(c.client().unwrap());
    nss.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "team-a"}})).unwrap())
        .await
        .unwrap();
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(c.client().unwrap(), "team-a");
    sas.get("default").await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_get_list_with_label_and_field_selectors() {
    let c = cluster().await;
    let client = c.client().unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    cms.create(&PostParams::default(), &cm("a", json!({"app": "web", "tier": "front"}))).await.unwrap();
    cms.create(&PostParams::default(), &cm("b", json!({"app": "db"}))).await.unwrap();
    cms.create(&PostParams::default(), &cm("c", json!({"app": "cache", "tier": "back"}))).await.unwrap();
    assert_eq!(cms.get("b").await.unwrap().data.unwrap()["k"], "v");
    let names = |l: kube::core::ObjectList<ConfigMap>| {
        let mut n: Vec<String> =
            l.items.into_iter().map(|o| o.metadata.name.unwrap()).filter(|n| n.len() == 1).collect();
        n.sort();
        n
    };
    for (sel, want) in [
        ("app=web", vec!["a"]),
        ("app==db", vec!["b"]),
        ("app!=web,app", vec!["b", "c"]),
        ("app in (web,cache)", vec!["a", "c"]),
        ("app notin (web,cache),app", vec!["b"]),
        ("tier", vec!["a", "c"]),
        ("!tier,app", vec!["b"]),
    ] {
        let got = names(cms.list(&ListParams::default().labels(sel)).await.unwrap());
        assert_eq!(got, want, "labelSelector {sel:?}");
    }
    let got = names(cms.list(&ListParams::default().fields("metadata.name=c")).await.unwrap());
    assert_eq!(got, vec!["c"]);
    let got =
        names(cms.list(&ListParams::default().fields("metadata.namespace=default,metadata.name!=c")).await.unwrap());
    assert_eq!(got, vec!["a", "b"]);
    // Pod field selectors, and cluster-wide lists of a namespaced kind.
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &sleeper("runner")).await.unwrap();
    await_condition(pods.clone(), "runner", conditions::is_pod_running()).await.unwrap();
    let all: Api<Pod> = Api::all(client.clone());
    let running =
        all.list(&ListParams::default().fields("status.phase=Running,spec.nodeName=keel-local")).await.unwrap();
    assert_eq!(running.items.len(), 1);
    assert!(all.list(&ListParams::default().fields("status.phase=Pending")).await.unwrap().items.is_empty());
    let bad = cms.list(&ListParams::default().labels("app in (web")).await.unwrap_err();
    assert_eq!(api_error(bad).code, 400);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_sees_a_pods_whole_life_in_order() {
    let c = cluster().await;
    let pods: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    let start = pods.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    let mut events = pods.watch(&WatchParams::default().fields("metadata.name=life"), &start).await.unwrap().boxed();
    pods.create(&PostParams::default(), &sleeper("life")).await.unwrap();
    await_condition(pods.clone(), "life", conditions::is_pod_running()).await.unwrap();
    pods.delete("life", &DeleteParams::default().grace_period(1)).await.unwrap();
    let mut seen = Vec::new();
    let mut last_rv = 0u64;
    while let Some(ev) = events.try_next().await.unwrap() {
        let (kind, pod) = match ev {
            WatchEvent::Added(p) => ("ADDED", p),
            WatchEvent::Modified(p) => ("MODIFIED", p),
            WatchEvent::Deleted(p) => ("DELETED", p),
            other => panic!("unexpected {other:?}"),
        };
        let rv: u64 = pod.metadata.resource_version.clone().unwrap().parse().unwrap();
        assert!(rv > last_rv, "resourceVersions increase");
        last_rv = rv;
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        let terminating = pod.metadata.deletion_timestamp.is_some();
        seen.push((kind, phase, terminating));
        if kind == "DELETED" {
            break;
        }
    }
    assert_eq!(seen.first().map(|s| s.0), Some("ADDED"));
    assert_eq!(seen.last().map(|s| s.0), Some("DELETED"));
    assert!(seen[1..seen.len() - 1].iter().all(|s| s.0 == "MODIFIED"), "{seen:?}");
    let running_at = seen.iter().position(|s| s.1 == "Running").expect("saw Running");
    let terminating_at = seen.iter().position(|s| s.2).expect("saw the deletion mark");
    assert!(running_at < terminating_at, "{seen:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_from_an_old_version_replays_and_expired_versions_are_gone() {
    let c = cluster_with(ClusterOptions { watch_history: Some(8), ..ClusterOptions::on_host_rootfs() }).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(c.client().unwrap());
    let first = cms.create(&PostParams::default(), &cm("one", json!({}))).await.unwrap();
    let rv1 = first.metadata.resource_version.clone().unwrap();
    cms.patch("one", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "v2"}}))).await.unwrap();
    cms.create(&PostParams::default(), &cm("two", json!({}))).await.unwrap();
    cms.delete("one", &DeleteParams::default()).await.unwrap();
    let replay: Vec<(String, String)> = cms
        .watch(&WatchParams::default(), &rv1)
        .await
        .unwrap()
        .take(3)
        .map(|e| match e.unwrap() {
            WatchEvent::Added(o) => ("ADDED".to_owned(), o.metadata.name.unwrap()),
            WatchEvent::Modified(o) => ("MODIFIED".to_owned(), o.metadata.name.unwrap()),
            WatchEvent::Deleted(o) => ("DELETED".to_owned(), o.metadata.name.unwrap()),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
        .await;
    let want = [("MODIFIED", "one"), ("ADDED", "two"), ("DELETED", "one")].map(|(a, b)| (a.to_owned(), b.to_owned()));
    assert_eq!(replay, want);
    for i in 0..10 {
        cms.create(&PostParams::default(), &cm(&format!("filler-{i}"), json!({}))).await.unwrap();
    }
    let mut expired = cms.watch(&WatchParams::default(), &rv1).await.unwrap().boxed();
    match expired.try_next().await.unwrap() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    // kube-runtime's watcher re-lists after a 410 and still sees everything.
    let objs: Vec<ConfigMap> = watcher(cms.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .take(11)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(objs.len(), 11);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn update_with_a_stale_version_conflicts() {
    let c = cluster().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(c.client().unwrap());
    let orig = cms.create(&PostParams::default(), &cm("cfg", json!({}))).await.unwrap();
    let mut first = orig.clone();
    first.data = Some([("k".to_owned(), "first".to_owned())].into());
    let updated = cms.replace("cfg", &PostParams::default(), &first).await.unwrap();
    assert_ne!(updated.metadata.resource_version, orig.metadata.resource_version);
    let mut stale = orig.clone();
    stale.data = Some([("k".to_owned(), "stale".to_owned())].into());
    let err = api_error(cms.replace("cfg", &PostParams::default(), &stale).await.unwrap_err());
    assert_eq!(err.code, 409);
    assert_eq!(err.reason, "Conflict");
    assert!(err.message.contains("the object has been modified"), "{}", err.message);
    assert_eq!(cms.get("cfg").await.unwrap().data.unwrap()["k"], "first");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn merge_strategic_and_json_patches() {
    let c = cluster().await;
    let client = c.client().unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    cms.create(&PostParams::default(), &cm("p", json!({"a": "1", "b": "2"}))).await.unwrap();
    let merged = cms
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": null, "c": "3"}}, "data": {"x": "y"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        merged.metadata.labels.unwrap(),
        [("b".to_owned(), "2".to_owned()), ("c".to_owned(), "3".to_owned())].into()
    );
    assert_eq!(merged.data.unwrap().len(), 2);
    // kube's own json-patch version is inferred from `Patch::Json`.
    let ops = serde_json::from_value(json!([
        {"op": "test", "path": "/data/x", "value": "y"},
        {"op": "remove", "path": "/data/k"},
        {"op": "add", "path": "/data/z", "value": "9"}
    ]))
    .unwrap();
    let jp = cms.patch("p", &PatchParams::default(), &Patch::Json::<()>(ops)).await.unwrap();
    assert_eq!(jp.data.unwrap(), [("x".to_owned(), "y".to_owned()), ("z".to_owned(), "9".to_owned())].into());
    let failing = serde_json::from_value(json!([{"op": "test", "path": "/data/x", "value": "nope"}])).unwrap();
    let err = api_error(cms.patch("p", &PatchParams::default(), &Patch::Json::<()>(failing)).await.unwrap_err());
    assert_eq!(err.code, 422);

    // Strategic merge on a pod: containers merge by name, labels merge, env merges by name.
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut p = sleeper("sm");
    p.spec.as_mut().unwrap().containers.push(
        serde_json::from_value(json!({"name": "side", "image": "busybox:1", "command": ["sleep", "3600"]})).unwrap(),
    );
    pods.create(&PostParams::default(), &p).await.unwrap();
    let patched = pods
        .patch(
            "sm",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"extra": "yes"}}, "spec": {"containers": [{"name": "side", "image": "busybox:2"}]}})),
        )
        .await
        .unwrap();
    let containers = patched.spec.unwrap().containers;
    assert_eq!(containers.len(), 2, "strategic merge keeps the other container");
    assert_eq!(containers[0].image.as_deref(), Some("busybox"));
    assert_eq!(containers[1].image.as_deref(), Some("busybox:2"));
    assert_eq!(patched.metadata.labels.unwrap()["extra"], "yes");
    // Changing anything else in a pod's spec is forbidden, as on a real server.
    let err = api_error(
        pods.patch("sm", &PatchParams::default(), &Patch::Merge(json!({"spec": {"restartPolicy": "Never"}})))
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 422);
    // The status subresource changes status only.
    let st = pods
        .patch_status(
            "sm",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"message": "hello"}, "metadata": {"labels": {"ignored": "x"}}})),
        )
        .await
        .unwrap();
    assert_eq!(st.status.unwrap().message.as_deref(), Some("hello"));
    assert!(!st.metadata.labels.unwrap().contains_key("ignored"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn error_bodies_are_kubernetes_statuses() {
    let c = cluster().await;
    let pods: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    let nf = api_error(pods.get("missing").await.unwrap_err());
    assert_eq!((nf.code, nf.reason.as_str(), nf.message.as_str()), (404, "NotFound", "pods \"missing\" not found"));
    let d = nf.details.unwrap();
    assert_eq!((d.name.as_str(), d.kind.as_str()), ("missing", "pods"));

    pods.create(&PostParams::default(), &sleeper("dup")).await.unwrap();
    let ae = api_error(pods.create(&PostParams::default(), &sleeper("dup")).await.unwrap_err());
    assert_eq!(
        (ae.code, ae.reason.as_str(), ae.message.as_str()),
        (409, "AlreadyExists", "pods \"dup\" already exists")
    );
    assert_eq!(ae.details.unwrap().name, "dup");

    let cases = [
        (
            json!({"metadata": {}, "spec": {"containers": [{"name": "a", "image": "x"}]}}),
            "",
            "metadata.name",
            "FieldValueRequired",
        ),
        (
            json!({"metadata": {"name": "Bad_Name"}, "spec": {"containers": [{"name": "a", "image": "x"}]}}),
            "Bad_Name",
            "metadata.name",
            "FieldValueInvalid",
        ),
        (
            json!({"metadata": {"name": "empty"}, "spec": {"containers": []}}),
            "empty",
            "spec.containers",
            "FieldValueRequired",
        ),
        (
            json!({"metadata": {"name": "twins"}, "spec": {"containers": [{"name": "a", "image": "x"}, {"name": "a", "image": "x"}]}}),
            "twins",
            "spec.containers[1].name",
            "FieldValueDuplicate",
        ),
        (
            json!({"metadata": {"name": "noimage"}, "spec": {"containers": [{"name": "a"}]}}),
            "noimage",
            "spec.containers[0].image",
            "FieldValueRequired",
        ),
    ];
    for (body, name, field, reason) in cases {
        let pod: Pod = serde_json::from_value(body).unwrap();
        let inv = api_error(pods.create(&PostParams::default(), &pod).await.unwrap_err());
        assert_eq!((inv.code, inv.reason.as_str()), (422, "Invalid"), "{field}");
        assert!(inv.message.starts_with(&format!("Pod \"{name}\" is invalid: ")), "{}", inv.message);
        let details = inv.details.unwrap();
        assert_eq!((details.name.as_str(), details.kind.as_str()), (name, "Pod"));
        let cause = &details.causes[0];
        assert_eq!((cause.field.as_str(), cause.reason.as_str()), (field, reason));
        assert!(inv.message.contains(&cause.message), "{}", inv.message);
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deletion_with_grace_then_gone_and_processes_stopped() {
    let c = cluster().await;
    let pods: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    let pod = pods.create(&PostParams::default(), &sleeper("graceful")).await.unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    await_condition(pods.clone(), "graceful", conditions::is_pod_running()).await.unwrap();
    assert!(!c.node().pod_processes(&uid).is_empty());
    let answer = pods.delete("graceful", &DeleteParams::default().grace_period(2)).await.unwrap();
    let marked = answer.left().expect("a pod being deleted gracefully is returned");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(2));
    await_condition(pods.clone(), "graceful", conditions::is_deleted(&uid)).await.unwrap();
    let nf = api_error(pods.get("graceful").await.unwrap_err());
    assert_eq!(nf.code, 404);
    assert!(c.node().pod_processes(&uid).is_empty(), "container processes are gone once the pod is");
    c.stop().await;
}

fn owned_secret(name: &str, owner: &Pod) -> Secret {
    serde_json::from_value(json!({
        "metadata": {"name": name, "ownerReferences": [{
            "apiVersion": "v1", "kind": "Pod", "name": owner.metadata.name, "uid": owner.metadata.uid
        }]},
        "stringData": {"token": "s3cr3t"}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn owner_reference_garbage_collection() {
    let c = cluster().await;
    let client = c.client().unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());

    // Background (default): the secret follows its deleted pod.
    let owner = pods.create(&PostParams::default(), &sleeper("owner")).await.unwrap();
    let secret = secrets.create(&PostParams::default(), &owned_secret("owned", &owner)).await.unwrap();
    assert_eq!(secret.data.unwrap()["token"].0, b"s3cr3t");
    pods.delete("owner", &DeleteParams::default().grace_period(0)).await.unwrap();
    await_condition(secrets.clone(), "owned", conditions::is_deleted(secret.metadata.uid.as_ref().unwrap()))
        .await
        .unwrap();

    // Orphan: the secret stays, without the owner reference.
    let owner = pods.create(&PostParams::default(), &sleeper("owner2")).await.unwrap();
    secrets.create(&PostParams::default(), &owned_secret("kept", &owner)).await.unwrap();
    pods.delete("owner2", &DeleteParams::orphan().grace_period(0)).await.unwrap();
    await_condition(pods.clone(), "owner2", conditions::is_deleted(owner.metadata.uid.as_ref().unwrap()))
        .await
        .unwrap();
    let kept = secrets.get("kept").await.unwrap();
    assert!(kept.metadata.owner_references.unwrap_or_default().is_empty());

    // Foreground: the owner is only gone after its dependants.
    let owner = pods.create(&PostParams::default(), &sleeper("owner3")).await.unwrap();
    let dep = secrets.create(&PostParams::default(), &owned_secret("fg", &owner)).await.unwrap();
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Foreground),
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    pods.delete("owner3", &dp).await.unwrap();
    await_condition(pods.clone(), "owner3", conditions::is_deleted(owner.metadata.uid.as_ref().unwrap()))
        .await
        .unwrap();
    let nf = api_error(secrets.get("fg").await.unwrap_err());
    assert_eq!(nf.code, 404, "dependant {} deleted before its owner", dep.metadata.name.unwrap());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_pods_created_and_watched_concurrently() {
    let c = cluster().await;
    let pods: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    let watch = tokio::spawn({
        let pods = pods.clone();
        async move {
            let mut running = std::collections::HashSet::new();
            let mut stream = watcher(pods, watcher::Config::default().labels("suite=conformance"))
                .default_backoff()
                .applied_objects()
                .boxed();
            while running.len() < 50 {
                let p: Pod = stream.try_next().await.unwrap().unwrap();
                // A container stuck waiting for any reason but start-up fails the test instead of hanging it.
                let stuck = p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()).find_map(|cs| {
                    cs.state
                        .as_ref()?
                        .waiting
                        .as_ref()
                        .filter(|w| w.reason.as_deref() != Some("ContainerCreating"))
                        .map(|w| format!("{:?}: {:?}", w.reason, w.message))
                });
                if let Some(why) = stuck {
                    panic!("pod {:?} cannot start: {why}", p.metadata.name);
                }
                if p.status.and_then(|s| s.phase).as_deref() == Some("Running") {
                    running.insert(p.metadata.name.unwrap());
                }
            }
            running.len()
        }
    });
    let creates = (0..50).map(|i| {
        let pods = pods.clone();
        async move { pods.create(&PostParams::default(), &sleeper(&format!("many-{i}"))).await }
    });
    for r in futures::future::join_all(creates).await {
        r.unwrap();
    }
    assert_eq!(watch.await.unwrap(), 50);
    let listed = pods.list(&ListParams::default().labels("suite=conformance")).await.unwrap();
    assert_eq!(listed.items.len(), 50);
    pods.delete_collection(
        &DeleteParams::default().grace_period(0),
        &ListParams::default().labels("suite=conformance"),
    )
    .await
    .unwrap();
    assert!(pods.list(&ListParams::default().labels("suite=conformance")).await.unwrap().items.is_empty());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_bodies_get_400_and_the_server_keeps_serving() {
    let c = cluster().await;
    let client = c.client().unwrap();
    for body in [&b"{not json"[..], b"[1,2,3]", b"", b"\xff\xfe"] {
        let req = axum::http::Request::post("/api/v1/namespaces/default/configmaps")
            .header("content-type", "application/json")
            .body(body.to_vec())
            .unwrap();
        let err = api_error(client.request_text(req).await.unwrap_err());
        assert_eq!((err.code, err.reason.as_str()), (400, "BadRequest"), "body {body:?}");
    }
    let wrong_type = axum::http::Request::post("/api/v1/namespaces/default/pods")
        .header("content-type", "application/json")
        .body(br#"{"metadata":{"name":"t"},"spec":{"containers":[{"name":"a","image":5}]}}"#.to_vec())
        .unwrap();
    assert_eq!(api_error(client.request_text(wrong_type).await.unwrap_err()).code, 400);
    let unknown_verb = axum::http::Request::put("/api/v1/namespaces/default/configmaps").body(vec![]).unwrap();
    assert_eq!(api_error(client.request_text(unknown_verb).await.unwrap_err()).code, 405);
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(&PostParams::default(), &cm("still-alive", json!({}))).await.unwrap();
    assert!(cms.get("still-alive").await.is_ok());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_namespace_deletes_its_contents() {
    let c = cluster().await;
    let client = c.client().unwrap();
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns = nss
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "doomed"}})).unwrap())
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "doomed");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "doomed");
    let inside = pods.create(&PostParams::default(), &sleeper("inside")).await.unwrap();
    // A finalizer holds the namespace in Terminating until we clear it.
    let mut held = cm("held", json!({}));
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&PostParams::default(), &held).await.unwrap();
    await_condition(pods.clone(), "inside", conditions::is_pod_running()).await.unwrap();
    nss.delete("doomed", &DeleteParams::default()).await.unwrap();
    let err = api_error(cms.create(&PostParams::default(), &cm("late", json!({}))).await.unwrap_err());
    assert_eq!(err.code, 403, "no new content in a terminating namespace");
    assert_eq!(nss.get("doomed").await.unwrap().status.unwrap().phase.as_deref(), Some("Terminating"));
    await_condition(pods.clone(), "inside", conditions::is_deleted(inside.metadata.uid.as_ref().unwrap()))
        .await
        .unwrap();
    cms.patch("held", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
    await_condition(nss.clone(), "doomed", conditions::is_deleted(ns.metadata.uid.as_ref().unwrap())).await.unwrap();
    let all: Api<Pod> = Api::all(client);
    assert!(all.list(&ListParams::default().fields("metadata.namespace=doomed")).await.unwrap().items.is_empty());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_is_enforced() {
    let c = cluster_with(ClusterOptions { token: Some("t0ken".into()), ..ClusterOptions::on_host_rootfs() }).await;
    let ok: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    ok.list(&ListParams::default()).await.unwrap();
    // Trusting the cluster's CA, but with no credential at all.
    let mut cfg = kube::Config::new(c.url().parse().unwrap());
    cfg.root_cert = Some(vec![c.ca_der().unwrap().to_vec()]);
    let anonymous = kube::Client::try_from(cfg).unwrap();
    let err = api_error(Api::<Pod>::default_namespaced(anonymous).list(&ListParams::default()).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (401, "Unauthorized"));
    let kubeconfig = std::fs::read_to_string(c.kubeconfig_path()).unwrap();
    assert!(kubeconfig.contains("t0ken") && kubeconfig.contains("keel-local"), "{kubeconfig}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_list_watch_and_bookmarks() {
    let c = cluster().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(c.client().unwrap());
    cms.create(&PostParams::default(), &cm("before", json!({"w": "1"}))).await.unwrap();
    // sendInitialEvents=true: the initial state ends with the `k8s.io/initial-events-end` bookmark.
    let wp = WatchParams::streaming_lists().labels("w=1");
    let mut events = cms.watch(&wp, "").await.unwrap().boxed();
    match events.try_next().await.unwrap() {
        Some(WatchEvent::Added(o)) => assert_eq!(o.metadata.name.as_deref(), Some("before")),
        other => panic!("expected ADDED, got {other:?}"),
    }
    match events.try_next().await.unwrap() {
        Some(WatchEvent::Bookmark(b)) => {
            assert_eq!(b.metadata.annotations.get("k8s.io/initial-events-end").map(String::as_str), Some("true"))
        }
        other => panic!("expected the initial-events-end BOOKMARK, got {other:?}"),
    }
    cms.create(&PostParams::default(), &cm("after", json!({"w": "1"}))).await.unwrap();
    match events.try_next().await.unwrap() {
        Some(WatchEvent::Added(o)) => assert_eq!(o.metadata.name.as_deref(), Some("after")),
        other => panic!("expected ADDED, got {other:?}"),
    }
    // kube-runtime's streaming-list watcher sees both.
    let objs: Vec<ConfigMap> = watcher(cms.clone(), watcher::Config::default().labels("w=1").streaming_lists())
        .default_backoff()
        .applied_objects()
        .take(2)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(objs.len(), 2);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_kills_pods_and_removes_the_temp_dir() {
    let c = cluster().await;
    let pods: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    let pod = pods.create(&PostParams::default(), &sleeper("left-running")).await.unwrap();
    await_condition(pods.clone(), "left-running", conditions::is_pod_running()).await.unwrap();
    let pids = c.node().pod_processes(pod.metadata.uid.as_ref().unwrap());
    assert!(!pids.is_empty());
    // A process is the same one only with the same start time (pid_max can be as low as
    // 32768, and a busy machine reuses PIDs quickly); a zombie does not run.
    let start_of = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        (fields.first() != Some(&"Z")).then(|| fields.get(19).map(|s| s.to_string())).flatten()
    };
    let started: Vec<(u32, Option<String>)> = pids.iter().map(|p| (*p, start_of(*p))).collect();
    let dir = c.data_dir().to_path_buf();
    assert!(dir.exists());
    c.stop().await;
    assert!(!dir.exists(), "temp data dir {} removed", dir.display());
    for (pid, start) in started {
        let alive = start.is_some() && start_of(pid) == start;
        assert!(!alive, "process {pid} of the pod still runs after stop");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn selector_watches_see_objects_enter_and_leave() {
    let c = cluster().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(c.client().unwrap());
    let start = cms.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    let mut events = cms.watch(&WatchParams::default().labels("stage=active"), &start).await.unwrap().boxed();
    cms.create(&PostParams::default(), &cm("mover", json!({"stage": "idle"}))).await.unwrap();
    cms.patch("mover", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"stage": "active"}}})))
        .await
        .unwrap();
    cms.patch("mover", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "2"}}))).await.unwrap();
    cms.patch("mover", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"stage": "done"}}})))
        .await
        .unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        kinds.push(match events.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(_) => "ADDED",
            WatchEvent::Modified(_) => "MODIFIED",
            WatchEvent::Deleted(_) => "DELETED",
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
    c.stop().await;
}

fn names_of(items: &[ConfigMap]) -> Vec<String> {
    items.iter().map(|o| o.metadata.name.clone().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_lists_page_through_one_snapshot() {
    let c = cluster().await;
    let client = c.client().unwrap();
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "paging"}})).unwrap())
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "paging");
    let want: Vec<String> = (0..25).map(|i| format!("cm-{i:02}")).collect();
    for name in &want {
        cms.create(&PostParams::default(), &cm(name, json!({}))).await.unwrap();
    }
    let mut seen: Vec<ConfigMap> = Vec::new();
    let mut token: Option<String> = None;
    let mut versions = Vec::new();
    loop {
        let mut lp = ListParams::default().limit(10);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = cms.list(&lp).await.unwrap();
        assert!(page.items.len() <= 10);
        versions.push(page.metadata.resource_version.clone().unwrap());
        seen.extend(page.items);
        token = page.metadata.continue_.clone().filter(|t| !t.is_empty());
        if token.is_none() {
            assert_eq!(page.metadata.remaining_item_count, None);
            break;
        }
        assert_eq!(page.metadata.remaining_item_count, Some(25 - seen.len() as i64));
        if versions.len() == 1 {
            // Writes between pages must not show in the later pages.
            cms.create(&PostParams::default(), &cm("cm-99", json!({}))).await.unwrap();
            cms.delete("cm-20", &DeleteParams::default()).await.unwrap();
            cms.patch("cm-15", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "changed"}})))
                .await
                .unwrap();
        }
    }
    assert_eq!(versions.len(), 3);
    assert!(versions.iter().all(|v| v == &versions[0]), "every page reports the first page's version: {versions:?}");
    assert_eq!(names_of(&seen), want);
    let cm15 = seen.iter().find(|o| o.metadata.name.as_deref() == Some("cm-15")).unwrap();
    assert_eq!(cm15.data.as_ref().unwrap()["k"], "v", "cm-15 as it was when the list began");
    let now = names_of(&cms.list(&ListParams::default()).await.unwrap().items);
    assert!(now.contains(&"cm-99".to_owned()) && !now.contains(&"cm-20".to_owned()), "{now:?}");
    // resourceVersionMatch=Exact lists that same snapshot in one go.
    let exact =
        cms.list(&ListParams::default().at(&versions[0]).matching(kube::api::VersionMatch::Exact)).await.unwrap();
    assert_eq!(names_of(&exact.items), want);

    // Across all namespaces: every object once, in (namespace, name) order.
    let all: Api<ConfigMap> = Api::all(client.clone());
    let (mut everywhere, mut token) = (Vec::new(), None::<String>);
    loop {
        let mut lp = ListParams::default().limit(7);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = all.list(&lp).await.unwrap();
        everywhere.extend(
            page.items.iter().map(|o| (o.metadata.namespace.clone().unwrap(), o.metadata.name.clone().unwrap())),
        );
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    let mut sorted = everywhere.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(everywhere, sorted);
    assert_eq!(everywhere.iter().filter(|(ns, _)| ns == "paging").count(), 25);
    // kube-runtime's watcher pages its initial list (500 by default; 4 here).
    let objs: Vec<ConfigMap> = watcher(cms.clone(), watcher::Config::default().page_size(4))
        .default_backoff()
        .applied_objects()
        .take(25)
        .try_collect()
        .await
        .unwrap();
    let mut names = names_of(&objs);
    names.sort();
    assert_eq!(names.len(), 25);
    assert!(names.contains(&"cm-99".to_owned()));

    let err = api_error(cms.list(&ListParams::default().limit(5).continue_token("not-a-token")).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (400, "BadRequest"), "{err:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn continue_tokens_expire_with_the_watch_history() {
    let c = cluster_with(ClusterOptions { watch_history: Some(10), ..ClusterOptions::on_host_rootfs() }).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(c.client().unwrap());
    for i in 0..5 {
        cms.create(&PostParams::default(), &cm(&format!("a-{i}"), json!({}))).await.unwrap();
    }
    let token = cms.list(&ListParams::default().limit(2)).await.unwrap().metadata.continue_.unwrap();
    for i in 0..12 {
        cms.create(&PostParams::default(), &cm(&format!("b-{i}"), json!({}))).await.unwrap();
    }
    let err = api_error(cms.list(&ListParams::default().limit(2).continue_token(&token)).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (410, "Expired"), "{err:?}");
    assert!(err.message.contains("continue parameter is too old"), "{}", err.message);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_runs_answer_like_writes_but_change_nothing() {
    let c = cluster().await;
    let client = c.client().unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let start = cms.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    let mut events = cms.watch(&WatchParams::default(), &start).await.unwrap().boxed();
    let dry = PostParams { dry_run: true, ..PostParams::default() };

    let would_be = cms.create(&dry, &cm("ghost", json!({"app": "x"}))).await.unwrap();
    assert_eq!(would_be.metadata.uid.as_ref().map(String::len), Some(36));
    assert!(would_be.metadata.creation_timestamp.is_some());
    assert_eq!(would_be.metadata.resource_version, None, "nothing was stored, so no version");
    assert_eq!(api_error(cms.get("ghost").await.unwrap_err()).code, 404);
    // Validation and defaulting still run: a dry-run pod comes back defaulted, a bad one is refused.
    let pod = pods.create(&dry, &sleeper("dry-pod")).await.unwrap();
    assert_eq!(pod.spec.unwrap().restart_policy.as_deref(), Some("Always"));
    let mut bad = sleeper("bad");
    bad.spec.as_mut().unwrap().containers.clear();
    assert_eq!(api_error(pods.create(&dry, &bad).await.unwrap_err()).code, 422);
    assert!(pods.get_opt("dry-pod").await.unwrap().is_none());

    let real = cms.create(&PostParams::default(), &cm("real", json!({}))).await.unwrap();
    let patched = cms
        .patch("real", &PatchParams::default().dry_run(), &Patch::Merge(json!({"data": {"k": "dry"}})))
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap()["k"], "dry");
    let mut replaced = real.clone();
    replaced.data = Some([("k".to_owned(), "replaced".to_owned())].into());
    assert_eq!(cms.replace("real", &dry, &replaced).await.unwrap().data.unwrap()["k"], "replaced");
    cms.delete("real", &DeleteParams { dry_run: true, ..DeleteParams::default() }).await.unwrap();
    let after = cms.get("real").await.unwrap();
    assert_eq!(
        (after.data.unwrap()["k"].as_str(), after.metadata.resource_version),
        ("v", real.metadata.resource_version)
    );

    // The watch saw the one real create and nothing from the dry runs.
    cms.create(&PostParams::default(), &cm("marker", json!({}))).await.unwrap();
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("marker") {
        match events.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                seen.push(o.metadata.name.unwrap())
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["real", "marker"]);

    let bogus = axum::http::Request::post("/api/v1/namespaces/default/configmaps?dryRun=Maybe")
        .header("content-type", "application/json")
        .body(br#"{"metadata":{"name":"x"}}"#.to_vec())
        .unwrap();
    let err = api_error(client.request_text(bogus).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"), "{err:?}");
    assert!(err.message.contains("dryRun") && err.message.contains("supported values: \"All\""), "{}", err.message);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_creates_merges_and_tracks_owners() {
    let c = cluster().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(c.client().unwrap());
    let applied =
        |data: Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": data});
    let ci = PatchParams::apply("ci");

    let created = cms.patch("ssa", &ci, &Patch::Apply(applied(json!({"a": "1", "b": "2"})))).await.unwrap();
    assert_eq!(created.data.as_ref().unwrap().len(), 2);
    let managed = created.metadata.managed_fields.clone().unwrap();
    assert_eq!((managed[0].manager.as_deref(), managed[0].operation.as_deref()), (Some("ci"), Some("Apply")));
    // Someone else's field survives; a field ci stops applying goes; a changed one changes.
    cms.patch("ssa", &PatchParams::default(), &Patch::Merge(json!({"data": {"theirs": "x"}}))).await.unwrap();
    let second = cms.patch("ssa", &ci, &Patch::Apply(applied(json!({"a": "10"})))).await.unwrap();
    let data = second.data.unwrap();
    assert_eq!(
        (data.get("a").map(String::as_str), data.get("b"), data.get("theirs").map(String::as_str)),
        (Some("10"), None, Some("x"))
    );

    // Another manager changing ci's field conflicts, unless it forces.
    let err = api_error(
        cms.patch("ssa", &PatchParams::apply("other"), &Patch::Apply(applied(json!({"a": "20"})))).await.unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"), "{err:?}");
    assert!(err.message.contains("conflict with \"ci\"") && err.message.contains(".data.a"), "{}", err.message);
    let forced = cms
        .patch("ssa", &PatchParams::apply("other").force(), &Patch::Apply(applied(json!({"a": "20"}))))
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["a"], "20");

    let missing_manager = axum::http::Request::patch("/api/v1/namespaces/default/configmaps/ssa")
        .header("content-type", "application/apply-patch+yaml")
        .body(b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa}\n".to_vec())
        .unwrap();
    let err = api_error(c.client().unwrap().request_text(missing_manager).await.unwrap_err());
    assert_eq!((err.code, err.message.contains("fieldManager")), (422, true), "{err:?}");
    // A dry-run apply of a new object creates nothing.
    cms.patch(
        "ssa-dry",
        &PatchParams::apply("ci").dry_run(),
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa-dry"}})),
    )
    .await
    .unwrap();
    assert!(cms.get_opt("ssa-dry").await.unwrap().is_none());
    c.stop().await;
}

/// A completed delete answers as the real registry does: pods (and services, service accounts,
/// namespaces) with the object, configmaps and secrets with a `Status` of Success naming it; an
/// object held by a finalizer comes back marked.
#[tokio::test(flavor = "multi_thread")]
async fn delete_answers_object_or_status_by_kind() {
    let c = cluster().await;
    let client = c.client().unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let made = cms.create(&PostParams::default(), &cm("gone", json!({}))).await.unwrap();
    let status = cms.delete("gone", &DeleteParams::default()).await.unwrap().right().expect("a Status for a configmap");
    let details = status.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str(), details.uid),
        ("gone", "configmaps", made.metadata.uid.unwrap())
    );

    let mut held = cm("held", json!({}));
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&PostParams::default(), &held).await.unwrap();
    let marked = cms
        .delete("held", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("the object while a finalizer holds it");
    assert!(marked.metadata.deletion_timestamp.is_some());
    cms.patch("held", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();

    let pods: Api<Pod> = Api::default_namespaced(client);
    pods.create(&PostParams::default(), &sleeper("quick")).await.unwrap();
    let pod =
        pods.delete("quick", &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() }).await.unwrap();
    assert!(pod.left().is_some(), "pods answer with the pod");
    c.stop().await;
}
