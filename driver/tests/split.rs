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
    let log = std::fs::File::create(dir.join(log)).expect("log");
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
