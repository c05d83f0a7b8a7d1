//! The node agent over TCP with mutual TLS: only the controller's certificate gets in. Other
//! certificates of the cluster CA (a node's) are refused PERMISSION_DENIED on every RPC,
//! certificates of other CAs at the handshake. Certificates are made for the test by a
//! throwaway CA (rcgen).

mod common;

use std::net::SocketAddr;

use common::certs::{Ca, CONTROLLER};
use common::*;
use qsd_csi_proto::agent::{self, agent_client::AgentClient};
use qsd_node::tls::{self, TlsFiles};
use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

async fn capacity(c: &mut AgentClient<Channel>) -> Result<(), tonic::Status> {
    c.get_capacity(agent::PoolRef { pool: "local".into() }).await.map(drop)
}

/// An agent serving `node`'s certificate, obeying the default controller identity.
struct Served {
    addr: SocketAddr,
    tls: tls::AgentTls,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<qsd_node::Result<()>>,
}

async fn serve(env: &Env, node: &TlsFiles) -> Served {
    serve_on(env, node, "127.0.0.1:0".parse().expect("address")).await
}

/// As [`serve`], on `addr`. A stopped server's listener closes when its accepting task is
/// dropped, a moment after the stop returns: the address is taken again once it is free.
async fn serve_on(env: &Env, node: &TlsFiles, addr: SocketAddr) -> Served {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                assert!(std::time::Instant::now() < deadline, "{addr} still taken");
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    };
    let addr = listener.local_addr().expect("addr");
    let tls = tls::agent_from_files(node, CONTROLLER).expect("agent TLS");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let (core, tls) = (env.core(), tls.clone());
        async move {
            tls::serve_agent(core, listener, &tls, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    Served { addr, tls, stop: Some(stop), server }
}

impl Served {
    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        self.server.await.expect("joins").expect("server ends cleanly");
    }
}

/// Whether a client with `tls` is refused before any answer (handshake or first call).
async fn refused_at_connection(addr: SocketAddr, server_name: &str, tls: &TlsFiles) -> bool {
    match tls::connect_agent(addr, server_name, tls).await {
        Ok(mut c) => matches!(capacity(&mut c).await, Err(s) if s.code() != Code::PermissionDenied),
        Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_only_clients_with_a_certificate_from_the_cluster_ca() {
    let env = Env::new().await;
    let dir = env.dir.path();
    let cluster = Ca::new(dir, "cluster-ca");
    let rogue = Ca::new(dir, "rogue-ca");
    let node = cluster.leaf(dir, "node-1", &cluster);
    let controller = cluster.leaf(dir, CONTROLLER, &cluster);
    let served = serve(&env, &node).await;
    let addr = served.addr;

    // The controller, with a certificate from the cluster's CA.
    let mut good = tls::connect_agent(addr, "node-1", &controller).await.expect("connect");
    capacity(&mut good).await.expect("a cluster client is served");

    // No client certificate at all: the handshake (or the first call) fails.
    let anonymous = async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&cluster.pem).expect("ca")))
            .domain_name("node-1");
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        capacity(&mut AgentClient::new(channel)).await.map_err(|e| e.to_string())
    };
    assert!(anonymous.await.is_err(), "a client without a certificate was served");

    // A certificate from another CA, even one carrying the controller's name.
    let impostor = rogue.leaf(dir, CONTROLLER, &cluster);
    assert!(refused_at_connection(addr, "node-1", &impostor).await, "another CA's client served");

    // And the controller refuses a node whose certificate the cluster's CA did not sign.
    let trusts_rogue = cluster.leaf(dir, "controller-2", &rogue);
    assert!(
        refused_at_connection(addr, "node-1", &trusts_rogue).await,
        "a client accepted a server certificate its CA did not sign"
    );

    // The good client still works, and the server stops cleanly.
    capacity(&mut good).await.expect("still served");
    served.stop().await;
}

/// Every RPC of the agent, called once; the codes they answered.
async fn call_everything(c: &mut AgentClient<Channel>) -> Vec<(&'static str, Code)> {
    use agent::*;
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let volume = || VolumeRef { volume_id: "vol:local:x".into() };
    let snapshot = || SnapshotRef { snapshot_id: "snap:local:x".into() };
    let group = || SnapshotGroupRef { group_snapshot_id: "group:local:x".into() };
    let create = CreateVolumeRequest {
        pool: "local".into(),
        name: "stolen".into(),
        size_bytes: Some(1 << 20),
        ..Default::default()
    };
    let snap = SnapshotRequest { volume_id: "vol:local:x".into(), name: "s".into() };
    vec![
        ("CreateVolume", code(c.create_volume(create).await.map(drop))),
        ("DeleteVolume", code(c.delete_volume(volume()).await.map(drop))),
        ("GetVolume", code(c.get_volume(volume()).await.map(drop))),
        ("LocateVolume", code(c.locate_volume(volume()).await.map(drop))),
        ("LocateSnapshot", code(c.locate_snapshot(snapshot()).await.map(drop))),
        ("ListVolumes", code(c.list_volumes(agent::ListRequest::default()).await.map(drop))),
        (
            "ExpandVolume",
            code(
                c.expand_volume(ExpandVolumeRequest {
                    volume_id: "vol:local:x".into(),
                    size_bytes: 1 << 21,
                })
                .await
                .map(drop),
            ),
        ),
        (
            "ModifyVolume",
            code(
                c.modify_volume(ModifyVolumeRequest { volume_id: "vol:local:x".into(), qos: None })
                    .await
                    .map(drop),
            ),
        ),
        (
            "CreateSnapshots",
            code(
                c.create_snapshots(CreateSnapshotsRequest {
                    snapshots: vec![snap],
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
        ("DeleteSnapshot", code(c.delete_snapshot(snapshot()).await.map(drop))),
        ("ListSnapshots", code(c.list_snapshots(agent::ListRequest::default()).await.map(drop))),
        ("GetCapacity", code(c.get_capacity(PoolRef { pool: "local".into() }).await.map(drop))),
        ("WatchEvents", code(c.watch_events(Empty {}).await.map(drop))),
        (
            "ExportForCopy",
            code(
                c.export_for_copy(agent::ExportForCopyRequest {
                    source: Some(agent::export_for_copy_request::Source::SnapshotId(
                        "snap:local:x".into(),
                    )),
                    reader_node: "node-2".into(),
                })
                .await
                .map(drop),
            ),
        ),
        (
            "HoldWrites",
            code(
                c.hold_writes(HoldWritesRequest { volume_ids: vec!["vol:local:x".into()] })
                    .await
                    .map(drop),
            ),
        ),
        ("GetSnapshotGroup", code(c.get_snapshot_group(group()).await.map(drop))),
        ("DeleteSnapshotGroup", code(c.delete_snapshot_group(group()).await.map(drop))),
        ("GetVolumeHealth", code(c.get_volume_health(volume()).await.map(drop))),
        (
            "ListVolumeHealth",
            code(c.list_volume_health(agent::ListRequest::default()).await.map(drop)),
        ),
        (
            "SnapshotChanges",
            code(
                c.snapshot_changes(ChangesRequest {
                    target_snapshot_id: "snap:local:x".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_certificate_is_refused_permission_denied_on_every_rpc_unary_and_streaming() {
    let env = Env::new().await;
    let dir = env.dir.path();
    let cluster = Ca::new(dir, "cluster-ca");
    let node_1 = cluster.leaf(dir, "node-1", &cluster);
    let served = serve(&env, &node_1).await;

    // Node 2's certificate from the same CA, usable as a client (as the chart's certificates
    // once were): the handshake passes, and every call is refused by name.
    let node_2 = cluster.leaf_for(dir, "node-2", &cluster, &[ServerAuth, ClientAuth]);
    let mut client = tls::connect_agent(served.addr, "node-1", &node_2).await.expect("connect");
    let answered = call_everything(&mut client).await;
    let rpcs = include_str!("../../proto/proto/agent.proto")
        .lines()
        .filter(|l| l.trim_start().starts_with("rpc "))
        .count();
    assert_eq!(answered.len(), rpcs, "every RPC of agent.proto");
    for (rpc, code) in &answered {
        assert_eq!(*code, Code::PermissionDenied, "{rpc} answered a node's certificate");
    }
    assert!(
        !env.pool_dir().join("volumes/stolen.json").exists(),
        "a refused CreateVolume created a volume"
    );

    // The controller's certificate gets answers (not PERMISSION_DENIED) to the same calls.
    let controller = cluster.leaf(dir, CONTROLLER, &cluster);
    let mut client = tls::connect_agent(served.addr, "node-1", &controller).await.expect("connect");
    for (rpc, code) in call_everything(&mut client).await {
        assert_ne!(code, Code::PermissionDenied, "{rpc} refused the controller");
        assert_ne!(code, Code::Unavailable, "{rpc} did not answer the controller");
    }

    // A node certificate as the signer issues it (server auth only) cannot even be a client.
    let node_3 = cluster.leaf_for(dir, "node-3", &cluster, &[ServerAuth]);
    assert!(
        refused_at_connection(served.addr, "node-1", &node_3).await,
        "served a server-only cert"
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_refuses_an_agent_presenting_another_nodes_certificate() {
    let env = Env::new().await;
    let dir = env.dir.path();
    let cluster = Ca::new(dir, "cluster-ca");
    // Node 2's address, but node 1's certificate and key (stolen from node 1's files).
    let node_1 = cluster.leaf_for(dir, "node-1", &cluster, &[ServerAuth]);
    let served = serve(&env, &node_1).await;
    let controller = cluster.leaf_for(dir, CONTROLLER, &cluster, &[ClientAuth]);
    assert!(
        refused_at_connection(served.addr, "node-2", &controller).await,
        "the controller talked to node 1's certificate as node 2"
    );
    let mut as_node_1 =
        tls::connect_agent(served.addr, "node-1", &controller).await.expect("connect");
    capacity(&mut as_node_1).await.expect("the same agent is node 1 to the controller");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_from_the_next_connection_on_without_a_restart() {
    let env = Env::new().await;
    let dir = env.dir.path();
    let cluster = Ca::new(dir, "cluster-ca");
    let old = cluster.leaf_for(dir, "node-1", &cluster, &[ServerAuth]);
    let served = serve(&env, &old).await;
    let controller = cluster.leaf_for(dir, CONTROLLER, &cluster, &[ClientAuth]);
    let mut open = tls::connect_agent(served.addr, "node-1", &controller).await.expect("connect");
    capacity(&mut open).await.expect("served");

    // Renewal: a new key and certificate (named differently here, so the client can tell).
    let renewed = cluster.leaf_for(dir, "node-1-renewed", &cluster, &[ServerAuth]);
    let chain = tls::read_certificates(&renewed.cert).expect("chain");
    served.tls.cert.replace(chain, tls::read_key(&renewed.key).expect("key")).expect("replace");
    let mut fresh =
        tls::connect_agent(served.addr, "node-1-renewed", &controller).await.expect("connect");
    capacity(&mut fresh).await.expect("the new certificate is served");
    assert!(
        refused_at_connection(served.addr, "node-1", &controller).await,
        "a new connection still got the old certificate"
    );
    capacity(&mut open).await.expect("a connection opened before the renewal keeps working");

    // A key that does not match its certificate is refused, and the renewed one stays.
    let mismatched = tls::read_key(&old.key).expect("key");
    let chain = tls::read_certificates(&renewed.cert).expect("chain");
    assert!(served.tls.cert.replace(chain, mismatched).is_err(), "a mismatched pair was taken");
    capacity(&mut fresh).await.expect("still served");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_ends_the_event_watches_still_open() {
    use tokio_stream::StreamExt;
    let env = Env::new().await;
    let dir = env.dir.path();
    let cluster = Ca::new(dir, "cluster-ca");
    let node = cluster.leaf(dir, "node-1", &cluster);
    let controller = cluster.leaf(dir, CONTROLLER, &cluster);
    let served = serve(&env, &node).await;
    let mut client = tls::connect_agent(served.addr, "node-1", &controller).await.expect("connect");
    let mut watch = client.watch_events(agent::Empty {}).await.expect("watch").into_inner();
    // The controller keeps its watch: the stop must not wait for it to leave.
    let wait = std::time::Duration::from_secs(10);
    tokio::time::timeout(wait, served.stop()).await.expect("stopped with a watch open");
    let ended = tokio::time::timeout(wait, watch.next()).await.expect("the watch ended");
    assert!(!matches!(ended, Some(Ok(_))), "no event, only the end: {ended:?}");
}

/// Puts `from`'s certificate and key into `to`'s files the way a Secret volume renews them:
/// new files, renamed into place.
fn renew_files(from: &TlsFiles, to: &TlsFiles) {
    for (source, target) in [(&from.cert, &to.cert), (&from.key, &to.key)] {
        let next = target.with_extension("next");
        std::fs::copy(source, &next).expect("write");
        std::fs::rename(&next, target).expect("rename");
    }
}

/// A call on a channel whose server restarted: the first may find the old connection closing
/// (UNAVAILABLE, or CANCELLED when the close races the call, as the controller maps both), and
/// the next one connects anew.
async fn capacity_after_restart(client: &mut AgentClient<Channel>) -> Result<(), tonic::Status> {
    let mut answer = capacity(client).await;
    for _ in 0..3 {
        match &answer {
            Err(s) if matches!(s.code(), Code::Unavailable | Code::Cancelled | Code::Unknown) => {
                answer = capacity(client).await;
            }
            _ => break,
        }
    }
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_presents_its_renewed_certificate_from_its_next_connection_on() {
    let env = Env::new().await;
    let dir = env.dir.path();
    let cluster = Ca::new(dir, "cluster-ca");
    let node = cluster.leaf_for(dir, "node-1", &cluster, &[ServerAuth]);
    let files = dir.join("controller-secret");
    std::fs::create_dir(&files).expect("dir");
    let controller = TlsFiles {
        cert: files.join("tls.crt"),
        key: files.join("tls.key"),
        ca: cluster.pem.clone(),
    };
    // At first the files hold a certificate the agent does not take for the controller's.
    renew_files(&cluster.leaf_for(dir, "retired", &cluster, &[ClientAuth]), &controller);
    let served = serve(&env, &node).await;
    let addr = served.addr;
    let channel = controller.lazy_channel(addr, "node-1").expect("channel");
    let mut client = AgentClient::new(channel);
    let code = capacity(&mut client).await.err().map(|s| s.code());
    assert_eq!(code, Some(Code::PermissionDenied));

    // Renewed in place: the open connection keeps the certificate it was made with...
    renew_files(&cluster.leaf_for(dir, CONTROLLER, &cluster, &[ClientAuth]), &controller);
    let code = capacity(&mut client).await.err().map(|s| s.code());
    assert_eq!(code, Some(Code::PermissionDenied), "a connection keeps its certificate");
    // ...and the next one, after the agent restarts, presents the renewed one: same channel,
    // no restart of the caller. (A call may first find the old connection closed.)
    served.stop().await;
    let served = serve_on(&env, &node, addr).await;
    let answer = capacity_after_restart(&mut client).await;
    answer.expect("served with the renewed certificate");

    // Files that do not make a pair (a renewal half written) leave the last good one in use.
    std::fs::write(&controller.key, b"not a key").expect("write");
    served.stop().await;
    let served = serve_on(&env, &node, addr).await;
    let answer = capacity_after_restart(&mut client).await;
    answer.expect("the last good certificate is still presented");
    served.stop().await;
}
