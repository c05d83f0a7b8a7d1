//! The client commands: drive a running endpoint from a shell over CSI, print with
//! [`crate::output`]. Also `certs sign-node`, which needs no endpoint.

use std::path::Path;
use std::time::SystemTime;

use crate::calls::{self as cli, NewVolume};
use anyhow::Context;
use qsd_csi_proto::csi;
use qsd_csi_proto::csi::volume_content_source::{SnapshotSource, Type, VolumeSource};

use crate::args::{Command, SnapshotCmd, VolumeCmd};
use crate::output::{self, Output, SnapshotView, VolumeView};

/// `qsd-csi certs sign-node`: the signer's certificate for a node, its key made here.
pub fn sign_node(
    node: &str,
    ca_cert: &Path,
    ca_key: &Path,
    days: u64,
    out: &Path,
) -> anyhow::Result<()> {
    use qsd_csi_controller::signer::SigningCa;
    anyhow::ensure!(
        qsd_csi_proto::identity::valid_node_name(node),
        "{node:?} cannot be named by a certificate (a lowercase DNS name)"
    );
    let ca = SigningCa::from_files(ca_cert, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let chain = ca.issue(node, &key, std::time::Duration::from_secs(days * 24 * 3600))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    qsd_node::pool::store::write_bytes(
        out,
        &format!("{node}.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    qsd_node::pool::store::write_bytes(out, &format!("{node}.crt"), chain.as_bytes(), 0o644)?;
    println!("{}", out.join(format!("{node}.crt")).display());
    Ok(())
}

/// Runs one client command against `endpoint`; the error is what to tell the user.
pub async fn run(endpoint: &str, command: Command) -> Result<(), String> {
    let socket = crate::calls::socket_path(endpoint)?;
    let mut c = crate::calls::Clients::connect(&socket).await.map_err(|e| {
        format!("cannot reach {endpoint}: {e}\n  hint: start the driver with `qsd-csi standalone`")
    })?;
    fn fail<'a>(what: &'a str, endpoint: &'a str) -> impl Fn(tonic::Status) -> String + 'a {
        move |s| cli::explain(what, &s, endpoint)
    }
    let size = |s: &str| cli::parse_size(s);
    match command {
        Command::Standalone(_) | Command::Node(_) | Command::Controller(_) | Command::Certs(_) => {
            return Err("not a client command".into())
        }
        Command::Volume(VolumeCmd::Create {
            name,
            size: sz,
            pool,
            preallocation,
            from_snapshot,
            output,
        }) => {
            let mut parameters = std::collections::HashMap::new();
            parameters.extend(pool.map(|p| ("pool".to_owned(), p)));
            parameters.extend(preallocation.map(|p| ("preallocation".to_owned(), p)));
            let source = from_snapshot.map(|id| Type::Snapshot(SnapshotSource { snapshot_id: id }));
            let v = cli::create_volume(
                &mut c,
                NewVolume { name, size: Some(size(&sz)?), parameters, source },
            )
            .await
            .map_err(fail("volume create", endpoint))?;
            print_volumes(&[VolumeView::new(&v, Vec::new())], output, false)?;
        }
        Command::Volume(VolumeCmd::List { output }) => {
            let mut token = String::new();
            let mut views = Vec::new();
            loop {
                let page = c
                    .controller
                    .list_volumes(csi::ListVolumesRequest {
                        max_entries: 100,
                        starting_token: token,
                    })
                    .await
                    .map_err(fail("volume list", endpoint))?
                    .into_inner();
                for e in page.entries {
                    let published = e.status.map(|s| s.published_node_ids).unwrap_or_default();
                    views.push(VolumeView::new(&e.volume.unwrap_or_default(), published));
                }
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            print_volumes(&views, output, true)?;
        }
        Command::Volume(VolumeCmd::Delete { volume }) => {
            c.controller
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: volume.clone(),
                    ..Default::default()
                })
                .await
                .map_err(fail("volume delete", endpoint))?;
            println!("deleted {volume}");
        }
        Command::Snapshot(SnapshotCmd::Create { volume, name, output }) => {
            let s = c
                .controller
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: volume,
                    name,
                    ..Default::default()
                })
                .await
                .map_err(fail("snapshot create", endpoint))?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            print_snapshots(&[SnapshotView::new(&s)], output, false)?;
        }
        Command::Snapshot(SnapshotCmd::List { volume, output }) => {
            let mut token = String::new();
            let mut views = Vec::new();
            loop {
                let page = c
                    .controller
                    .list_snapshots(csi::ListSnapshotsRequest {
                        source_volume_id: volume.clone().unwrap_or_default(),
                        max_entries: 100,
                        starting_token: token,
                        ..Default::default()
                    })
                    .await
                    .map_err(fail("snapshot list", endpoint))?
                    .into_inner();
                views.extend(page.entries.iter().map(|e| {
                    SnapshotView::new(e.snapshot.as_ref().unwrap_or(&Default::default()))
                }));
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            print_snapshots(&views, output, true)?;
        }
        Command::Snapshot(SnapshotCmd::Delete { snapshot }) => {
            c.controller
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: snapshot.clone(),
                    ..Default::default()
                })
                .await
                .map_err(fail("snapshot delete", endpoint))?;
            println!("deleted {snapshot}");
        }
        Command::Clone { source, name, size: sz, output } => {
            let size = sz.as_deref().map(size).transpose()?;
            let source = Some(Type::Volume(VolumeSource { volume_id: source }));
            let v = cli::create_volume(
                &mut c,
                NewVolume { name, size, parameters: Default::default(), source },
            )
            .await
            .map_err(fail("clone", endpoint))?;
            print_volumes(&[VolumeView::new(&v, Vec::new())], output, false)?;
        }
        Command::Expand { volume, size: sz, staging_dir } => {
            let r = c
                .controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: volume.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size(&sz)?,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .map_err(fail("expand", endpoint))?
                .into_inner();
            let staging = cli::staging_path(&staging_dir, &volume);
            if r.node_expansion_required && qsd_node::mount::is_mountpoint(&staging) {
                c.node
                    .node_expand_volume(csi::NodeExpandVolumeRequest {
                        volume_id: volume.clone(),
                        volume_path: staging.display().to_string(),
                        ..Default::default()
                    })
                    .await
                    .map_err(fail("expand on this node", endpoint))?;
            }
            println!("{volume}\t{}", cli::human(r.capacity_bytes));
        }
        Command::Publish { volume, path, block, fs_type, read_only, context, staging_dir } => {
            let context = context
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| format!("--context {kv:?} is not KEY=VALUE"))
                })
                .collect::<Result<_, String>>()?;
            let options = cli::PublishOptions { block, fs_type, read_only, context };
            cli::publish(&mut c, &staging_dir, &volume, &path, &options)
                .await
                .map_err(fail("publish", endpoint))?;
            println!("published {volume} at {}", path.display());
        }
        Command::Unpublish { volume, path, staging_dir } => {
            cli::unpublish(&mut c, &staging_dir, &volume, &path)
                .await
                .map_err(fail("unpublish", endpoint))?;
            println!("unpublished {volume} from {}", path.display());
        }
    }
    Ok(())
}

fn print_volumes(views: &[VolumeView], format: Output, list: bool) -> Result<(), String> {
    // A created volume prints its bare ID by default, so `V=$(qsd-csi volume create …)` works.
    let format = if !list && format == Output::Table { Output::Name } else { format };
    print!("{}", output::volumes(views, format, list)?);
    Ok(())
}

fn print_snapshots(views: &[SnapshotView], format: Output, list: bool) -> Result<(), String> {
    let format = if !list && format == Output::Table { Output::Name } else { format };
    print!("{}", output::snapshots(views, format, list, SystemTime::now())?);
    Ok(())
}
