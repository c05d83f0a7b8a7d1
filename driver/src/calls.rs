//! The CSI calls behind the client commands (drive a running endpoint from a shell), and the
//! three CSI clients on one unix-socket channel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use qsd_csi_proto::csi;
use tonic::Code;

use qsd_csi_proto::csi::controller_client::ControllerClient;
use qsd_csi_proto::csi::identity_client::IdentityClient;
use qsd_csi_proto::csi::node_client::NodeClient;
use qsd_csi_proto::csi::snapshot_metadata_client::SnapshotMetadataClient;
use tonic::transport::Channel;

pub use qsd_csi_proto::transport::{connect_unix as connect, socket_path};

/// The three CSI clients on one channel.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Identity.
    pub identity: IdentityClient<Channel>,
    /// Controller.
    pub controller: ControllerClient<Channel>,
    /// Node.
    pub node: NodeClient<Channel>,
    /// SnapshotMetadata (changed-block tracking).
    pub metadata: SnapshotMetadataClient<Channel>,
}

impl Clients {
    /// Connects to the endpoint's socket.
    pub async fn connect(socket: &Path) -> Result<Clients, tonic::transport::Error> {
        let channel = connect(socket).await?;
        Ok(Clients {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            metadata: SnapshotMetadataClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }
}

/// Parses `512M`, `10G`, `1T`, `4096` (bytes); binary units.
pub fn parse_size(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 10),
        Some((i, 'M' | 'm')) => (&text[..i], 20),
        Some((i, 'G' | 'g')) => (&text[..i], 30),
        Some((i, 'T' | 't')) => (&text[..i], 40),
        _ => (text, 0),
    };
    let n: i64 =
        digits.parse().map_err(|_| format!("{text:?} is not a size like 512M, 10G or 1T"))?;
    n.checked_mul(1 << shift)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{text:?} is not a positive size"))
}

/// Formats bytes with a binary unit.
pub fn human(bytes: i64) -> String {
    let units = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
    for (unit, shift) in units {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}")
}

/// A failed call, with a hint for the person at the terminal.
pub fn explain(what: &str, status: &tonic::Status, endpoint: &str) -> String {
    let hint = match status.code() {
        Code::NotFound => "check the ID with `qsd-csi volume list` or `qsd-csi snapshot list`",
        Code::AlreadyExists => {
            "that name is taken with other properties: pick another name or match them"
        }
        Code::InvalidArgument => "fix the argument named above",
        Code::OutOfRange => "choose a size within the stated range (volumes only grow)",
        Code::FailedPrecondition => "the object is in use or in the wrong state: see the message",
        Code::Aborted => "another operation on this volume is running: retry when it ends",
        Code::ResourceExhausted => {
            "free space in the pool, or delete snapshots to shorten the chain"
        }
        Code::Unavailable => "is `qsd-csi standalone` running and serving this endpoint?",
        _ => "see the driver's log",
    };
    format!(
        "{what} failed ({:?}): {}\n  hint: {hint} [endpoint {endpoint}]",
        status.code(),
        status.message()
    )
}

fn capability(block: bool, fs_type: &str) -> csi::VolumeCapability {
    use csi::volume_capability::{
        access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
    };
    csi::VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume { fs_type: fs_type.into(), ..Default::default() })
        }),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

/// Options for creating a volume.
#[derive(Debug, Clone, Default)]
pub struct NewVolume {
    /// Name.
    pub name: String,
    /// Size in bytes (`None`: the source's, or the default).
    pub size: Option<i64>,
    /// CreateVolume parameters (pool, preallocation, QoS ...).
    pub parameters: HashMap<String, String>,
    /// Content source.
    pub source: Option<csi::volume_content_source::Type>,
    /// The node it must be on (a local pool's), if any.
    pub node: Option<String>,
}

/// Creates a volume; while a clone copies, a spinner on a terminal shows it working.
pub async fn create_volume(
    clients: &mut Clients,
    new: NewVolume,
) -> Result<csi::Volume, tonic::Status> {
    let req = csi::CreateVolumeRequest {
        name: new.name.clone(),
        capacity_range: new.size.map(|s| csi::CapacityRange { required_bytes: s, limit_bytes: 0 }),
        volume_capabilities: vec![capability(false, "")],
        parameters: new.parameters,
        volume_content_source: new
            .source
            .clone()
            .map(|t| csi::VolumeContentSource { r#type: Some(t) }),
        accessibility_requirements: new.node.as_ref().map(|node| {
            let topology = csi::Topology {
                segments: [(qsd_csi_model::params::TOPOLOGY_KEY.to_owned(), node.clone())].into(),
            };
            csi::TopologyRequirement {
                requisite: vec![topology.clone()],
                preferred: vec![topology],
            }
        }),
        ..Default::default()
    };
    let is_clone = matches!(new.source, Some(csi::volume_content_source::Type::Volume(_)))
        || new.node.is_some();
    let mut controller = clients.controller.clone();
    let call = controller.create_volume(req);
    let response = match is_clone {
        true => with_spinner(format!("cloning into {}: copying", new.name), call).await,
        false => call.await,
    };
    response?.into_inner().volume.ok_or_else(|| tonic::Status::internal("no volume in the reply"))
}

/// Awaits `work` with a spinner on standard error saying `doing` and the time taken, drawn only
/// on a terminal (a pipe or a log gets nothing): for clones and other calls that can take long.
pub async fn with_spinner<T, E>(
    doing: String,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}]") {
        bar.set_style(style);
    }
    bar.set_message(doing.clone());
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    let result = work.await;
    if result.is_ok() && !bar.is_hidden() {
        let took = started.elapsed().as_secs_f64();
        bar.finish_with_message(format!("{doing}: done in {took:.1} s"));
    } else {
        bar.finish_and_clear();
    }
    result
}

/// Where the CLI stages a volume before publishing it to a path.
pub fn staging_path(staging_dir: &Path, volume_id: &str) -> PathBuf {
    staging_dir.join(volume_id.replace([':', '@', '/'], "_"))
}

/// How [`publish`] presents a volume.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// The raw block device instead of a filesystem.
    pub block: bool,
    /// The filesystem to create on first use.
    pub fs_type: String,
    /// Mount read-only.
    pub read_only: bool,
    /// The volume context a CO passes (a PersistentVolume's `volumeAttributes`).
    pub context: HashMap<String, String>,
}

/// Stages a volume and publishes it at `path` (a directory, or a device file with `block`).
pub async fn publish(
    clients: &mut Clients,
    staging_dir: &Path,
    volume_id: &str,
    path: &Path,
    options: &PublishOptions,
) -> Result<(), tonic::Status> {
    let cap = capability(options.block, &options.fs_type);
    let staging = staging_path(staging_dir, volume_id);
    clients
        .node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: options.context.clone(),
            ..Default::default()
        })
        .await?;
    clients
        .node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: path.display().to_string(),
            volume_capability: Some(cap),
            readonly: options.read_only,
            volume_context: options.context.clone(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Unpublishes `path` and unstages the volume.
pub async fn unpublish(
    clients: &mut Clients,
    staging_dir: &Path,
    volume_id: &str,
    path: &Path,
) -> Result<(), tonic::Status> {
    clients
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: path.display().to_string(),
        })
        .await?;
    let staging = staging_path(staging_dir, volume_id);
    clients
        .node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await?;
    let _ = std::fs::remove_dir(&staging);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in ["", "G", "-1G", "ten", "0", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(human(10 << 30), "10G");
        assert_eq!(human(1536 << 20), "1536M");
        assert_eq!(human(1000), "1000");
    }

    #[test]
    fn every_error_comes_with_a_hint() {
        let text = explain("volume create", &tonic::Status::already_exists("taken"), "unix:///s");
        assert!(
            text.contains("AlreadyExists") && text.contains("hint: that name is taken"),
            "{text}"
        );
        let text = explain("volume list", &tonic::Status::unavailable("down"), "unix:///s");
        assert!(text.contains("qsd-csi standalone"), "{text}");
    }
}
