//! The Controller service's handlers as a table, against fake node agents (in memory: no
//! daemon, no network): what each request becomes, and which gRPC code the CO hears for each
//! answer an agent can give. The real agents are exercised end to end by the driver's tests;
//! here each decision is pinned down on its own, so changing one fails a named row.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use qsd_csi_controller::agents::{Agents, NodeAgent};
use qsd_csi_controller::controller::ControllerService;
use qsd_csi_proto::agent::{
    self, agent_server::Agent, ChangesStream, CopyExportStream, EventStream, HeldStream,
};
use qsd_csi_proto::csi::{self, controller_server::Controller};
use tonic::{Code, Request, Response, Status};

/// One node's agent: the volumes it lists, and an answer forced for a method by name.
#[derive(Default)]
struct FakeAgent {
    node: String,
    volumes: Mutex<Vec<agent::Volume>>,
    fail: Mutex<HashMap<&'static str, Code>>,
    calls: Mutex<Vec<String>>,
}

impl FakeAgent {
    fn on(node: &str) -> Arc<FakeAgent> {
        Arc::new(FakeAgent { node: node.to_owned(), ..Default::default() })
    }

    fn failing(self: Arc<Self>, method: &'static str, code: Code) -> Arc<Self> {
        self.fail.lock().expect("fake").insert(method, code);
        self
    }

    fn holding(self: Arc<Self>, volume_id: &str, export: agent::ExportKind) -> Arc<Self> {
        self.volumes.lock().expect("fake").push(agent::Volume {
            volume_id: volume_id.to_owned(),
            size_bytes: 1 << 30,
            export: export as i32,
            ..Default::default()
        });
        self
    }

    /// Records the call; the forced answer, if any.
    fn call(&self, method: &'static str) -> Result<(), Status> {
        self.calls.lock().expect("fake").push(method.to_owned());
        match self.fail.lock().expect("fake").get(method) {
            Some(code) => Err(Status::new(*code, format!("{method} forced to fail"))),
            None => Ok(()),
        }
    }

    fn called(&self, method: &str) -> bool {
        self.calls.lock().expect("fake").iter().any(|c| c == method)
    }
}

type Answer<T> = Result<Response<T>, Status>;

/// The fakes page by two, so that every list the controller makes walks several pages.
fn paged<T>(all: Vec<T>, id: impl Fn(&T) -> &str, r: &agent::ListRequest) -> (Vec<T>, String) {
    let request = agent::ListRequest { max_entries: 2, starting_token: r.starting_token.clone() };
    qsd_csi_proto::paging::page(all, id, &request)
}

#[tonic::async_trait]
impl Agent for FakeAgent {
    type WatchEventsStream = EventStream;
    type SnapshotChangesStream = ChangesStream;
    type ExportForCopyStream = CopyExportStream;
    type HoldWritesStream = HeldStream;

    async fn hold_writes(&self, _: Request<agent::HoldWritesRequest>) -> Answer<HeldStream> {
        self.call("hold_writes")?;
        let held: HeldStream = Box::pin(tokio_stream::iter([Ok(agent::Held {})]));
        Ok(Response::new(held))
    }

    async fn create_volume(&self, r: Request<agent::CreateVolumeRequest>) -> Answer<agent::Volume> {
        self.call("create_volume")?;
        let r = r.into_inner();
        if let Some(remote) = &r.remote {
            // A copy from another node: the export that node's agent made (host = its name).
            self.calls.lock().expect("fake").push(format!("copy_from:{}", remote.host));
        }
        Ok(Response::new(agent::Volume {
            volume_id: format!("vol:{}@{}:{}", r.pool, self.node, r.name),
            size_bytes: r.size_bytes.unwrap_or(1 << 30) as u64,
            ..Default::default()
        }))
    }
    async fn delete_volume(&self, r: Request<agent::VolumeRef>) -> Answer<agent::Empty> {
        self.call("delete_volume")?;
        let id = r.into_inner().volume_id;
        self.volumes.lock().expect("fake").retain(|v| v.volume_id != id);
        Ok(Response::new(agent::Empty {}))
    }
    async fn get_volume(&self, r: Request<agent::VolumeRef>) -> Answer<agent::Volume> {
        self.call("get_volume")?;
        let id = r.into_inner().volume_id;
        let volumes = self.volumes.lock().expect("fake");
        let found = volumes.iter().find(|v| v.volume_id == id).cloned();
        found.map(Response::new).ok_or_else(|| Status::not_found(id))
    }
    async fn locate_volume(&self, _: Request<agent::VolumeRef>) -> Answer<agent::VolumeLocation> {
        self.call("locate_volume")?;
        Ok(Response::new(agent::VolumeLocation::default()))
    }
    async fn locate_snapshot(
        &self,
        _: Request<agent::SnapshotRef>,
    ) -> Answer<agent::VolumeLocation> {
        self.call("locate_snapshot")?;
        Ok(Response::new(agent::VolumeLocation::default()))
    }
    async fn list_volumes(&self, r: Request<agent::ListRequest>) -> Answer<agent::VolumeList> {
        self.call("list_volumes")?;
        let all = self.volumes.lock().expect("fake").clone();
        let (volumes, next_token) = paged(all, |v| &v.volume_id, r.get_ref());
        Ok(Response::new(agent::VolumeList { volumes, next_token }))
    }
    async fn expand_volume(&self, r: Request<agent::ExpandVolumeRequest>) -> Answer<agent::Volume> {
        self.call("expand_volume")?;
        let r = r.into_inner();
        Ok(Response::new(agent::Volume {
            volume_id: r.volume_id,
            size_bytes: r.size_bytes as u64,
            ..Default::default()
        }))
    }
    async fn modify_volume(&self, _: Request<agent::ModifyVolumeRequest>) -> Answer<agent::Empty> {
        self.call("modify_volume").map(|_| Response::new(agent::Empty {}))
    }
    async fn create_snapshots(
        &self,
        _: Request<agent::CreateSnapshotsRequest>,
    ) -> Answer<agent::SnapshotList> {
        self.call("create_snapshots")?;
        Ok(Response::new(agent::SnapshotList::default()))
    }
    async fn delete_snapshot(&self, _: Request<agent::SnapshotRef>) -> Answer<agent::Empty> {
        self.call("delete_snapshot").map(|_| Response::new(agent::Empty {}))
    }
    async fn list_snapshots(&self, _: Request<agent::ListRequest>) -> Answer<agent::SnapshotList> {
        self.call("list_snapshots")?;
        Ok(Response::new(agent::SnapshotList::default()))
    }
    async fn get_snapshot_group(
        &self,
        _: Request<agent::SnapshotGroupRef>,
    ) -> Answer<agent::SnapshotList> {
        self.call("get_snapshot_group")?;
        Ok(Response::new(agent::SnapshotList::default()))
    }
    async fn delete_snapshot_group(
        &self,
        _: Request<agent::SnapshotGroupRef>,
    ) -> Answer<agent::Empty> {
        self.call("delete_snapshot_group").map(|_| Response::new(agent::Empty {}))
    }
    async fn snapshot_changes(
        &self,
        _: Request<agent::ChangesRequest>,
    ) -> Answer<Self::SnapshotChangesStream> {
        self.call("snapshot_changes")?;
        Ok(Response::new(Box::pin(tokio_stream::empty())))
    }
    async fn get_volume_health(&self, r: Request<agent::VolumeRef>) -> Answer<agent::VolumeHealth> {
        self.call("get_volume_health")?;
        let volume_id = r.into_inner().volume_id;
        Ok(Response::new(agent::VolumeHealth { volume_id, findings: Vec::new() }))
    }
    async fn list_volume_health(
        &self,
        _: Request<agent::ListRequest>,
    ) -> Answer<agent::VolumeHealthList> {
        self.call("list_volume_health")?;
        // Only volumes with findings are listed; the fake's have none.
        Ok(Response::new(agent::VolumeHealthList::default()))
    }
    async fn get_capacity(&self, _: Request<agent::PoolRef>) -> Answer<agent::Capacity> {
        self.call("get_capacity")?;
        Ok(Response::new(agent::Capacity { available_bytes: 1 << 40 }))
    }
    async fn export_for_copy(
        &self,
        _: Request<agent::ExportForCopyRequest>,
    ) -> Answer<Self::ExportForCopyStream> {
        self.call("export_for_copy")?;
        let export = agent::CopyExport {
            host: self.node.clone(),
            port: 10809,
            export_name: "copy".into(),
            psk_identity: "id".into(),
            psk_key: vec![7; 32],
            size_bytes: 1 << 30,
            allocated_bytes: 0,
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(export)]))))
    }
    async fn watch_events(&self, _: Request<agent::Empty>) -> Answer<Self::WatchEventsStream> {
        self.call("watch_events")?;
        Ok(Response::new(Box::pin(tokio_stream::empty())))
    }
}

/// A controller over `agents` (the first is the default node), placing in pool `default`.
fn controller(agents: &[&Arc<FakeAgent>]) -> ControllerService {
    let nodes: BTreeMap<String, NodeAgent> =
        agents.iter().map(|a| (a.node.clone(), NodeAgent::Local((*a).clone() as _))).collect();
    let default = agents.first().map(|a| a.node.clone());
    ControllerService::new(Agents::new(nodes, default), "default".into())
}

fn code<T>(answer: Answer<T>) -> Code {
    answer.err().map(|s| s.code()).unwrap_or(Code::Ok)
}

fn mount_capability() -> csi::VolumeCapability {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

fn create_request(name: &str, requisite_node: Option<&str>) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 }),
        volume_capabilities: vec![mount_capability()],
        accessibility_requirements: requisite_node.map(|n| csi::TopologyRequirement {
            requisite: vec![csi::Topology {
                segments: [(qsd_csi_model::params::TOPOLOGY_KEY.to_owned(), n.to_owned())].into(),
            }],
            preferred: Vec::new(),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn delete_volume_answers_by_what_the_agent_says() {
    // (row, agent's answer to delete_volume, volume ID, code the CO hears)
    let rows: &[(&str, Option<Code>, &str, Code)] = &[
        ("deleted", None, "vol:default@n1:a", Code::Ok),
        (
            "already gone: the CO's retry succeeds",
            Some(Code::NotFound),
            "vol:default@n1:a",
            Code::Ok,
        ),
        ("an ID that cannot be ours is gone", None, "not-an-id", Code::Ok),
        ("a node no agent serves holds nothing", None, "vol:default@elsewhere:a", Code::Ok),
        ("busy with another call", Some(Code::Aborted), "vol:default@n1:a", Code::Aborted),
        (
            "a layer still needed",
            Some(Code::FailedPrecondition),
            "vol:default@n1:a",
            Code::FailedPrecondition,
        ),
        (
            "the node's agent unreachable",
            Some(Code::Unavailable),
            "vol:default@n1:a",
            Code::Unavailable,
        ),
        ("no ID", None, "", Code::InvalidArgument),
    ];
    for (row, answer, id, expected) in rows {
        let mut agent = FakeAgent::on("n1");
        if let Some(c) = answer {
            agent = agent.failing("delete_volume", *c);
        }
        let c = controller(&[&agent]);
        let req = csi::DeleteVolumeRequest { volume_id: (*id).into(), ..Default::default() };
        assert_eq!(code(c.delete_volume(Request::new(req)).await), *expected, "{row}");
    }
}

#[tokio::test]
async fn create_volume_places_and_maps_the_agents_answers() {
    // (row, agent's answer to create_volume, request, code the CO hears)
    type Row<'a> = (&'a str, Option<Code>, csi::CreateVolumeRequest, Code);
    let rows: Vec<Row> = vec![
        ("created", None, create_request("a", None), Code::Ok),
        ("no name", None, create_request("", None), Code::InvalidArgument),
        (
            "the pool is full",
            Some(Code::ResourceExhausted),
            create_request("a", None),
            Code::ResourceExhausted,
        ),
        (
            "same name, other size",
            Some(Code::AlreadyExists),
            create_request("a", None),
            Code::AlreadyExists,
        ),
        (
            "only on a node the driver has no agent for",
            None,
            create_request("a", Some("n9")),
            Code::ResourceExhausted,
        ),
        ("only on the second node", None, create_request("a", Some("n2")), Code::Ok),
    ];
    for (row, answer, req, expected) in rows {
        let (mut first, second) = (FakeAgent::on("n1"), FakeAgent::on("n2"));
        if let Some(c) = answer {
            first = first.failing("create_volume", c);
        }
        let c = controller(&[&first, &second]);
        let requisite = req.accessibility_requirements.is_some();
        let answer = c.create_volume(Request::new(req)).await;
        if let (Ok(created), true) = (&answer, requisite) {
            let volume = created.get_ref().volume.clone().expect("volume");
            assert!(volume.volume_id.contains("@n2:"), "{row}: placed on {}", volume.volume_id);
            assert!(second.called("create_volume") && !first.called("create_volume"), "{row}");
        }
        assert_eq!(code(answer), expected, "{row}");
    }
}

fn topology(nodes: &[&str]) -> Vec<csi::Topology> {
    let key = qsd_csi_model::params::TOPOLOGY_KEY;
    nodes
        .iter()
        .map(|n| csi::Topology { segments: [(key.to_owned(), (*n).to_owned())].into() })
        .collect()
}

#[tokio::test]
async fn a_sourced_volume_goes_where_the_scheduler_picked_copied_across_when_that_is_another_node()
{
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    // (row, source, preferred, requisite, exporter's answer, code, node it lands on, exporter)
    type Row<'a> =
        (&'a str, Type, &'a [&'a str], &'a [&'a str], Option<Code>, Code, &'a str, Option<&'a str>);
    let snap = |id: &str| Type::Snapshot(SnapshotSource { snapshot_id: id.into() });
    let vol = |id: &str| Type::Volume(VolumeSource { volume_id: id.into() });
    let rows: Vec<Row> = vec![
        (
            "no topology: on the source's node",
            snap("snap:default@n1:s"),
            &[],
            &[],
            None,
            Code::Ok,
            "n1",
            None,
        ),
        (
            "picked the source's node",
            snap("snap:default@n1:s"),
            &["n1", "n2"],
            &["n1", "n2"],
            None,
            Code::Ok,
            "n1",
            None,
        ),
        (
            "picked another node: copied from the source's",
            snap("snap:default@n1:s"),
            &["n2", "n1"],
            &["n1", "n2"],
            None,
            Code::Ok,
            "n2",
            Some("n1"),
        ),
        (
            "a clone onto another node",
            vol("vol:default@n1:v"),
            &["n2"],
            &["n1", "n2"],
            None,
            Code::Ok,
            "n2",
            Some("n1"),
        ),
        (
            "only another node allowed",
            snap("snap:default@n1:s"),
            &[],
            &["n2"],
            None,
            Code::Ok,
            "n2",
            Some("n1"),
        ),
        (
            "a shared pool's source: where it is served",
            snap("snap:shared:s"),
            &["n2"],
            &[],
            None,
            Code::Ok,
            "n1",
            None,
        ),
        (
            "the source's node cannot export",
            snap("snap:default@n1:s"),
            &["n2"],
            &[],
            Some(Code::Unavailable),
            Code::Unavailable,
            "",
            Some("n1"),
        ),
        (
            "picked a node without an agent: the source's",
            snap("snap:default@n1:s"),
            &["n9"],
            &[],
            None,
            Code::Ok,
            "n1",
            None,
        ),
    ];
    for (row, source, preferred, requisite, export_answer, expected, lands, exporter) in rows {
        let (mut first, second) = (FakeAgent::on("n1"), FakeAgent::on("n2"));
        if let Some(c) = export_answer {
            first = first.failing("export_for_copy", c);
        }
        let c = controller(&[&first, &second]);
        let mut req = create_request("a", None);
        req.volume_content_source = Some(csi::VolumeContentSource { r#type: Some(source) });
        if !preferred.is_empty() || !requisite.is_empty() {
            req.accessibility_requirements = Some(csi::TopologyRequirement {
                requisite: topology(requisite),
                preferred: topology(preferred),
            });
        }
        let answer = c.create_volume(Request::new(req)).await;
        let got = answer.as_ref().err().map_or(Code::Ok, |s| s.code());
        assert_eq!(got, expected, "{row}");
        assert_eq!(first.called("export_for_copy"), exporter == Some("n1"), "{row}: export");
        if let Ok(created) = answer {
            let id = created.into_inner().volume.expect("volume").volume_id;
            assert!(id.contains(&format!("@{lands}:")), "{row}: placed as {id}");
            let target = if lands == "n1" { &first } else { &second };
            let copied = exporter.map(|e| format!("copy_from:{e}"));
            assert_eq!(
                copied.is_some_and(|c| target.called(&c)),
                exporter.is_some(),
                "{row}: copy"
            );
        }
    }
}

#[tokio::test]
async fn list_volumes_pages_and_names_the_node_each_volume_is_published_on() {
    use agent::ExportKind::{ExportNbd, ExportNone};
    // A shared pool's volume is listed by every node that mounts the pool; only the node it
    // is attached on reports an export, and that node is where it is published.
    let first = FakeAgent::on("n1")
        .holding("vol:default@n1:local", ExportNbd)
        .holding("vol:shared:attached-on-n2", ExportNone)
        .holding("vol:shared:detached", ExportNone);
    let second = FakeAgent::on("n2")
        .holding("vol:shared:attached-on-n2", ExportNbd)
        .holding("vol:shared:detached", ExportNone);
    let c = controller(&[&first, &second]);
    let listed = c
        .list_volumes(Request::new(csi::ListVolumesRequest::default()))
        .await
        .expect("list")
        .into_inner();
    let published: BTreeMap<String, Vec<String>> = listed
        .entries
        .iter()
        .map(|e| {
            let id = e.volume.as_ref().expect("volume").volume_id.clone();
            (id, e.status.as_ref().expect("status").published_node_ids.clone())
        })
        .collect();
    let expected: BTreeMap<String, Vec<String>> = [
        ("vol:default@n1:local", vec!["n1"]),
        ("vol:shared:attached-on-n2", vec!["n2"]),
        ("vol:shared:detached", vec![]),
    ]
    .into_iter()
    .map(|(id, nodes)| (id.to_owned(), nodes.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(published, expected, "each volume once, published where it is attached");

    // (row, max_entries, starting_token, code, entries)
    let rows: &[(&str, i32, &str, Code, usize)] = &[
        ("a first page", 2, "", Code::Ok, 2),
        ("the rest", 2, "2", Code::Ok, 1),
        ("a token never handed out", 0, "garbage", Code::Aborted, 0),
        ("a negative page size", -1, "", Code::InvalidArgument, 0),
    ];
    for (row, max, token, expected, entries) in rows {
        let req = csi::ListVolumesRequest { max_entries: *max, starting_token: (*token).into() };
        let answer = c.list_volumes(Request::new(req)).await;
        let got = answer.as_ref().map(|r| r.get_ref().entries.len()).unwrap_or(0);
        assert_eq!((code(answer), got), (*expected, *entries), "{row}");
    }
}

#[tokio::test]
async fn expand_and_validate_map_the_agents_answers() {
    // (row, agent method forced, its answer, code the CO hears from ControllerExpandVolume)
    let rows: &[(&str, Option<Code>, i64, Code)] = &[
        ("grown", None, 2 << 30, Code::Ok),
        ("no such volume", Some(Code::NotFound), 2 << 30, Code::NotFound),
        ("cannot shrink", Some(Code::OutOfRange), 2 << 30, Code::OutOfRange),
        ("no capacity asked", None, 0, Code::InvalidArgument),
    ];
    for (row, answer, size, expected) in rows {
        let mut agent = FakeAgent::on("n1");
        if let Some(c) = answer {
            agent = agent.failing("expand_volume", *c);
        }
        let c = controller(&[&agent]);
        let req = csi::ControllerExpandVolumeRequest {
            volume_id: "vol:default@n1:a".into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: *size, limit_bytes: 0 }),
            ..Default::default()
        };
        assert_eq!(code(c.controller_expand_volume(Request::new(req)).await), *expected, "{row}");
    }
    let agent = FakeAgent::on("n1").holding("vol:default@n1:a", agent::ExportKind::ExportNone);
    let c = controller(&[&agent]);
    let validate = |id: &str| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![mount_capability()],
        ..Default::default()
    };
    let confirmed =
        c.validate_volume_capabilities(Request::new(validate("vol:default@n1:a"))).await;
    assert!(confirmed.expect("validate").into_inner().confirmed.is_some(), "a mount is confirmed");
    let missing = c.validate_volume_capabilities(Request::new(validate("vol:default@n1:b"))).await;
    assert_eq!(code(missing), Code::NotFound, "validating a volume that does not exist");
}

#[tokio::test]
async fn the_schedulers_node_without_its_agent_now_is_unavailable_not_another_node() {
    // (row, first preferred node, code, node the volume lands on)
    let rows: &[(&str, &str, Code, &str)] = &[
        ("the picked node's plugin is restarting: retry", "n2", Code::Unavailable, ""),
        ("a node the cluster does not have: the next choice", "n9", Code::Ok, "n1"),
        ("the picked node is up", "n1", Code::Ok, "n1"),
    ];
    for (row, picked, expected, lands) in rows {
        let only = FakeAgent::on("n1");
        let nodes: BTreeMap<String, NodeAgent> =
            [("n1".to_owned(), NodeAgent::Local(only.clone() as _))].into();
        let agents = Agents::new(nodes, Some("n1".into()));
        agents.set_cluster_nodes(["n1".to_owned(), "n2".to_owned()].into());
        let c = ControllerService::new(agents, "default".into());
        let mut req = create_request("a", None);
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: topology(&["n1", "n2"]),
            preferred: topology(&[picked, "n1"]),
        });
        let answer = c.create_volume(Request::new(req)).await;
        assert_eq!(answer.as_ref().err().map_or(Code::Ok, |s| s.code()), *expected, "{row}");
        if let Ok(created) = answer {
            let id = created.into_inner().volume.expect("volume").volume_id;
            assert!(id.contains(&format!("@{lands}:")), "{row}: {id}");
        }
    }
}

/// A mock API server answering list requests for PersistentVolumes (one PV of `volume`, its
/// node affinity naming `pv_node`), Nodes (w1 and w2, Ready) and Pods (none pending).
fn follow_api(volume: &str, pv_node: &str) -> kube::Client {
    use kube::client::Body;
    let (service, handle) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
    let pv = serde_json::json!({
        "metadata": { "name": "pvc-1" },
        "spec": {
            "csi": { "driver": qsd_csi_controller::PLUGIN_NAME, "volumeHandle": volume },
            "storageClassName": "follow",
            "nodeAffinity": { "required": { "nodeSelectorTerms": [ { "matchExpressions": [
                { "key": qsd_csi_model::params::TOPOLOGY_KEY, "operator": "In", "values": [pv_node] }
            ] } ] } },
        },
    });
    let ready = |name: &str| {
        serde_json::json!({ "metadata": { "name": name },
            "status": { "conditions": [ { "type": "Ready", "status": "True" } ] } })
    };
    tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        while let Some((request, respond)) = handle.next_request().await {
            let (kind, items) = match request.uri().path() {
                "/api/v1/persistentvolumes" => ("PersistentVolumeList", vec![pv.clone()]),
                "/api/v1/nodes" => ("NodeList", vec![ready("w1"), ready("w2")]),
                "/api/v1/pods" => ("PodList", vec![]),
                other => panic!("the follower asked for {other}"),
            };
            let list = serde_json::json!({ "apiVersion": "v1", "kind": kind, "metadata": {}, "items": items });
            let body = Body::from(serde_json::to_vec(&list).expect("json"));
            respond.send_response(http::Response::builder().body(body).expect("response"));
        }
    });
    kube::Client::new(service, "default")
}

#[tokio::test]
async fn a_moved_volumes_two_copies_are_settled_by_what_its_pv_names_and_where_it_is_used() {
    use agent::ExportKind::{ExportFuse, ExportNone};
    use qsd_csi_controller::follow::Follower;
    let id = "vol:default@w1:pvc-1";
    // (the PV's node, the new copy's export on w2) → which copy goes, if any.
    let cases = [
        ("w1", ExportNone, Some("w2")), // a move cut short before the PV changed: the new copy
        ("w1", ExportFuse, None),       // ... but in use: left alone
        ("w2", ExportFuse, Some("w1")), // moved and in use on w2: the old copy
        ("w2", ExportNone, None),       // moved, not in use yet: both stay
    ];
    for (pv_node, export, removed) in cases {
        let w1 = FakeAgent::on("w1").holding(id, ExportNone);
        let w2 = FakeAgent::on("w2").holding(id, export);
        let nodes: BTreeMap<String, NodeAgent> = [&w1, &w2]
            .iter()
            .map(|a| (a.node.clone(), NodeAgent::Local((*a).clone() as _)))
            .collect();
        let agents = Agents::new(nodes, Some("w1".into()));
        let controller = ControllerService::new(agents.clone(), "default".into());
        let events = qsd_csi_controller::events::Events::log_only();
        let follower = Follower::new(follow_api(id, pv_node), agents.clone(), controller, events);
        follower.round().await.expect("a round");
        // Routed to w2 only once w1 no longer holds it: w2's listing alone (a node's files)
        // does not take an ID of w1's away from w1.
        let routed = agents.node_of(qsd_csi_model::id::IdKind::Volume, id).await.expect("node");
        let want = if removed == Some("w1") { "w2" } else { "w1" };
        assert_eq!(routed, want, "PV on {pv_node}, new copy {export:?}");
        let deleted: Vec<&str> = [&w1, &w2]
            .iter()
            .filter(|a| a.called("delete_volume"))
            .map(|a| a.node.as_str())
            .collect();
        assert_eq!(
            deleted,
            removed.into_iter().collect::<Vec<_>>(),
            "PV on {pv_node}, new copy {export:?}"
        );
    }
}

#[tokio::test]
async fn a_moved_id_is_routed_to_the_one_node_listing_it_once_its_home_no_longer_holds_it() {
    use agent::ExportKind::ExportNone;
    use qsd_csi_model::id::IdKind::Volume;
    let id = "vol:default@w1:pvc-1";
    // (w1 holds it, the other nodes listing it) → where the ID is routed.
    let cases: [(bool, &[&str], &str); 4] = [
        (true, &["w2"], "w1"),        // a node's listing does not take a held ID away
        (false, &["w2"], "w2"),       // moved: the old copy is gone
        (false, &["w2", "w3"], "w1"), // two claimants: neither is believed
        (false, &[], "w1"),           // nowhere else: its home answers (NOT_FOUND)
    ];
    for (held, listing, want) in cases {
        let w1 =
            if held { FakeAgent::on("w1").holding(id, ExportNone) } else { FakeAgent::on("w1") };
        let mut all = vec![w1];
        for node in ["w2", "w3"] {
            let agent = FakeAgent::on(node);
            all.push(if listing.contains(&node) { agent.holding(id, ExportNone) } else { agent });
        }
        let nodes: BTreeMap<String, NodeAgent> =
            all.iter().map(|a| (a.node.clone(), NodeAgent::Local(a.clone() as _))).collect();
        let agents = Agents::new(nodes, Some("w1".into()));
        agents.find_moved().await;
        let routed = agents.node_of(Volume, id).await.expect("a node");
        assert_eq!(routed, want, "held at home: {held}, listed by {listing:?}");
    }
}

#[tokio::test]
async fn group_snapshot_delete_and_get_answer_by_what_the_agents_say() {
    use qsd_csi_controller::groups::GroupService;
    use qsd_csi_proto::csi::group_controller_server::GroupController;
    // (row, agent's answer, group ID, code Delete gives, code Get gives)
    let rows: &[(&str, Option<Code>, &str, Code, Code)] = &[
        ("an ID that cannot be ours", None, "fake-vol-id", Code::Ok, Code::NotFound),
        ("a node no agent serves", None, "group:default@elsewhere:g", Code::Ok, Code::NotFound),
        (
            "gone on every node",
            Some(Code::NotFound),
            "group:default@n1:g",
            Code::Ok,
            Code::NotFound,
        ),
        (
            "the agent unreachable",
            Some(Code::Unavailable),
            "group:default@n1:g",
            Code::Unavailable,
            Code::Unavailable,
        ),
        ("no ID", None, "", Code::InvalidArgument, Code::InvalidArgument),
    ];
    for (row, answer, id, deleted, got) in rows {
        let mut agent = FakeAgent::on("n1");
        if let Some(c) = answer {
            agent = agent.failing("delete_snapshot_group", *c).failing("get_snapshot_group", *c);
        }
        let nodes: BTreeMap<String, NodeAgent> =
            [("n1".to_owned(), NodeAgent::Local(agent.clone() as _))].into();
        let groups = GroupService::new(Agents::new(nodes, Some("n1".into())));
        let id = (*id).to_owned();
        let delete = csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: id.clone(),
            ..Default::default()
        };
        let code_of = |e: Option<Status>| e.map(|s| s.code()).unwrap_or(Code::Ok);
        let d = groups.delete_volume_group_snapshot(Request::new(delete)).await;
        assert_eq!(code_of(d.err()), *deleted, "delete: {row}");
        let get =
            csi::GetVolumeGroupSnapshotRequest { group_snapshot_id: id, ..Default::default() };
        let g = groups.get_volume_group_snapshot(Request::new(get)).await;
        assert_eq!(code_of(g.err()), *got, "get: {row}");
    }
}

/// The list's entries: each volume's ID with the reasons of its findings (none: healthy).
async fn health_list(c: &ControllerService) -> Vec<(String, Vec<String>)> {
    let request = Request::new(csi::ControllerListVolumeHealthRequest::default());
    let answer = c.controller_list_volume_health(request).await.expect("listed").into_inner();
    let entries = answer.entries.into_iter();
    entries
        .map(|h| (h.volume_id, h.health_statuses.into_iter().map(|e| e.reason).collect()))
        .collect()
}

#[tokio::test]
async fn a_node_that_does_not_answer_for_health_leaves_the_others_answered_and_its_volumes_inaccessible(
) {
    use agent::ExportKind::ExportNone;
    let a = FakeAgent::on("a").holding("vol:p@a:one", ExportNone);
    let b =
        FakeAgent::on("b").holding("vol:p@b:two", ExportNone).holding("vol:p@b:three", ExportNone);
    let c = controller(&[&a, &b]);
    assert_eq!(health_list(&c).await, vec![], "nothing to report");
    let down = |agent: &FakeAgent| {
        let mut fail = agent.fail.lock().expect("fake");
        fail.insert("list_volumes", Code::Unavailable);
        fail.insert("list_volume_health", Code::Unavailable);
    };
    down(&b);
    let unreachable = |id: &str| {
        (id.to_owned(), vec![qsd_csi_controller::controller::NODE_UNREACHABLE.to_owned()])
    };
    assert_eq!(
        health_list(&c).await,
        vec![unreachable("vol:p@b:three"), unreachable("vol:p@b:two")],
        "node a's volumes answered, node b's named inaccessible"
    );
    let request = Request::new(csi::ControllerListVolumeHealthRequest::default());
    let answer = c.controller_list_volume_health(request).await.expect("listed").into_inner();
    let message = &answer.entries[0].health_statuses[0].message;
    assert!(message.contains("node b") && message.contains("forced to fail"), "{message}");

    // A controller that never heard from b cannot name b's volumes, and still answers a's.
    let fresh = controller(&[&a, &b]);
    assert_eq!(health_list(&fresh).await, vec![]);
    // Once b lists them (ListVolumes does too), they are named while it is down.
    b.fail.lock().expect("fake").clear();
    let listed = fresh.list_volumes(Request::new(csi::ListVolumesRequest::default())).await;
    assert_eq!(listed.expect("listed").into_inner().entries.len(), 3);
    down(&b);
    assert_eq!(health_list(&fresh).await.len(), 2);
    // Back: its own answer again.
    b.fail.lock().expect("fake").clear();
    assert_eq!(health_list(&c).await, vec![]);
}
