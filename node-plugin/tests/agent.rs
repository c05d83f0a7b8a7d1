//! The node agent served over gRPC on a unix socket, driven by its generated client.

mod common;

use common::*;
use qsd_csi_proto::agent::{self, agent_client::AgentClient, agent_server::AgentServer};
use qsd_node::agent::AgentService;
use qsd_node::graph::ExportKind;

/// The agent over `env`'s engine on a unix socket, and a client of it.
async fn serve(
    env: &Env,
) -> (
    AgentClient<tonic::transport::Channel>,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let socket = env.dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(AgentService::new(env.core())))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let client =
        AgentClient::new(qsd_csi_proto::transport::connect_unix(&socket).await.expect("connect"));
    (client, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_the_volume_lifecycle_with_the_csi_error_codes() {
    let env = Env::new().await;
    let (mut c, server) = serve(&env).await;
    let create = |name: &str, size: i64| agent::CreateVolumeRequest {
        pool: "local".into(),
        name: name.into(),
        size_bytes: Some(size),
        ..Default::default()
    };
    let a = c.create_volume(create("a", 16 * MIB as i64)).await.expect("create a").into_inner();
    let b = c.create_volume(create("b", 16 * MIB as i64)).await.expect("create b").into_inner();
    assert_eq!((a.size_bytes, a.chain_depth), (16 * MIB, 1));

    let snaps = c
        .create_snapshots(agent::CreateSnapshotsRequest {
            snapshots: vec![
                agent::SnapshotRequest { volume_id: a.volume_id.clone(), name: "sa".into() },
                agent::SnapshotRequest { volume_id: b.volume_id.clone(), name: "sb".into() },
            ],
            ..Default::default()
        })
        .await
        .expect("group snapshot")
        .into_inner()
        .snapshots;
    assert_eq!(snaps.len(), 2);
    let restored = c
        .create_volume(agent::CreateVolumeRequest {
            source: Some(agent::create_volume_request::Source::SnapshotId(
                snaps[0].snapshot_id.clone(),
            )),
            size_bytes: None,
            ..create("r", 0)
        })
        .await
        .expect("restore")
        .into_inner();
    assert_eq!(
        restored.source,
        Some(agent::volume::Source::SourceSnapshotId(snaps[0].snapshot_id.clone())),
        "a restored volume names its snapshot by full ID"
    );
    let linked = c
        .create_volume(agent::CreateVolumeRequest {
            source: Some(agent::create_volume_request::Source::VolumeId(b.volume_id.clone())),
            clone_mode: agent::CloneMode::Linked as i32,
            size_bytes: None,
            ..create("l", 0)
        })
        .await
        .expect("linked clone")
        .into_inner();
    assert_eq!(linked.chain_depth, 3, "overlay on b's frozen head, which sits on sb's layer");
    let grown = c
        .expand_volume(agent::ExpandVolumeRequest {
            volume_id: a.volume_id.clone(),
            size_bytes: 32 * MIB as i64,
        })
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(grown.size_bytes, 32 * MIB);
    c.modify_volume(agent::ModifyVolumeRequest {
        volume_id: a.volume_id.clone(),
        qos: Some(agent::Qos { iops_total: 100, ..Default::default() }),
    })
    .await
    .expect("modify");
    let free = c
        .get_capacity(agent::PoolRef { pool: "local".into() })
        .await
        .expect("capacity")
        .into_inner();
    assert!(free.available_bytes > 0);
    assert_eq!(
        c.list_volumes(agent::ListRequest::default())
            .await
            .expect("list")
            .into_inner()
            .volumes
            .len(),
        4
    );
    // Paged: three, then the one after the third's ID, then nothing more.
    let page = |max_entries, starting_token: &str| agent::ListRequest {
        max_entries,
        starting_token: starting_token.to_owned(),
    };
    let first = c.list_volumes(page(3, "")).await.expect("list").into_inner();
    assert_eq!((first.volumes.len(), &first.next_token), (3, &first.volumes[2].volume_id));
    let rest = c.list_volumes(page(3, &first.next_token)).await.expect("list").into_inner();
    assert_eq!((rest.volumes.len(), rest.next_token.as_str()), (1, ""));
    assert!(rest.volumes[0].volume_id > first.next_token, "in ID order");

    let code = |r: Result<tonic::Response<agent::Volume>, tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(
        code(c.create_volume(create("a", 64 * MIB as i64)).await),
        Some(tonic::Code::AlreadyExists)
    );
    assert_eq!(
        code(c.create_volume(create("../x", MIB as i64)).await),
        Some(tonic::Code::InvalidArgument)
    );
    assert_eq!(code(c.create_volume(create("z", -1)).await), Some(tonic::Code::InvalidArgument));
    let missing =
        c.delete_volume(agent::VolumeRef { volume_id: "vol:local@node-1:none".into() }).await;
    assert_eq!(missing.err().map(|s| s.code()), Some(tonic::Code::NotFound));
    let shrink = c
        .expand_volume(agent::ExpandVolumeRequest {
            volume_id: a.volume_id.clone(),
            size_bytes: MIB as i64,
        })
        .await;
    assert_eq!(shrink.err().map(|s| s.code()), Some(tonic::Code::OutOfRange));

    for s in &snaps {
        c.delete_snapshot(agent::SnapshotRef { snapshot_id: s.snapshot_id.clone() })
            .await
            .expect("delete snapshot");
    }
    for v in [&linked, &restored, &a, &b] {
        c.delete_volume(agent::VolumeRef { volume_id: v.volume_id.clone() }).await.expect("delete");
    }
    assert!(env.layer_files().is_empty(), "{:?}", env.layer_files());
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_streams_clone_outcomes_and_crossed_thresholds_with_the_volumes_labels() {
    let env = Env::new().await;
    let (mut c, _server) = serve(&env).await;
    let claim = |name: &str| {
        [("csi.storage.k8s.io/pvc/name".to_owned(), name.to_owned())].into_iter().collect()
    };
    let src = c
        .create_volume(agent::CreateVolumeRequest {
            pool: "local".into(),
            name: "src".into(),
            size_bytes: Some(16 * MIB as i64),
            labels: claim("data"),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(src.labels, claim("data"), "labels come back with the volume");
    let mut stream = c.watch_events(agent::Empty {}).await.expect("watch").into_inner();

    let copy = c
        .create_volume(agent::CreateVolumeRequest {
            pool: "local".into(),
            name: "copy".into(),
            source: Some(agent::create_volume_request::Source::VolumeId(src.volume_id.clone())),
            labels: claim("cloned"),
            ..Default::default()
        })
        .await
        .expect("clone")
        .into_inner();
    let finished = next_event(&mut stream).await;
    assert_eq!(
        (finished.volume_id.as_str(), &finished.labels),
        (copy.volume_id.as_str(), &claim("cloned"))
    );
    let Some(agent::volume_event::Kind::CloneFinished(f)) = finished.kind else {
        panic!("{finished:?}")
    };
    assert_eq!((f.source_volume_id.as_str(), f.error.as_str()), (src.volume_id.as_str(), ""));

    let core = env.core();
    let export = core
        .attach(&common::id(&src.volume_id), ExportKind::Fuse)
        .await
        .expect("attach")
        .endpoint
        .path;
    core.set_write_threshold(&common::id(&src.volume_id), 2 * MIB, MIB).await.expect("arm");
    write_at(&export, 0, &pattern(9, 3 * MIB as usize));
    let crossed = next_event(&mut stream).await;
    assert_eq!(
        (crossed.volume_id.as_str(), &crossed.labels),
        (src.volume_id.as_str(), &claim("data"))
    );
    let Some(agent::volume_event::Kind::WriteThresholdCrossed(t)) = crossed.kind else {
        panic!("{crossed:?}")
    };
    assert_eq!((t.threshold_bytes, t.size_bytes), (2 * MIB, 16 * MIB));
}

async fn next_event(stream: &mut tonic::Streaming<agent::VolumeEvent>) -> agent::VolumeEvent {
    use tokio_stream::StreamExt;
    tokio::time::timeout(std::time::Duration::from_secs(60), stream.next())
        .await
        .expect("an event within a minute")
        .expect("stream open")
        .expect("event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_is_idempotent_whole_and_deleted_only_as_a_group() {
    let env = Env::new().await;
    let (mut c, server) = serve(&env).await;
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let v = c
            .create_volume(agent::CreateVolumeRequest {
                pool: "local".into(),
                name: name.into(),
                size_bytes: Some(8 * MIB as i64),
                ..Default::default()
            })
            .await
            .expect("create")
            .into_inner();
        ids.push(v.volume_id);
    }
    let group = |names: &[(&str, &str)], group: &str| agent::CreateSnapshotsRequest {
        snapshots: names
            .iter()
            .map(|(v, s)| agent::SnapshotRequest { volume_id: (*v).into(), name: (*s).into() })
            .collect(),
        group: group.into(),
        no_freeze: false,
    };
    let first = c
        .create_snapshots(group(&[(&ids[0], "g-a"), (&ids[1], "g-b")], "g"))
        .await
        .expect("group")
        .into_inner()
        .snapshots;
    let group_id = first[0].group_snapshot_id.clone();
    assert_eq!(group_id, "group:local@node-1:g");
    assert!(first.iter().all(|s| s.group_snapshot_id == group_id && s.node == "node-1"));
    // The same request again: the members taken before, nothing new.
    let again = c
        .create_snapshots(group(&[(&ids[1], "g-b"), (&ids[0], "g-a")], "g"))
        .await
        .expect("the same group again")
        .into_inner()
        .snapshots;
    let mut a: Vec<_> = first.iter().map(|s| &s.snapshot_id).collect();
    let mut b: Vec<_> = again.iter().map(|s| &s.snapshot_id).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(
        c.list_snapshots(agent::ListRequest::default())
            .await
            .expect("list")
            .into_inner()
            .snapshots
            .len(),
        2
    );
    // The same name over other volumes clashes; so does a member's name in another group.
    let other = c.create_snapshots(group(&[(&ids[0], "g-a"), (&ids[2], "g-c")], "g")).await;
    assert_eq!(other.err().map(|s| s.code()), Some(tonic::Code::AlreadyExists));
    let stolen = c.create_snapshots(group(&[(&ids[0], "g-a")], "h")).await;
    assert_eq!(stolen.err().map(|s| s.code()), Some(tonic::Code::AlreadyExists));
    // A member goes only with its group.
    let alone =
        c.delete_snapshot(agent::SnapshotRef { snapshot_id: first[0].snapshot_id.clone() }).await;
    let alone = alone.expect_err("a member alone");
    assert_eq!(alone.code(), tonic::Code::InvalidArgument);
    assert!(alone.message().contains(&group_id), "{}", alone.message());
    let r = || agent::SnapshotGroupRef { group_snapshot_id: group_id.clone() };
    assert_eq!(c.get_snapshot_group(r()).await.expect("get").into_inner().snapshots.len(), 2);
    c.delete_snapshot_group(r()).await.expect("delete group");
    assert_eq!(
        c.get_snapshot_group(r()).await.err().map(|s| s.code()),
        Some(tonic::Code::NotFound)
    );
    c.delete_snapshot_group(r()).await.expect("deleting a gone group is not an error");
    assert!(c
        .list_snapshots(agent::ListRequest::default())
        .await
        .expect("list")
        .into_inner()
        .snapshots
        .is_empty());
    server.abort();
}
