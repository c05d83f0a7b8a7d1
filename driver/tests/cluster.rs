//! The controller across nodes: two engines (each with its own qemu-storage-daemon), each
//! serving its agent over mutual TLS; the controller routes by topology and by ID.

#[path = "../../node-plugin/tests/common/certs.rs"]
mod certs;

use std::collections::BTreeMap;
use std::sync::Arc;

use qsd_csi_controller::agents::{Agents, NodeAgent};
use qsd_csi_controller::ControllerService;
use qsd_csi_proto::csi::{self, controller_server::Controller};
use qsd_node::engine::{Engine, EngineConfig, PoolConfig};
use qsd_node::pool::id::ObjectId;
use qsd_node::pool::{NodeName, PoolKind, PoolName};
use qsd_node::qsd::DaemonConfig;
use qsd_node::tls;
use tonic::{Code, Request};

const MIB: i64 = 1 << 20;
const KEY: &str = qsd_node::csi::TOPOLOGY_KEY;

struct Node {
    engine: Option<Engine>,
    run: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        drop(self.engine.take());
        if let Ok(pid) = std::fs::read_to_string(self.run.join("qsd.pid")) {
            let _ = std::process::Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
    }
}

/// Starts a node: its engine (a local pool, and the pool `shared` in `dir/shared` that every
/// node of the test mounts), and its agent on a loopback port with mutual TLS.
/// An ID a controller answered with, typed for an engine.
fn oid(text: &str) -> ObjectId {
    text.parse().expect("an ID")
}

async fn node(dir: &std::path::Path, name: &str, ca: &certs::Ca) -> (Node, std::net::SocketAddr) {
    let root = dir.join(name);
    let config = EngineConfig {
        node: NodeName::parse(name).expect("node"),
        state_dir: root.join("state"),
        daemon: DaemonConfig::managed(root.join("run")),
        pools: vec![
            PoolConfig {
                name: PoolName::parse("local").expect("pool"),
                path: root.join("pool"),
                kind: PoolKind::Local,
            },
            PoolConfig {
                name: PoolName::parse("shared").expect("pool"),
                path: dir.join("shared"),
                kind: PoolKind::Shared,
            },
        ],
        default_max_chain_depth: 8,
        copy_address: Some(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let engine = Engine::open(config).await.expect("engine opens");
    let files = ca.leaf(dir, name, ca);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let core = engine.core_arc();
    tokio::spawn(async move {
        let tls = tls::agent_from_files(&files, certs::CONTROLLER).expect("agent TLS");
        tls::serve_agent(core, listener, &tls, async {
            let _ = stopped.await;
        })
        .await
    });
    (Node { engine: Some(engine), run: root.join("run"), stop: Some(stop) }, addr)
}

fn create(name: &str, preferred: &[&str], requisite: &[&str]) -> csi::CreateVolumeRequest {
    let topo = |nodes: &[&str]| {
        nodes
            .iter()
            .map(|n| csi::Topology { segments: [(KEY.to_owned(), (*n).to_owned())].into() })
            .collect()
    };
    let mount = csi::volume_capability::AccessType::Mount(Default::default());
    let mode = csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32;
    csi::CreateVolumeRequest {
        name: name.into(),
        volume_capabilities: vec![csi::VolumeCapability {
            access_type: Some(mount),
            access_mode: Some(csi::volume_capability::AccessMode { mode }),
        }],
        capacity_range: Some(csi::CapacityRange { required_bytes: 16 * MIB, limit_bytes: 0 }),
        accessibility_requirements: Some(csi::TopologyRequirement {
            requisite: topo(requisite),
            preferred: topo(preferred),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_places_and_routes_volumes_across_node_agents_over_mutual_tls() {
    let dir = tempfile::Builder::new().prefix("qsd-cluster-").tempdir_in("/tmp").expect("dir");
    let (_n1, _n2, c, _) = two_nodes(dir.path(), "local").await;

    // Placement: preferred topology, then requisite; the volume's topology names its node.
    let v2 = c.create_volume(Request::new(create("a", &["node-2"], &[]))).await.expect("create a");
    let v2 = v2.into_inner().volume.expect("volume");
    assert!(v2.volume_id.contains("@node-2:"), "{}", v2.volume_id);
    assert_eq!(v2.accessible_topology[0].segments[KEY], "node-2");
    let v1 = c.create_volume(Request::new(create("b", &[], &["node-1"]))).await.expect("create b");
    let v1 = v1.into_inner().volume.expect("volume");
    assert!(v1.volume_id.contains("@node-1:"), "{}", v1.volume_id);
    let nowhere = c.create_volume(Request::new(create("c", &[], &["node-9"]))).await;
    assert_eq!(nowhere.expect_err("no node").code(), Code::ResourceExhausted);

    // A snapshot is taken on its volume's node, and a restore lands there without topology.
    let snap = snapshot(&c, &v2.volume_id, "s").await.expect("snapshot");
    assert!(snap.snapshot_id.contains("@node-2:"), "{}", snap.snapshot_id);
    let restore = restore_request("r", &snap.snapshot_id);
    let r = c.create_volume(Request::new(restore)).await.expect("restore").into_inner();
    assert!(r.volume.expect("volume").volume_id.contains("@node-2:"));

    // Lists merge every node, in ID order, and page across them.
    let page = |token: String| csi::ListVolumesRequest { max_entries: 2, starting_token: token };
    let first = c.list_volumes(Request::new(page(String::new()))).await.expect("list").into_inner();
    let second = c.list_volumes(Request::new(page(first.next_token.clone()))).await.expect("list");
    let ids: Vec<String> = first
        .entries
        .iter()
        .chain(&second.into_inner().entries)
        .filter_map(|e| e.volume.as_ref().map(|v| v.volume_id.clone()))
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    // By ID: expand and capacity on node-2; an ID on a node without an agent is NOT_FOUND,
    // and deleting it succeeds (nothing this controller can reach holds it).
    let grown = expand(&c, &v2.volume_id, 32 * MIB).await.expect("expand");
    assert_eq!(grown, 32 * MIB);
    let capacity = c
        .get_capacity(Request::new(csi::GetCapacityRequest {
            accessible_topology: Some(csi::Topology {
                segments: [(KEY.to_owned(), "node-2".to_owned())].into(),
            }),
            ..Default::default()
        }))
        .await
        .expect("capacity");
    assert!(capacity.into_inner().available_capacity > 0);
    let elsewhere = v2.volume_id.replace("@node-2:", "@node-9:");
    let validate = c
        .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: elsewhere.clone(),
            volume_capabilities: vec![csi::VolumeCapability::default()],
            ..Default::default()
        }))
        .await;
    assert_eq!(validate.expect_err("unknown node").code(), Code::NotFound);
    let delete = |id: String| csi::DeleteVolumeRequest { volume_id: id, ..Default::default() };
    c.delete_volume(Request::new(delete(elsewhere))).await.expect("unknown node: gone");

    // Deletes go to the right node: everything is gone afterwards, and again is fine.
    let snapshot_delete =
        csi::DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() };
    for id in ids.iter().chain([&v2.volume_id]) {
        c.delete_volume(Request::new(delete(id.clone()))).await.expect("delete");
    }
    c.delete_snapshot(Request::new(snapshot_delete)).await.expect("delete snapshot");
    let left = c.list_volumes(Request::new(page(String::new()))).await.expect("list");
    assert!(left.into_inner().entries.is_empty());
    let layers = |n: &str| {
        std::fs::read_dir(dir.path().join(n).join("pool/layers")).map_or(0, |d| d.count())
    };
    assert_eq!((layers("node-1"), layers("node-2")), (0, 0), "no layer left on either node");
}

/// A request to restore `snapshot_id` into `name`, with no topology.
fn restore_request(name: &str, snapshot_id: &str) -> csi::CreateVolumeRequest {
    let mut restore = create(name, &[], &[]);
    restore.accessibility_requirements = None;
    restore.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource { snapshot_id: snapshot_id.into() },
        )),
    });
    restore
}

/// Grows `volume` through the controller; its new capacity.
async fn expand(c: &ControllerService, volume: &str, bytes: i64) -> Result<i64, tonic::Status> {
    let request = csi::ControllerExpandVolumeRequest {
        volume_id: volume.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        ..Default::default()
    };
    Ok(c.controller_expand_volume(Request::new(request)).await?.into_inner().capacity_bytes)
}

/// A snapshot of `volume` through the controller.
async fn snapshot(
    c: &ControllerService,
    volume: &str,
    name: &str,
) -> Result<csi::Snapshot, tonic::Status> {
    // These nodes are engines without a node service: nothing on them can freeze, and a
    // snapshot asked to freeze an attached volume there is refused, so none is asked.
    let request = csi::CreateSnapshotRequest {
        source_volume_id: volume.into(),
        name: name.into(),
        parameters: [(qsd_csi_model::params::FREEZE.to_owned(), "false".to_owned())].into(),
        ..Default::default()
    };
    let reply = c.create_snapshot(Request::new(request)).await?.into_inner();
    reply.snapshot.ok_or_else(|| tonic::Status::internal("no snapshot in the reply"))
}

/// Two nodes over mutual TLS, and a controller whose default node is node-1 (with the agents
/// it routes by).
async fn two_nodes(
    dir: &std::path::Path,
    default_pool: &str,
) -> (Node, Node, Arc<ControllerService>, Agents) {
    let ca = certs::Ca::new(dir, "cluster-ca");
    let (n1, a1) = node(dir, "node-1", &ca).await;
    let (n2, a2) = node(dir, "node-2", &ca).await;
    let controller_tls = ca.leaf(dir, certs::CONTROLLER, &ca);
    let mut agents = BTreeMap::new();
    for (name, addr) in [("node-1", a1), ("node-2", a2)] {
        let client = tls::connect_agent(addr, name, &controller_tls).await.expect("connect");
        agents.insert(name.to_owned(), NodeAgent::Remote(client));
    }
    let agents = Agents::new(agents, Some("node-1".into()));
    (n1, n2, Arc::new(ControllerService::new(agents.clone(), default_pool.into())), agents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pools_volume_is_served_by_the_node_that_has_it_attached() {
    use qsd_node::graph::ExportKind;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::Builder::new().prefix("qsd-shared-").tempdir_in("/tmp").expect("dir");
    let (n1, n2, c, agents) = two_nodes(dir.path(), "shared").await;
    let (e1, e2) = (
        n1.engine.as_ref().expect("engine").core_arc(),
        n2.engine.as_ref().expect("engine").core_arc(),
    );
    let mut request = create("s", &[], &[]);
    request.accessibility_requirements = None;
    let v = c.create_volume(Request::new(request)).await.expect("create").into_inner();
    let v = v.volume.expect("volume");
    assert_eq!(v.volume_id, "vol:shared:s");
    assert!(v.accessible_topology.is_empty(), "reachable from every node");

    // node-2 attaches it, as its NodeStage would: it sees what node-1 created.
    let export = e2.attach(&oid(&v.volume_id), ExportKind::Fuse).await.expect("attach on node-2");
    let export = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&export.endpoint.path)
        .expect("open export");
    export.write_all_at(&[7u8; 4096], 0).expect("write");
    export.sync_all().expect("flush");
    let owner = || std::fs::read_to_string(dir.path().join("shared/owners/s.json")).expect("owner");
    assert!(owner().contains("node-2"), "{}", owner());
    // One writer at a time: QEMU's image lock refuses node-1, and the record stays node-2's.
    e1.attach(&oid(&v.volume_id), ExportKind::Fuse).await.expect_err("node-2's daemon holds it");
    assert!(owner().contains("node-2"), "{}", owner());

    // node-1, the default node, refuses to change a volume node-2's daemon holds ...
    let refused = e1.expand_volume(&oid(&v.volume_id), 32 * MIB).await.expect_err("held elsewhere");
    assert_eq!(refused.kind(), qsd_node::ErrorKind::FailedPrecondition, "{refused}");
    let refused = e1.delete_volume(&oid(&v.volume_id)).await.expect_err("held elsewhere");
    assert_eq!(refused.kind(), qsd_node::ErrorKind::FailedPrecondition, "{refused}");
    // ... so the controller sends its requests to node-2: a snapshot and an online expand.
    let snap = snapshot(&c, &v.volume_id, "snap").await.expect("snapshot on node-2");
    assert_eq!(snap.snapshot_id, "snap:shared:snap");
    // The snapshot's requests (a delete may shorten its source's chain) go where the source
    // is attached.
    let holder = agents.node_of(qsd_node::pool::id::IdKind::Snapshot, &snap.snapshot_id).await;
    assert_eq!(holder.expect("located"), "node-2");
    export.write_all_at(&[9u8; 4096], 0).expect("write after the snapshot");
    let grown = expand(&c, &v.volume_id, 32 * MIB).await.expect("expand on node-2");
    assert_eq!(grown, 32 * MIB);
    assert_eq!(export.metadata().expect("stat").len(), 32 << 20, "grown online");

    // A restore goes to the default node, which sees the snapshot node-2 took.
    let restore = restore_request("r", &snap.snapshot_id);
    let r = c.create_volume(Request::new(restore)).await.expect("restore").into_inner();
    let r = r.volume.expect("volume").volume_id;
    let restored = e1.attach(&oid(&r), ExportKind::Fuse).await.expect("attach on node-1");
    let mut block = [0u8; 4096];
    std::fs::File::open(&restored.endpoint.path)
        .expect("open")
        .read_exact_at(&mut block, 0)
        .expect("read");
    assert_eq!(block, [7u8; 4096], "the restore holds the data from before the snapshot");
    e1.detach(&oid(&r)).await.expect("detach on node-1");

    // Listed once although both nodes mount the pool.
    let all = c
        .list_volumes(Request::new(csi::ListVolumesRequest::default()))
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<_> =
        all.entries.iter().filter_map(|e| e.volume.as_ref()).map(|v| &v.volume_id).collect();
    assert_eq!(ids, ["vol:shared:r", "vol:shared:s"]);

    // Detached, the volume goes back to the default node, which deletes it.
    drop(export);
    e2.detach(&oid(&v.volume_id)).await.expect("detach on node-2");
    assert!(!dir.path().join("shared/owners/s.json").exists(), "owner record removed");
    let holder = agents.node_of(qsd_node::pool::id::IdKind::Snapshot, &snap.snapshot_id).await;
    assert_eq!(holder.expect("located"), "node-1", "attached nowhere: the default node");
    let delete = |id: &str| csi::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() };
    c.delete_volume(Request::new(delete(&v.volume_id))).await.expect("delete on node-1");
    c.delete_volume(Request::new(delete(&r))).await.expect("delete restore");
    c.delete_snapshot(Request::new(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id,
        ..Default::default()
    }))
    .await
    .expect("delete snapshot");
    let layers = std::fs::read_dir(dir.path().join("shared/layers")).expect("layers").count();
    assert_eq!(layers, 0, "every layer is gone");

    // An owner record naming node-1 for a volume it does not hold (a crash between a detach
    // and the record's removal) is dropped when node-1's engine next reconciles.
    let stale = dir.path().join("shared/owners/ghost.json");
    std::fs::write(&stale, br#"{"node":"node-1"}"#).expect("stale record");
    let mut events = e1.subscribe();
    // The first subscriber also gets what happened since the engine opened: skip that.
    while events.try_recv().is_ok() {}
    let pid = std::fs::read_to_string(n1.run.join("qsd.pid")).expect("pid");
    let killed = std::process::Command::new("kill").args(["-KILL", pid.trim()]).status();
    assert!(killed.is_ok_and(|s| s.success()));
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while !matches!(events.recv().await, Ok(qsd_node::engine::EngineEvent::Reconciled { .. })) {
        }
    })
    .await
    .expect("node-1's engine reconciles with a new daemon");
    assert!(!stale.exists(), "the stale owner record is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshots_across_nodes_hold_writes_and_snapshot_metadata_streams_over_mutual_tls() {
    use csi::group_controller_server::GroupController;
    use csi::snapshot_metadata_server::SnapshotMetadata;
    use qsd_csi_controller::groups::GroupService;
    use qsd_csi_controller::metadata::MetadataService;
    use tokio_stream::StreamExt;
    let dir = tempfile::Builder::new().prefix("qsd-cluster-").tempdir_in("/tmp").expect("dir");
    let (n1, _n2, c, agents) = two_nodes(dir.path(), "local").await;
    let groups = GroupService::new(agents.clone());
    let metadata = MetadataService::new(agents);
    let mut ids = Vec::new();
    for (name, node) in [("a", "node-2"), ("b", "node-2"), ("c", "node-1")] {
        let v = c.create_volume(Request::new(create(name, &[node], &[]))).await.expect("create");
        ids.push(v.into_inner().volume.expect("volume").volume_id);
    }
    let group = |name: &str, volumes: &[&String]| csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: volumes.iter().map(|v| (*v).clone()).collect(),
        ..Default::default()
    };

    // Across nodes, a group is one instant only while every node holds its members' writes:
    // a volume attached without a filesystem to freeze (here a FUSE export; this test's nodes
    // have no Node service to freeze with) is refused, as is a group told not to freeze, and
    // nothing is left behind.
    let e1 = n1.engine.as_ref().expect("engine").core_arc();
    e1.attach(&oid(&ids[2]), qsd_node::graph::ExportKind::Fuse).await.expect("attach on node-1");
    let across = groups.create_volume_group_snapshot(Request::new(group("x", &[&ids[0], &ids[2]])));
    let across = across.await.expect_err("a volume whose writes cannot be held");
    assert_eq!(across.code(), Code::FailedPrecondition, "{across:?}");
    assert!(across.message().contains("without a mounted filesystem"), "{}", across.message());
    e1.detach(&oid(&ids[2])).await.expect("detach");
    let mut unfrozen = group("x", &[&ids[0], &ids[2]]);
    unfrozen.parameters.insert("freezeFilesystem".into(), "false".into());
    let unfrozen = groups.create_volume_group_snapshot(Request::new(unfrozen)).await;
    assert_eq!(unfrozen.expect_err("no freeze across nodes").code(), Code::FailedPrecondition);
    let listed = c.list_snapshots(Request::new(Default::default())).await.expect("list");
    assert!(listed.into_inner().entries.is_empty(), "no member of a refused group exists");

    // Held on both nodes, then each node's part: one group, named after its first node, whose
    // Get and Delete gather both parts.
    let across = groups
        .create_volume_group_snapshot(Request::new(group("x", &[&ids[0], &ids[2]])))
        .await
        .expect("a group across nodes")
        .into_inner()
        .group_snapshot
        .expect("group");
    assert!(across.group_snapshot_id.starts_with("group:local@node-1:"), "{across:?}");
    let mut nodes: Vec<&str> =
        across.snapshots.iter().map(|s| s.accessible_topology[0].segments[KEY].as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["node-1", "node-2"]);
    assert!(across.snapshots.iter().all(|s| s.group_snapshot_id == across.group_snapshot_id));
    let get = csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: across.group_snapshot_id.clone(),
        ..Default::default()
    };
    let got = groups.get_volume_group_snapshot(Request::new(get)).await.expect("get");
    assert_eq!(got.into_inner().group_snapshot.expect("group").snapshots.len(), 2);
    let delete = csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: across.group_snapshot_id.clone(),
        ..Default::default()
    };
    groups.delete_volume_group_snapshot(Request::new(delete)).await.expect("delete both parts");
    let listed = c.list_snapshots(Request::new(Default::default())).await.expect("list");
    assert!(listed.into_inner().entries.is_empty(), "both parts deleted");

    // On one node: one group, its members restorable on that node only.
    let made = groups
        .create_volume_group_snapshot(Request::new(group("g", &[&ids[0], &ids[1]])))
        .await
        .expect("group on node-2")
        .into_inner()
        .group_snapshot
        .expect("group");
    assert!(
        made.group_snapshot_id.starts_with("group:local@node-2:"),
        "{}",
        made.group_snapshot_id
    );
    assert_eq!(made.snapshots.len(), 2);
    for s in &made.snapshots {
        assert_eq!(s.group_snapshot_id, made.group_snapshot_id);
        // Its own node first; the other by a copy.
        assert_eq!(s.accessible_topology.len(), 2);
        assert_eq!(s.accessible_topology[0].segments[KEY], "node-2");
    }
    let get = csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: made.group_snapshot_id.clone(),
        ..Default::default()
    };
    let got = groups.get_volume_group_snapshot(Request::new(get.clone())).await.expect("get");
    assert_eq!(got.into_inner().group_snapshot.expect("group").snapshots.len(), 2);
    let member = made.snapshots[0].snapshot_id.clone();
    let alone = csi::DeleteSnapshotRequest { snapshot_id: member.clone(), ..Default::default() };
    let alone = c.delete_snapshot(Request::new(alone)).await.expect_err("a member alone");
    assert_eq!(alone.code(), Code::InvalidArgument);

    // A snapshot must be restorable where its requisite says: on a node the controller serves
    // (any: on the others by a copy); a node without an agent cannot hold it.
    let mut elsewhere = csi::CreateSnapshotRequest {
        source_volume_id: ids[0].clone(),
        name: "s".into(),
        ..Default::default()
    };
    elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology { segments: [(KEY.to_owned(), "node-9".to_owned())].into() }],
        preferred: vec![],
    });
    let refused = c.create_snapshot(Request::new(elsewhere)).await.expect_err("no such node");
    assert_eq!(refused.code(), Code::ResourceExhausted);

    // Snapshot metadata streams from node-2's engine over the agent's TLS channel: an untouched
    // volume has nothing allocated; an offset past its end is OUT_OF_RANGE.
    let allocated = |offset| csi::GetMetadataAllocatedRequest {
        snapshot_id: member.clone(),
        starting_offset: offset,
        ..Default::default()
    };
    let stream =
        metadata.get_metadata_allocated(Request::new(allocated(0))).await.expect("allocated");
    let messages: Vec<_> = stream.into_inner().collect::<Vec<_>>().await;
    // Nothing allocated: one empty message, which still tells the volume's size.
    let only = match &messages[..] {
        [Ok(only)] => only,
        other => panic!("one message expected: {other:?}"),
    };
    assert_eq!((only.block_metadata.len(), only.volume_capacity_bytes), (0, 16 * MIB));
    let past = metadata.get_metadata_allocated(Request::new(allocated(17 * MIB))).await;
    assert_eq!(past.err().map(|s| s.code()), Some(Code::OutOfRange));

    let delete = csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: made.group_snapshot_id.clone(),
        ..Default::default()
    };
    groups.delete_volume_group_snapshot(Request::new(delete.clone())).await.expect("delete");
    groups.delete_volume_group_snapshot(Request::new(delete)).await.expect("again: gone is fine");
    let gone = groups.get_volume_group_snapshot(Request::new(get)).await;
    assert_eq!(gone.err().map(|s| s.code()), Some(Code::NotFound));
}

/// Blocks a writer stamps, 1 MiB each, 3 MiB apart: scattered data with holes between.
const BLOCKS: u64 = 16;
const STRIDE: u64 = 3 << 20;

/// Each block's stamps in `image` (a qcow2 chain read with qemu-img), in write order: the
/// lowest and highest byte in it (the same unless a write was in flight at the copy's instant:
/// a 1 MiB write reaches the daemon in pieces, and the instant can fall between them).
fn stamps(image: &std::path::Path) -> Vec<(u8, u8)> {
    let raw = image.with_extension("raw");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&raw).expect("read the copy");
    let _ = std::fs::remove_file(&raw);
    (0..BLOCKS)
        .map(|b| {
            let block = &bytes[(b * STRIDE) as usize..(b * STRIDE + (1 << 20)) as usize];
            let (low, high) = (block.iter().min(), block.iter().max());
            (*low.expect("bytes"), *high.expect("bytes"))
        })
        .collect()
}

/// Whether `stamps` is what one sequential writer leaves at an instant: a prefix of blocks at
/// generation g + 1, then at most one block the instant caught mid-write (g + 1 and g), then
/// the rest at g.
fn is_a_cut(stamps: &[(u8, u8)]) -> bool {
    let g = stamps.iter().map(|s| s.0).min().unwrap_or(0);
    let level = |s: &(u8, u8)| match (s.0 - g, s.1 - g) {
        (1, 1) => Some(2),
        (0, 1) => Some(1),
        (0, 0) => Some(0),
        _ => None,
    };
    let levels: Option<Vec<u8>> = stamps.iter().map(level).collect();
    levels.is_some_and(|l| {
        l.windows(2).all(|w| w[0] >= w[1]) && l.iter().filter(|x| **x == 1).count() <= 1
    })
}

/// Stamps every block with `generation` through a FUSE export.
fn stamp(export: &std::path::Path, generation: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(export).expect("open export");
    for b in 0..BLOCKS {
        f.write_all_at(&vec![generation; 1 << 20], b * STRIDE).expect("write");
    }
    f.sync_data().expect("fsync");
}

/// Writes generation after generation of stamps through a FUSE export, from generation 3 on
/// (after `stamp`'s 1 and 2), until told to stop; the last generation written.
fn stamping(
    export: std::path::PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u8> {
    use std::os::unix::fs::FileExt;
    std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new().write(true).open(&export).expect("open export");
        let mut generation = 2u8;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            generation = (generation + 1).min(250); // no wrap: stamps compare as numbers
            for b in 0..BLOCKS {
                f.write_all_at(&vec![generation; 1 << 20], b * STRIDE).expect("write");
                f.sync_data().expect("fsync");
            }
        }
        generation
    })
}

/// The head layer of `volume_id` on `node`.
fn head_image(node: &Node, volume_id: &str) -> std::path::PathBuf {
    let core = node.engine.as_ref().expect("engine").core_arc();
    let (pool, chain) = core.volume_chain(&oid(volume_id)).expect("volume");
    pool.layer_path(chain[0])
}

/// Files left in every node's copy directories and pools' layer directories.
fn copy_leftovers(dir: &std::path::Path) -> Vec<String> {
    let mut left = Vec::new();
    for node in ["node-1", "node-2"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(node).join("run/copies")) {
            left.extend(entries.flatten().map(|e| e.path().display().to_string()));
        }
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_and_clone_onto_another_node_copy_over_nbd_with_tls_at_a_point_in_time() {
    use qsd_node::graph::ExportKind;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::Builder::new().prefix("qsd-across-").tempdir_in("/tmp").expect("dir");
    let (n1, n2, c, _) = two_nodes(dir.path(), "local").await;
    let e1 = n1.engine.as_ref().expect("engine").core_arc();
    let mut e2_events = n2.engine.as_ref().expect("engine").subscribe();
    let mut request = create("src", &["node-1"], &[]);
    request.capacity_range = Some(csi::CapacityRange { required_bytes: 64 * MIB, limit_bytes: 0 });
    let src = c.create_volume(Request::new(request)).await.expect("create").into_inner();
    let src = src.volume.expect("volume").volume_id;
    let export =
        e1.attach(&oid(&src), ExportKind::Fuse).await.expect("attach on node-1").endpoint.path;

    // Generation 1 everywhere, then a snapshot, then generation 2: a restore onto node-2
    // holds generation 1.
    stamp(&export, 1);
    let snap = snapshot(&c, &src, "s").await.expect("snapshot");
    let accessible: Vec<&str> =
        snap.accessible_topology.iter().map(|t| t.segments[KEY].as_str()).collect();
    assert_eq!(accessible, ["node-1", "node-2"], "restorable on its node, then by a copy");
    stamp(&export, 2);
    let mut restore = restore_request("r", &snap.snapshot_id);
    restore.capacity_range = None;
    restore.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: Vec::new(),
        preferred: vec![csi::Topology { segments: [(KEY.to_owned(), "node-2".to_owned())].into() }],
    });
    let r = c.create_volume(Request::new(restore)).await.expect("restore across").into_inner();
    let r = r.volume.expect("volume");
    assert!(r.volume_id.contains("@node-2:"), "{}", r.volume_id);
    assert_eq!(r.accessible_topology[0].segments[KEY], "node-2");
    let source = r.content_source.and_then(|s| s.r#type);
    assert!(
        matches!(&source, Some(csi::volume_content_source::Type::Snapshot(s)) if s.snapshot_id == snap.snapshot_id),
        "the restore names its source: {source:?}"
    );
    assert_eq!(stamps(&head_image(&n2, &r.volume_id)), vec![(1, 1); BLOCKS as usize]);

    // A clone onto node-2 while a writer stamps generation after generation on node-1
    // (the copy held to 8 MiB/s so that it overlaps many writes): the copy is one instant.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = stamping(export.clone(), stop.clone());
    let mut clone = create("k", &["node-2"], &[]);
    clone.capacity_range = None;
    clone.parameters.insert("cloneBandwidth".into(), "8Mi".into());
    clone.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource { volume_id: src.clone() },
        )),
    });
    let k = c.create_volume(Request::new(clone)).await.expect("clone across").into_inner();
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().expect("writer");
    let k = k.volume.expect("volume").volume_id;
    assert!(k.contains("@node-2:"), "{k}");
    let copied = stamps(&head_image(&n2, &k));
    // (The check itself: newer before older only, one block mid-write at most.)
    assert!(is_a_cut(&[(4, 4), (3, 4), (3, 3)]) && !is_a_cut(&[(3, 3), (4, 4)]));
    assert!(!is_a_cut(&[(3, 4), (3, 4)]) && !is_a_cut(&[(5, 5), (3, 3)]));
    assert!(is_a_cut(&copied), "not one instant of the writer: {copied:?}");
    assert!(copied[0].0 >= 3, "the copy began after the writer: {copied:?}");
    assert!(
        written > copied[0].1 + 1,
        "the writer went on during the copy: wrote {written}, copied {copied:?}"
    );

    // The copy reached node-2's events as a clone's outcome; nothing of it is left: no
    // export directory or server, no point-in-time snapshot on node-1.
    let finished = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Ok(qsd_node::engine::EngineEvent::CloneFinished { volume, error, .. }) =
                e2_events.recv().await
            {
                if volume.to_string() == k {
                    return error;
                }
            }
        }
    })
    .await
    .expect("a CloneFinished event for the copy");
    assert_eq!(finished, None);
    assert!(copy_leftovers(dir.path()).is_empty(), "{:?}", copy_leftovers(dir.path()));
    let snapshots: Vec<String> =
        e1.list_snapshots().expect("list").into_iter().map(|s| s.id.to_string()).collect();
    assert_eq!(snapshots, vec![snap.snapshot_id.clone()], "only the user's snapshot on node-1");
    let servers =
        std::process::Command::new("pgrep").args(["-f", "tls-creds-psk"]).output().expect("pgrep");
    let servers = String::from_utf8_lossy(&servers.stdout).into_owned();
    assert!(servers.trim().is_empty(), "copy servers still run: {servers}");
    e1.detach(&oid(&src)).await.expect("detach");
}

/// `qemu-img info` of an NBD export over TCP, with a PSK identity and key (or without TLS).
fn nbd_info(
    port: u32,
    export: &str,
    psk: Option<(&str, &[u8])>,
    dir: &std::path::Path,
) -> std::process::Output {
    let mut command = std::process::Command::new("qemu-img");
    command.arg("info");
    let mut opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export}"
    );
    if let Some((identity, key)) = psk {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::create_dir_all(dir).expect("key dir");
        std::fs::write(dir.join("keys.psk"), format!("{identity}:{hex}\n")).expect("key");
        command.arg("--object").arg(format!(
            "tls-creds-psk,id=t,endpoint=client,dir={},username={identity}",
            dir.display()
        ));
        opts.push_str(",tls-creds=t");
    }
    command.args(["--image-opts", &opts]).output().expect("qemu-img runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copys_export_reads_only_with_its_own_key_and_ends_with_the_copy() {
    let dir = tempfile::Builder::new().prefix("qsd-export-").tempdir_in("/tmp").expect("dir");
    let (_n1, _n2, c, agents) = two_nodes(dir.path(), "local").await;
    let v = c.create_volume(Request::new(create("v", &["node-1"], &[]))).await.expect("create");
    let v = v.into_inner().volume.expect("volume").volume_id;
    let snap = snapshot(&c, &v, "s").await.expect("snapshot");
    let node1 = agents.node("node-1").expect("agent");
    let request = qsd_csi_proto::agent::ExportForCopyRequest {
        source: Some(qsd_csi_proto::agent::export_for_copy_request::Source::SnapshotId(
            snap.snapshot_id.clone(),
        )),
        reader_node: "node-2".into(),
    };
    let mut stream = node1.export_for_copy(request).await.expect("export");
    let served =
        tokio_stream::StreamExt::next(&mut stream).await.expect("a message").expect("served");
    assert_eq!(served.host, "127.0.0.1");
    assert_eq!(served.size_bytes, 16 * MIB as u64);
    let keys = dir.path().join("client-keys");
    let port = served.port;
    let export = served.export_name.clone();

    // Without TLS, with the right identity and another key, with another identity: refused.
    let plain = nbd_info(port, &export, None, &keys);
    assert!(!plain.status.success(), "read without TLS");
    let wrong_key = nbd_info(port, &export, Some((&served.psk_identity, &[0u8; 32])), &keys);
    assert!(!wrong_key.status.success(), "read with another key");
    let wrong_id = nbd_info(port, &export, Some(("someone-else", &served.psk_key)), &keys);
    assert!(!wrong_id.status.success(), "read as another identity");
    // With the copy's key: the export is there (so the refusals above were the credentials').
    let right = nbd_info(port, &export, Some((&served.psk_identity, &served.psk_key)), &keys);
    assert!(right.status.success(), "{}", String::from_utf8_lossy(&right.stderr));
    assert!(String::from_utf8_lossy(&right.stdout).contains("16 MiB"));

    // The caller hangs up: the export goes, and its key with it.
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while nbd_info(port, &export, Some((&served.psk_identity, &served.psk_key)), &keys)
        .status
        .success()
    {
        assert!(std::time::Instant::now() < deadline, "the export outlived its copy");
        tokio::task::yield_now().await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !copy_leftovers(dir.path()).is_empty() {
        assert!(std::time::Instant::now() < deadline, "left: {:?}", copy_leftovers(dir.path()));
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_from_a_source_that_does_not_answer_or_with_a_malformed_export_leaves_nothing() {
    use qsd_csi_proto::agent;
    let dir = tempfile::Builder::new().prefix("qsd-badcopy-").tempdir_in("/tmp").expect("dir");
    let (_n1, _n2, _c, agents) = two_nodes(dir.path(), "local").await;
    let node2 = agents.node("node-2").expect("agent");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed); // nothing listens there now
    let request = |export: agent::CopyExport| agent::CreateVolumeRequest {
        pool: "local".into(),
        name: "copy".into(),
        source: Some(agent::create_volume_request::Source::SnapshotId(
            "snap:local@node-1:s".into(),
        )),
        remote: Some(export),
        ..Default::default()
    };
    let export = agent::CopyExport {
        host: "127.0.0.1".into(),
        port: port.into(),
        export_name: "copy-x".into(),
        psk_identity: "qsd-csi-x".into(),
        psk_key: vec![1; 32],
        size_bytes: 16 << 20,
        allocated_bytes: 0,
    };
    // (row, export, code)
    let rows = [
        ("nobody serves the port", export.clone(), Code::Unavailable),
        ("no port", agent::CopyExport { port: 0, ..export.clone() }, Code::InvalidArgument),
        (
            "a port past 65535",
            agent::CopyExport { port: 70000, ..export.clone() },
            Code::InvalidArgument,
        ),
        (
            "a short key",
            agent::CopyExport { psk_key: vec![1; 4], ..export.clone() },
            Code::InvalidArgument,
        ),
        (
            "no host",
            agent::CopyExport { host: String::new(), ..export.clone() },
            Code::InvalidArgument,
        ),
    ];
    for (row, export, code) in rows {
        let refused = node2.create_volume(request(export)).await.expect_err(row);
        assert_eq!(refused.code(), code, "{row}: {refused:?}");
    }
    let layers = std::fs::read_dir(dir.path().join("node-2/pool/layers")).map_or(0, |d| d.count());
    assert_eq!(layers, 0, "no image left");
    assert!(copy_leftovers(dir.path()).is_empty(), "{:?}", copy_leftovers(dir.path()));
    let intents =
        std::fs::read_dir(dir.path().join("node-2/state/operations")).map_or(0, |d| d.count());
    assert_eq!(intents, 0, "no intent left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_moved_to_another_node_keeps_its_id_and_is_routed_there() {
    use qsd_csi_model::id::IdKind;
    use qsd_node::graph::ExportKind;
    let dir = tempfile::Builder::new().prefix("qsd-move-").tempdir_in("/tmp").expect("dir");
    let (n1, n2, c, agents) = two_nodes(dir.path(), "local").await;
    let (e1, e2) = (n1.engine.as_ref().expect("e1").core_arc(), n2.engine.as_ref().expect("e2"));
    let e2 = e2.core_arc();
    let mut request = create("mv", &["node-1"], &[]);
    request.capacity_range = Some(csi::CapacityRange { required_bytes: 64 * MIB, limit_bytes: 0 });
    request.parameters.insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
    let id = c.create_volume(Request::new(request)).await.expect("create").into_inner();
    let id = id.volume.expect("volume").volume_id;
    let export =
        e1.attach(&oid(&id), ExportKind::Fuse).await.expect("attach on node-1").endpoint.path;
    stamp(&export, 7);
    e1.detach(&oid(&id)).await.expect("detach");

    // The move: node-2 holds a copy under the same ID; the controller routes the ID there.
    let qos = [("iopsTotal".to_owned(), "500".to_owned())].into();
    let moved = c.move_volume(&id, "node-1", "node-2", &qos).await.expect("move");
    assert_eq!(moved.volume_id, id, "a moved volume keeps its ID");
    assert_eq!(moved.labels.get("csi.storage.k8s.io/pvc/name").map(String::as_str), Some("data"));
    assert_eq!(agents.node_of(IdKind::Volume, &id).await.expect("routed"), "node-2");
    assert_eq!(stamps(&head_image(&n2, &id)), vec![(7, 7); BLOCKS as usize]);
    let listed: Vec<String> =
        e2.list_volumes().expect("list").into_iter().map(|v| v.id.to_string()).collect();
    assert_eq!(listed, vec![id.clone()], "node-2 lists it by its ID");
    let attached =
        e2.attach(&oid(&id), ExportKind::Fuse).await.expect("attach on node-2 by its ID");
    assert!(attached.endpoint.path.exists());
    e2.detach(&oid(&id)).await.expect("detach");

    // The ID reaches node-2's copy through the controller: a resize and a snapshot there.
    assert_eq!(expand(&c, &id, 128 * MIB).await.expect("expand"), 128 * MIB);
    assert_eq!(e1.get_volume(&oid(&id)).expect("node-1's old copy").size, 64 << 20);
    // Listed once, as it lives where its ID is routed, while the old copy still exists.
    let listed = c.list_volumes(Request::new(Default::default())).await.expect("list");
    let listed: Vec<(String, i64)> = listed
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.volume)
        .map(|v| (v.volume_id, v.capacity_bytes))
        .collect();
    assert_eq!(listed, vec![(id.clone(), 128 * MIB)]);
    let snap = snapshot(&c, &id, "after-move").await.expect("snapshot");
    assert!(snap.snapshot_id.contains("@node-2:"), "{}", snap.snapshot_id);
    assert_eq!(snap.source_volume_id, id);

    // A controller that did not make the move (restarted) does not take node-2's word for an
    // ID of node-1's while node-1 still holds the volume: it routes to node-1.
    let fresh = Agents::new(agents.nodes().into_iter().collect(), Some("node-1".into()));
    fresh.find_moved().await;
    assert_eq!(fresh.node_of(IdKind::Volume, &id).await.expect("home"), "node-1");

    // The old copy is removed on its node by the ID: no layer of it is left there, and the
    // fresh controller now routes the ID to node-2.
    let home = agents.node("node-1").expect("node-1");
    let volume_ref = qsd_csi_proto::agent::VolumeRef { volume_id: id.clone() };
    home.delete_volume(volume_ref).await.expect("old copy deleted");
    fresh.find_moved().await;
    assert_eq!(fresh.node_of(IdKind::Volume, &id).await.expect("found"), "node-2");
    let layers = std::fs::read_dir(dir.path().join("node-1/pool/layers")).expect("layers");
    let left: Vec<_> = layers.flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "node-1 keeps layers of the moved volume: {left:?}");

    // Only a copy from another node keeps an ID, and only its source's.
    let mut keep =
        qsd_csi_model::volume::CreateVolume::named("local", "other", 16 << 20).expect("request");
    keep.keep_id = Some(oid(&id.replace("@node-2:", "@node-1:")));
    let refused = e2.create_volume(&keep).await.expect_err("keep_id without a copy");
    assert_eq!(refused.kind(), qsd_node::error::ErrorKind::InvalidArgument, "{refused}");

    // And back: on node-1 it is an ordinary volume of its own ID again, with node-2's data.
    let back = c.move_volume(&id, "node-2", "node-1", &qos).await.expect("move back");
    assert_eq!((back.volume_id.as_str(), back.size_bytes), (id.as_str(), 128 << 20));
    let away = agents.node("node-2").expect("node-2");
    let volume_ref = qsd_csi_proto::agent::VolumeRef { volume_id: id.clone() };
    away.delete_volume(volume_ref).await.expect("node-2's copy deleted");
    fresh.find_moved().await;
    assert_eq!(fresh.node_of(IdKind::Volume, &id).await.expect("home"), "node-1");
    assert_eq!(stamps(&head_image(&n1, &id)), vec![(7, 7); BLOCKS as usize]);

    let gone = csi::DeleteSnapshotRequest { snapshot_id: snap.snapshot_id, ..Default::default() };
    c.delete_snapshot(Request::new(gone)).await.expect("delete the snapshot");
    let gone = csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() };
    c.delete_volume(Request::new(gone)).await.expect("delete through the controller");
    assert!(e1.list_volumes().expect("list").is_empty(), "deleted where it lives");
    assert!(e2.list_volumes().expect("list").is_empty(), "and nothing on node-2");
}
