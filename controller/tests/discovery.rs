//! Node agent discovery against a mock API server (kube-rs' mock-client pattern, tower-test):
//! the requests the controller sends are checked, and the pod list it gets is canned.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use http::{Request, Response};
use kube::client::Body;
use qsd_csi_controller::agents::{Agents, NodeAgent};
use qsd_csi_controller::discovery::Discovery;

fn pod(name: &str, node: &str, ip: Option<&str>, deleting: bool) -> serde_json::Value {
    let mut p = serde_json::json!({
        "metadata": { "name": name, "namespace": "qsd" },
        "spec": { "nodeName": node, "containers": [] },
        "status": {},
    });
    if let Some(ip) = ip {
        p["status"]["podIP"] = ip.into();
    }
    if deleting {
        p["metadata"]["deletionTimestamp"] = "2026-11-25T00:00:00Z".into();
    }
    p
}

/// Answers `n` pod list requests with `pods`, checking each request's path and selector.
fn api_server(
    n: usize,
    pods: Vec<serde_json::Value>,
) -> (kube::Client, tokio::task::JoinHandle<()>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        for _ in 0..n {
            let (request, respond) = handle.next_request().await.expect("a request");
            assert_eq!(request.method(), http::Method::GET);
            if request.uri().path() == "/api/v1/nodes" {
                // The cluster's nodes: every node a pod names, and w5, which has no pod.
                let items: Vec<_> = ["w1", "w2", "w3", "w4", "w5"]
                    .iter()
                    .map(|n| serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": n}}))
                    .collect();
                let list = serde_json::json!({
                    "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": items,
                });
                let body = Body::from(serde_json::to_vec(&list).expect("json"));
                respond.send_response(Response::builder().body(body).expect("response"));
                continue;
            }
            assert_eq!(request.uri().path(), "/api/v1/namespaces/qsd/pods");
            let query = request.uri().query().unwrap_or_default().to_owned();
            assert!(
                query.contains("labelSelector=app.kubernetes.io%2Fcomponent%3Dnode"),
                "{query}"
            );
            let list = serde_json::json!({
                "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods,
            });
            let body = Body::from(serde_json::to_vec(&list).expect("json"));
            respond.send_response(Response::builder().body(body).expect("response"));
        }
    });
    (kube::Client::new(service, "qsd"), server)
}

fn discovery() -> Discovery {
    Discovery {
        namespace: "qsd".into(),
        selector: "app.kubernetes.io/component=node".into(),
        port: 9443,
    }
}

#[tokio::test]
async fn agents_are_the_scheduled_node_pods_with_an_address_and_follow_the_listing() {
    let pods = vec![
        pod("a", "w1", Some("10.0.0.1"), false),
        pod("b", "w2", None, false), // not started yet: no address
        pod("c", "w3", Some("10.0.0.3"), true), // being deleted
        pod("d", "w4", Some("10.0.0.4"), false),
    ];
    // One pod listing, then two refreshes of a node listing and a pod listing each.
    let (client, server) = api_server(5, pods.clone());
    let found = discovery().addresses(client.clone()).await.expect("list");
    let want: BTreeMap<String, SocketAddr> = [
        ("w1".to_owned(), "10.0.0.1:9443".parse().expect("addr")),
        ("w4".to_owned(), "10.0.0.4:9443".parse().expect("addr")),
    ]
    .into();
    assert_eq!(found, want);

    // Refresh: a stale node goes, listed ones come; unchanged ones are not reconnected.
    let stale = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let stale = NodeAgent::Remote(qsd_csi_proto::agent::agent_client::AgentClient::new(stale));
    let agents = Agents::new([("w9".to_owned(), stale)].into(), None);
    let connects = Cell::new(0);
    let connect = |_: &str, addr: SocketAddr| {
        connects.set(connects.get() + 1);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("an address")
            .connect_lazy();
        Ok(NodeAgent::Remote(qsd_csi_proto::agent::agent_client::AgentClient::new(channel)))
    };
    let mut known = BTreeMap::new();
    discovery().refresh(client.clone(), &agents, &mut known, &connect).await.expect("refresh");
    let names: Vec<String> = agents.nodes().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["w1", "w4"]);
    assert_eq!(connects.get(), 2);
    discovery().refresh(client, &agents, &mut known, &connect).await.expect("refresh again");
    assert_eq!(connects.get(), 2, "unchanged agents keep their connections");
    assert_eq!(agents.default_node().expect("a default"), "w1");
    // A node the cluster has whose plugin is not running (w2: no address yet; w5: no pod) is
    // unavailable for now, so nothing on it is taken for gone; a node the cluster does not
    // have holds nothing this controller can reach.
    for node in ["w2", "w3", "w5"] {
        let err = agents.node(node).expect_err("no agent");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{node}: {err:?}");
    }
    assert_eq!(agents.node("w9").expect_err("no such node").code(), tonic::Code::NotFound);
    server.await.expect("the mock server saw every request");
}

#[tokio::test(start_paused = true)]
async fn background_work_is_owned_runs_until_stopped_and_is_joined() {
    use qsd_csi_controller::events::Events;
    use qsd_csi_controller::run::Background;
    use std::sync::Arc;
    // One refresh, REFRESH after the start: a node listing and a pod listing.
    let (client, server) = api_server(2, vec![pod("a", "w1", Some("127.0.0.1"), false)]);
    let agents = Agents::new(BTreeMap::new(), None);
    let (connected_tx, mut connected) = tokio::sync::mpsc::unbounded_channel();
    let connect = Arc::new(move |node: &str, _: SocketAddr| {
        let _ = connected_tx.send(node.to_owned());
        // Nothing listens there: the relay's watch fails and retries, on loopback only.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        Ok(NodeAgent::Remote(qsd_csi_proto::agent::agent_client::AgentClient::new(channel)))
    });
    let mut background = Background::new();
    background.discover(discovery(), client, agents.clone(), BTreeMap::new(), connect);
    let leading = background.lead_alone();
    background.relay(agents.clone(), Events::log_only(), None, leading);
    assert_eq!(background.running(), ["discovery", "relay"]);
    assert!(agents.nodes().is_empty(), "nothing listed before the first refresh");
    // The refresh finds w1 (its agent is connected during the refresh)...
    assert_eq!(connected.recv().await.as_deref(), Some("w1"));
    // ...and stopping waits for the tasks: the refresh in flight completes, then both end.
    tokio::time::timeout(std::time::Duration::from_secs(60), background.stop())
        .await
        .expect("every background task ends when stopped");
    let names: Vec<String> = agents.nodes().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["w1"]);
    server.await.expect("the mock server saw both requests");
}
