//! The cluster shape with the built binary: `qsd-csi node` (Identity + Node for the kubelet, the
//! agent over mutual TLS) and `qsd-csi controller` (Identity + Controller, calling the agent),
//! each on its own socket, driven as the sidecars and the kubelet would.

#[path = "../../node-plugin/tests/common/certs.rs"]
mod certs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use qsd_csi_proto::csi;
use qsd_csi_proto::csi::controller_client::ControllerClient;
use qsd_csi_proto::csi::identity_client::IdentityClient;
use qsd_csi_proto::csi::node_client::NodeClient;
use tonic::Code;

const MIB: i64 = 1 << 20;

struct Children(Vec<Child>, PathBuf);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(pid) = std::fs::read_to_string(self.1.join("state/run/qsd.pid")) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
    }
}

fn spawn(dir: &Path, log: &str, socket: &Path, args: &[&str]) -> Child {
    // Appended to: a process started again adds to its log.
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(log));
    let log = log.expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_qsd-csi"))
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .stderr(log)
        .spawn()
        .expect("qsd-csi runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", socket.display());
        std::thread::sleep(Duration::from_millis(20)); // poll interval for the socket
    }
    child
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_controller_binaries_serve_a_volume_through_the_agent_over_mutual_tls() {
    let tmp = tempfile::Builder::new().prefix("qsd-split-").tempdir_in("/tmp").expect("dir");
    let dir = tmp.path();
    let ca = certs::Ca::new(dir, "cluster-ca");
    let node_tls = ca.leaf(dir, "n1", &ca);
    let ctl_tls = ca.leaf(dir, certs::CONTROLLER, &ca);
    let rogue = certs::Ca::new(dir, "rogue-ca").leaf(dir, "impostor", &ca);
    let agent = format!("127.0.0.1:{}", free_port());
    let (node_sock, ctl_sock, bad_sock) =
        (dir.join("node.sock"), dir.join("ctl.sock"), dir.join("bad.sock"));
    let tls_args = |t: &qsd_node::tls::TlsFiles| {
        ["--tls-cert", s(&t.cert), "--tls-key", s(&t.key), "--tls-ca", s(&t.ca)].map(String::from)
    };
    let state = dir.join("state");
    let mut node_args = vec!["node", "--state-dir", s(&state), "--node", "n1"];
    node_args.extend(["--device", "fuse", "--agent-listen", &agent]);
    let node_tls_args = tls_args(&node_tls);
    node_args.extend(node_tls_args.iter().map(String::as_str));
    let node = spawn(dir, "node.log", &node_sock, &node_args);
    let agent_flag = format!("n1={agent}");
    let ctl_tls_args = tls_args(&ctl_tls);
    let mut ctl_args = vec!["controller", "--agent", &agent_flag];
    ctl_args.extend(ctl_tls_args.iter().map(String::as_str));
    let controller = spawn(dir, "controller.log", &ctl_sock, &ctl_args);
    let bad_tls_args = tls_args(&rogue);
    let mut bad_args = vec!["controller", "--agent", &agent_flag];
    bad_args.extend(bad_tls_args.iter().map(String::as_str));
    let impostor = spawn(dir, "impostor.log", &bad_sock, &bad_args);
    let _children = Children(vec![controller, impostor, node], dir.to_owned());

    let connect = |p: PathBuf| async move { qsd_csi::calls::connect(&p).await.expect("connect") };
    let (node_ch, ctl_ch) = (connect(node_sock).await, connect(ctl_sock).await);
    let caps = |ch: tonic::transport::Channel| async move {
        let mut identity = IdentityClient::new(ch);
        let r = identity.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await;
        let caps = r.expect("capabilities").into_inner().capabilities;
        format!("{caps:?}").contains("ControllerService")
    };
    assert!(caps(ctl_ch.clone()).await, "the controller advertises CONTROLLER_SERVICE");
    assert!(!caps(node_ch.clone()).await, "a node plugin does not");

    let mut ctl = ControllerClient::new(ctl_ch);
    let mut nodes = NodeClient::new(node_ch);
    let cap = csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    };
    let create = csi::CreateVolumeRequest {
        name: "pvc-1".into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 32 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![cap.clone()],
        ..Default::default()
    };
    let mut impostor = ControllerClient::new(connect(bad_sock).await);
    let refused = impostor.create_volume(create.clone()).await;
    assert_eq!(refused.expect_err("refused").code(), Code::Unavailable);
    let volume = ctl.create_volume(create).await.expect("create").into_inner().volume;
    let volume = volume.expect("volume");
    assert!(volume.volume_id.contains("@n1:"), "{}", volume.volume_id);

    // The kubelet's side, on the node's socket.
    let (staging, target) = (dir.join("staging"), dir.join("target"));
    nodes
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: s(&staging).into(),
            volume_capability: Some(cap.clone()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await
        .expect("stage");
    nodes
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: s(&staging).into(),
            target_path: s(&target).into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("publish");
    std::fs::write(target.join("hello"), b"through the agent").expect("write a file");
    assert_eq!(std::fs::read(target.join("hello")).expect("read"), b"through the agent");
    nodes
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            target_path: s(&target).into(),
        })
        .await
        .expect("unpublish");
    nodes
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: s(&staging).into(),
        })
        .await
        .expect("unstage");
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: volume.volume_id.clone(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let layers = std::fs::read_dir(dir.join("state/pools/default/layers")).map_or(0, |d| d.count());
    assert_eq!(layers, 0, "no layer left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_plugin_reports_its_health_as_kubernetes_grpc_probes_ask_it() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let tmp = tempfile::Builder::new().prefix("qsd-health-").tempdir_in("/tmp").expect("dir");
    let dir = tmp.path();
    let ca = certs::Ca::new(dir, "cluster-ca");
    let node_tls = ca.leaf(dir, "n1", &ca);
    let (agent, health) =
        (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let (node_sock, state) = (dir.join("node.sock"), dir.join("state"));
    let mut args = vec!["node", "--state-dir", s(&state), "--node", "n1", "--device", "fuse"];
    args.extend(["--agent-listen", &agent, "--health-listen", &health]);
    let tls = [s(&node_tls.cert), s(&node_tls.key), s(&node_tls.ca)];
    args.extend(["--tls-cert", tls[0], "--tls-key", tls[1], "--tls-ca", tls[2]]);
    let node = spawn(dir, "node.log", &node_sock, &args);
    let _children = Children(vec![node], dir.to_owned());

    // gRPC health, as a Kubernetes probe asks it: SERVING, NOT_SERVING while the daemon does
    // not answer, SERVING again once it does.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{health}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut probe = HealthClient::new(channel);
    let mut watch =
        probe.watch(HealthCheckRequest { service: "".into() }).await.expect("watch").into_inner();
    async fn next(watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> i32 {
        let status = tokio::time::timeout(Duration::from_secs(30), watch.next()).await;
        status.expect("a status in time").expect("stream open").expect("status").status
    }
    let serving = ServingStatus::Serving as i32;
    let mut status = next(&mut watch).await;
    while status != serving {
        status = next(&mut watch).await;
    }
    let checked = probe.check(HealthCheckRequest { service: "".into() }).await.expect("check");
    assert_eq!(checked.into_inner().status, serving);
    let pid = std::fs::read_to_string(state.join("run/qsd.pid")).expect("pid");
    let signal = |sig: &str| Command::new("kill").args([sig, pid.trim()]).status().expect("kill");
    signal("-STOP");
    assert_eq!(
        next(&mut watch).await,
        ServingStatus::NotServing as i32,
        "a stopped daemon is not healthy"
    );
    signal("-CONT");
    assert_eq!(next(&mut watch).await, serving, "healthy again once the daemon answers");
}

/// Two node plugins and a controller over them, each its own `qsd-csi` process, as on two
/// hosts (their agents and copy servers on 127.0.0.1).
struct TwoNodes {
    dir: PathBuf,
    ca: certs::Ca,
    agents: [String; 2],
    children: Vec<Option<Child>>,
}

impl TwoNodes {
    fn start(dir: &Path) -> TwoNodes {
        let ca = certs::Ca::new(dir, "cluster-ca");
        let agents = [0, 1].map(|_| format!("127.0.0.1:{}", free_port()));
        let mut nodes =
            TwoNodes { dir: dir.to_owned(), ca, agents, children: vec![None, None, None] };
        nodes.start_node(0);
        nodes.start_node(1);
        let ctl = nodes.ca.leaf(dir, certs::CONTROLLER, &nodes.ca);
        let flags = [0, 1].map(|i| format!("n{}={}", i + 1, nodes.agents[i]));
        let mut args = vec!["controller", "--agent", &flags[0], "--agent", &flags[1]];
        args.extend(["--tls-cert", s(&ctl.cert), "--tls-key", s(&ctl.key), "--tls-ca", s(&ctl.ca)]);
        nodes.children[2] = Some(spawn(dir, "controller.log", &dir.join("ctl.sock"), &args));
        nodes
    }

    fn state(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{}", i + 1))
    }

    fn socket(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{}.sock", i + 1))
    }

    /// Starts (or starts again) node `i`'s plugin.
    fn start_node(&mut self, i: usize) {
        let name = format!("n{}", i + 1);
        let tls = self.ca.leaf(&self.dir, &name, &self.ca);
        let state = self.state(i);
        let _ = std::fs::remove_file(self.socket(i));
        let mut args = vec!["node", "--state-dir", s(&state), "--node", &name, "--device", "fuse"];
        args.extend(["--agent-listen", &self.agents[i]]);
        args.extend(["--tls-cert", s(&tls.cert), "--tls-key", s(&tls.key), "--tls-ca", s(&tls.ca)]);
        let log = format!("{name}.log");
        self.children[i] = Some(spawn(&self.dir, &log, &self.socket(i), &args));
    }

    /// SIGKILLs node `i`'s plugin (its daemon and mounts stay, as a crashed pod's do).
    fn kill_node(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill().expect("kill");
            child.wait().expect("reaped");
        }
    }

    /// Node `i`'s log, without its colours.
    fn log(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("n{}.log", i + 1)));
        let mut plain = String::new();
        let mut chars = text.unwrap_or_default().chars().collect::<Vec<_>>().into_iter();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| *c == 'm');
            } else {
                plain.push(c);
            }
        }
        plain
    }

    /// Waits until node `i`'s log has `line`.
    fn wait_log(&self, i: usize, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log(i).contains(line) {
            assert!(
                Instant::now() < deadline,
                "n{} never logged {line:?}:\n{}",
                i + 1,
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(20)); // poll interval for the log
        }
    }

    /// `qsd-csi` with `args` against the controller: its stdout, or its stderr as the error.
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(env!("CARGO_BIN_EXE_qsd-csi"))
            .arg("--endpoint")
            .arg(format!("unix://{}", self.dir.join("ctl.sock").display()))
            .args(args)
            .output()
            .expect("qsd-csi runs");
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
        if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            Err(text(&out.stderr))
        }
    }

    /// Copy directories and servers left on either node.
    fn copies_left(&self) -> Vec<String> {
        (0..2)
            .filter_map(|i| std::fs::read_dir(self.state(i).join("run/copies")).ok())
            .flat_map(|d| d.flatten().map(|e| e.path().display().to_string()))
            .collect()
    }

    /// Layer files in node `i`'s default pool.
    fn layers(&self, i: usize) -> usize {
        std::fs::read_dir(self.state(i).join("pools/default/layers")).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "qcow2"))
            })
            .count()
        })
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for i in 0..2 {
            if let Ok(pid) = std::fs::read_to_string(self.state(i).join("run/qsd.pid")) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
    }
}

fn mount_capability() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Stages and publishes `volume` through node socket `socket` at `dir/<tag>`; the mount.
async fn publish(socket: &Path, dir: &Path, volume: &str, tag: &str) -> PathBuf {
    let mut node = NodeClient::new(qsd_csi::calls::connect(socket).await.expect("connect"));
    let (staging, target) = (dir.join(format!("{tag}-staging")), dir.join(format!("{tag}-target")));
    let stage = csi::NodeStageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: s(&staging).into(),
        volume_capability: Some(mount_capability()),
        ..Default::default()
    };
    node.node_stage_volume(stage).await.expect("stage");
    let publish = csi::NodePublishVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: s(&staging).into(),
        target_path: s(&target).into(),
        volume_capability: Some(mount_capability()),
        ..Default::default()
    };
    node.node_publish_volume(publish).await.expect("publish");
    target
}

/// Undoes [`publish`].
async fn unpublish(socket: &Path, dir: &Path, volume: &str, tag: &str) {
    let mut node = NodeClient::new(qsd_csi::calls::connect(socket).await.expect("connect"));
    let (staging, target) = (dir.join(format!("{tag}-staging")), dir.join(format!("{tag}-target")));
    let r = csi::NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: s(&target).into(),
    };
    node.node_unpublish_volume(r).await.expect("unpublish");
    let r = csi::NodeUnstageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: s(&staging).into(),
    };
    node.node_unstage_volume(r).await.expect("unstage");
}

/// 24 MiB of bytes that differ by `seed`.
fn content(seed: u8) -> Vec<u8> {
    (0..24usize << 20).map(|i| (i / 4096) as u8 ^ seed).collect()
}

/// Reads `file` in `volume` on node `i` (staged and unstaged around the read).
async fn read_on(nodes: &TwoNodes, i: usize, volume: &str, file: &str) -> Vec<u8> {
    let tag = format!("read-{}", volume.replace([':', '@'], "-"));
    let target = publish(&nodes.socket(i), &nodes.dir, volume, &tag).await;
    let bytes = std::fs::read(target.join(file)).unwrap_or_default();
    unpublish(&nodes.socket(i), &nodes.dir, volume, &tag).await;
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_copy_and_move_between_two_node_processes_survive_either_being_killed_mid_copy() {
    let tmp = tempfile::Builder::new().prefix("qsd-two-").tempdir_in("/tmp").expect("dir");
    let mut nodes = TwoNodes::start(tmp.path());
    let dir = nodes.dir.clone();
    let data =
        nodes.cli(&["volume", "create", "data", "--size", "64M", "-o", "name"]).expect("create");
    assert!(data.contains("@n1:"), "{data}");
    let target = publish(&nodes.socket(0), &dir, &data, "w").await;
    std::fs::write(target.join("f"), content(1)).expect("write");
    unpublish(&nodes.socket(0), &dir, &data, "w").await;

    // From a shell: a copy onto n2 holds the data; nothing of the copy stays behind.
    let copy =
        nodes.cli(&["volume", "copy", &data, "--to", "n2", "--name", "data-copy", "-o", "name"]);
    let copy = copy.expect("volume copy");
    assert_eq!(copy, "vol:default@n2:data-copy");
    assert!(read_on(&nodes, 1, &copy, "f").await == content(1), "the copy reads back");
    assert!(nodes.copies_left().is_empty(), "{:?}", nodes.copies_left());

    // The target killed mid-copy (the copy held to 4 MiB/s): the CO hears an error, the
    // restarted plugin removes the half-copied image and the export ends; a retry copies.
    let ctl_socket = dir.join("ctl.sock");
    let slow_copy = |name: &str| {
        let request = csi::CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![mount_capability()],
            parameters: [("cloneBandwidth".to_owned(), "4Mi".to_owned())].into(),
            volume_content_source: Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource { volume_id: data.clone() },
                )),
            }),
            accessibility_requirements: Some(csi::TopologyRequirement {
                requisite: Vec::new(),
                preferred: vec![csi::Topology {
                    segments: [(qsd_csi_model::params::TOPOLOGY_KEY.to_owned(), "n2".to_owned())]
                        .into(),
                }],
            }),
            ..Default::default()
        };
        let socket = ctl_socket.clone();
        tokio::spawn(async move {
            let mut ctl =
                ControllerClient::new(qsd_csi::calls::connect(&socket).await.expect("connect"));
            ctl.create_volume(request)
                .await
                .map(|r| r.into_inner().volume.expect("volume").volume_id)
        })
    };
    let layers_before = nodes.layers(1);
    let call = slow_copy("slow");
    nodes.wait_log(1, "copy from another node started volume=slow ");
    nodes.kill_node(1);
    let refused = call.await.expect("call").expect_err("the copy's target died");
    assert!(
        matches!(refused.code(), Code::Unavailable | Code::Internal | Code::Aborted),
        "{refused:?}"
    );
    nodes.start_node(1);
    nodes.wait_log(1, "recovering an operation interrupted by a restart");
    assert_eq!(nodes.layers(1), layers_before, "the half-copied image is gone");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes.copies_left().is_empty() {
        assert!(Instant::now() < deadline, "left: {:?}", nodes.copies_left());
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
    let listed = nodes.cli(&["volume", "list", "-o", "name"]).expect("list");
    assert!(!listed.contains(":slow"), "a half copy is listed: {listed}");
    let slow = slow_copy("slow").await.expect("call").expect("the retry copies");
    assert!(read_on(&nodes, 1, &slow, "f").await == content(1));

    // The source killed mid-copy: its copy server dies with it, the target undoes its half
    // copy; the restarted source removes the snapshot it took for the copy.
    let call = slow_copy("slow-2");
    nodes.wait_log(1, "copy from another node started volume=slow-2 ");
    nodes.kill_node(0);
    let refused = call.await.expect("call").expect_err("the copy's source died");
    assert!(
        matches!(refused.code(), Code::Unavailable | Code::Internal | Code::Aborted),
        "{refused:?}"
    );
    nodes.start_node(0);
    let listed = nodes.cli(&["snapshot", "list", "-o", "name"]).expect("list");
    assert!(listed.is_empty(), "the copy's snapshot stayed: {listed}");
    let listed = nodes.cli(&["volume", "list", "-o", "name"]).expect("list");
    assert!(!listed.contains(":slow-2"), "a half copy is listed: {listed}");
    assert!(nodes.copies_left().is_empty(), "{:?}", nodes.copies_left());

    // Move: refused while published; once not, the volume is on n2 with its data, and gone
    // from n1.
    let target = publish(&nodes.socket(0), &dir, &data, "m").await;
    let refused = nodes.cli(&["volume", "move", &data, "--to", "n2"]).expect_err("published");
    assert!(refused.contains("published"), "{refused}");
    std::fs::write(target.join("g"), b"after the copies").expect("write");
    unpublish(&nodes.socket(0), &dir, &data, "m").await;
    let moved = nodes.cli(&["volume", "move", &data, "--to", "n2", "-o", "name"]).expect("move");
    assert_eq!(moved, "vol:default@n2:data");
    assert_eq!(read_on(&nodes, 1, &moved, "g").await, b"after the copies");
    let listed = nodes.cli(&["volume", "list", "-o", "name"]).expect("list");
    assert!(!listed.contains(&data), "the original stayed: {listed}");
}
