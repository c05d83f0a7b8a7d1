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

/// A copy of the volume or snapshot `source` onto node `to`, named `name` (default: the
/// source's own name) in the source's pool.
fn copy_onto(source: &str, to: &str, name: Option<String>) -> Result<NewVolume, String> {
    use qsd_csi_model::id::{IdKind, ObjectId};
    let (kind, parsed) = [IdKind::Volume, IdKind::Snapshot]
        .into_iter()
        .find_map(|kind| ObjectId::parse(kind, source).ok().map(|p| (kind, p)))
        .ok_or_else(|| format!("{source:?} is not a volume or snapshot ID"))?;
    let source_type = match kind {
        IdKind::Snapshot => Type::Snapshot(SnapshotSource { snapshot_id: source.to_owned() }),
        _ => Type::Volume(VolumeSource { volume_id: source.to_owned() }),
    };
    Ok(NewVolume {
        name: name.unwrap_or_else(|| parsed.name.as_str().to_owned()),
        size: None,
        parameters: [("pool".to_owned(), parsed.location.pool.as_str().to_owned())].into(),
        source: Some(source_type),
        node: Some(to.to_owned()),
    })
}

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
    let clients = crate::calls::Clients::connect(&socket).await.map_err(|e| {
        format!("cannot reach {endpoint}: {e}\n  hint: start the driver with `qsd-csi standalone`")
    })?;
    let mut s = Session { c: clients, endpoint };
    match command {
        Command::Standalone(_)
        | Command::Node(_)
        | Command::Controller(_)
        | Command::Certs(_)
        | Command::Pool(_) => Err("not a client command".into()),
        Command::Volume(cmd) => s.volume(cmd).await,
        Command::Snapshot(SnapshotCmd::Create { volume, name, output }) => {
            s.snapshot_create(volume, name, output).await
        }
        Command::Snapshot(SnapshotCmd::List { volume, output }) => {
            s.snapshot_list(volume.unwrap_or_default(), output).await
        }
        Command::Snapshot(SnapshotCmd::Delete { snapshot }) => s.snapshot_delete(snapshot).await,
        Command::Snapshot(SnapshotCmd::Changes { mut snapshots, json }) => {
            let target = snapshots.pop().unwrap_or_default();
            s.snapshot_changes(snapshots.pop(), target, json).await
        }
        Command::Clone { source, name, size, output } => {
            let size = size.as_deref().map(cli::parse_size).transpose()?;
            let source = Some(Type::Volume(VolumeSource { volume_id: source }));
            let new = NewVolume { name, size, parameters: Default::default(), source, node: None };
            s.create(new, "clone", output).await
        }
        Command::Expand { volume, size, staging_dir } => {
            s.expand(volume, cli::parse_size(&size)?, &staging_dir).await
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
            let staging = cli::publish(&mut s.c, &staging_dir, &volume, &path, &options);
            let doing = format!("publishing {volume} (attach, format if empty, mount)");
            cli::with_spinner(doing, staging).await.map_err(s.fail("publish"))?;
            println!("published {volume} at {}", path.display());
            Ok(())
        }
        Command::Unpublish { volume, path, staging_dir } => {
            cli::unpublish(&mut s.c, &staging_dir, &volume, &path)
                .await
                .map_err(s.fail("unpublish"))?;
            println!("unpublished {volume} from {}", path.display());
            Ok(())
        }
    }
}

/// A snapshot-metadata stream as (volume size, ranges) batches, whichever RPC it came from.
type Batches = std::pin::Pin<
    Box<
        dyn tokio_stream::Stream<Item = Result<(i64, Vec<csi::BlockMetadata>), tonic::Status>>
            + Send,
    >,
>;

/// The clients of one endpoint, for one command.
struct Session<'a> {
    c: crate::calls::Clients,
    endpoint: &'a str,
}

impl Session<'_> {
    /// A failed call as the message for the user, with a hint.
    fn fail<'s>(&'s self, what: &'s str) -> impl Fn(tonic::Status) -> String + 's {
        move |status| cli::explain(what, &status, self.endpoint)
    }

    async fn create(&mut self, new: NewVolume, what: &str, output: Output) -> Result<(), String> {
        let v = cli::create_volume(&mut self.c, new).await.map_err(self.fail(what))?;
        print_volumes(&[VolumeView::new(&v, Vec::new())], output, false)
    }

    /// Streams the changed ranges to stdout as they arrive (any volume size, bounded memory).
    async fn snapshot_changes(
        &mut self,
        base: Option<String>,
        target: String,
        json: bool,
    ) -> Result<(), String> {
        use std::io::Write;
        use tokio_stream::StreamExt;
        let mut batches: Batches = match &base {
            None => {
                let r =
                    csi::GetMetadataAllocatedRequest { snapshot_id: target, ..Default::default() };
                let stream = self.c.metadata.get_metadata_allocated(r).await;
                let stream = stream.map_err(self.fail("snapshot changes"))?.into_inner();
                Box::pin(stream.map(|m| m.map(|m| (m.volume_capacity_bytes, m.block_metadata))))
            }
            Some(base) => {
                let r = csi::GetMetadataDeltaRequest {
                    base_snapshot_id: base.clone(),
                    target_snapshot_id: target,
                    ..Default::default()
                };
                let stream = self.c.metadata.get_metadata_delta(r).await;
                let stream = stream.map_err(self.fail("snapshot changes"))?.into_inner();
                Box::pin(stream.map(|m| m.map(|m| (m.volume_capacity_bytes, m.block_metadata))))
            }
        };
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let write = |e: std::io::Error| format!("writing the ranges: {e}");
        let mut size = None;
        let mut first = true;
        while let Some(batch) = batches.next().await {
            let (capacity, ranges) = batch.map_err(self.fail("snapshot changes"))?;
            if size.is_none() && json {
                write!(out, "{{\"volume_size_bytes\":{capacity},\"ranges\":[").map_err(write)?;
            }
            size = Some(capacity);
            for r in ranges {
                if json {
                    let sep = if first { "" } else { "," };
                    write!(
                        out,
                        "{sep}{{\"offset\":{},\"length\":{}}}",
                        r.byte_offset, r.size_bytes
                    )
                    .map_err(write)?;
                } else {
                    writeln!(out, "{} {}", r.byte_offset, r.size_bytes).map_err(write)?;
                }
                first = false;
            }
        }
        if json {
            match size {
                Some(_) => writeln!(out, "]}}").map_err(write)?,
                // Nothing streamed (qsd-csi sends at least one message; another driver may not).
                None => {
                    writeln!(out, "{{\"volume_size_bytes\":null,\"ranges\":[]}}").map_err(write)?
                }
            }
        }
        out.flush().map_err(write)
    }

    async fn volume_list(&mut self, output: Output) -> Result<(), String> {
        let mut token = String::new();
        let mut views = Vec::new();
        loop {
            let request = csi::ListVolumesRequest { max_entries: 100, starting_token: token };
            let page = self.c.controller.list_volumes(request).await;
            let page = page.map_err(self.fail("volume list"))?.into_inner();
            for e in page.entries {
                let published = e.status.map(|s| s.published_node_ids).unwrap_or_default();
                views.push(VolumeView::new(&e.volume.unwrap_or_default(), published));
            }
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        print_volumes(&views, output, true)
    }

    /// `qsd-csi volume …`.
    async fn volume(&mut self, cmd: VolumeCmd) -> Result<(), String> {
        match cmd {
            VolumeCmd::Create {
                name,
                size,
                pool,
                preallocation,
                from_snapshot,
                params,
                output,
            } => {
                let mut parameters = std::collections::HashMap::new();
                for param in params {
                    let (key, value) = param
                        .split_once('=')
                        .ok_or_else(|| format!("--param {param:?}: expected KEY=VALUE"))?;
                    parameters.insert(key.to_owned(), value.to_owned());
                }
                parameters.extend(pool.map(|p| ("pool".to_owned(), p)));
                parameters.extend(preallocation.map(|p| ("preallocation".to_owned(), p)));
                let source =
                    from_snapshot.map(|id| Type::Snapshot(SnapshotSource { snapshot_id: id }));
                let size = Some(cli::parse_size(&size)?);
                let new = NewVolume { name, size, parameters, source, node: None };
                self.create(new, "volume create", output).await
            }
            VolumeCmd::List { output } => self.volume_list(output).await,
            VolumeCmd::Delete { volume } => self.volume_delete(volume).await,
            VolumeCmd::Copy { source, to, name, output } => {
                self.create(copy_onto(&source, &to, name)?, "volume copy", output).await
            }
            VolumeCmd::Move { volume, to, output } => self.move_volume(volume, to, output).await,
        }
    }

    /// Copies `volume` onto node `to`, then deletes it; refused while it is published (its
    /// writes after the copy would be lost).
    async fn move_volume(
        &mut self,
        volume: String,
        to: String,
        output: Output,
    ) -> Result<(), String> {
        let listed = self.c.controller.list_volumes(csi::ListVolumesRequest::default()).await;
        let listed = listed.map_err(self.fail("volume move"))?.into_inner();
        let entry = listed
            .entries
            .iter()
            .find(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == volume))
            .ok_or_else(|| format!("volume move: no volume {volume}"))?;
        let published = entry.status.as_ref().map(|s| s.published_node_ids.clone());
        if let Some(nodes) = published.filter(|n| !n.is_empty()) {
            return Err(format!(
                "volume move: {volume} is published on {}; unpublish it first (or `volume copy` it)",
                nodes.join(", ")
            ));
        }
        let copy = cli::create_volume(&mut self.c, copy_onto(&volume, &to, None)?).await;
        let copy = copy.map_err(self.fail("volume move"))?;
        let request = csi::DeleteVolumeRequest { volume_id: volume.clone(), ..Default::default() };
        if let Err(e) = self.c.controller.delete_volume(request).await {
            return Err(format!(
                "volume move: copied to {}, but {volume} could not be deleted ({}): both exist",
                copy.volume_id,
                e.message()
            ));
        }
        print_volumes(&[VolumeView::new(&copy, Vec::new())], output, false)
    }

    async fn volume_delete(&mut self, volume: String) -> Result<(), String> {
        let request = csi::DeleteVolumeRequest { volume_id: volume.clone(), ..Default::default() };
        self.c.controller.delete_volume(request).await.map_err(self.fail("volume delete"))?;
        println!("deleted {volume}");
        Ok(())
    }

    async fn snapshot_create(
        &mut self,
        volume: String,
        name: String,
        output: Output,
    ) -> Result<(), String> {
        let request =
            csi::CreateSnapshotRequest { source_volume_id: volume, name, ..Default::default() };
        let taken = self.c.controller.create_snapshot(request).await;
        let s = taken.map_err(self.fail("snapshot create"))?.into_inner().snapshot;
        print_snapshots(&[SnapshotView::new(&s.unwrap_or_default())], output, false)
    }

    async fn snapshot_list(&mut self, volume: String, output: Output) -> Result<(), String> {
        let mut token = String::new();
        let mut views = Vec::new();
        loop {
            let request = csi::ListSnapshotsRequest {
                source_volume_id: volume.clone(),
                max_entries: 100,
                starting_token: token,
                ..Default::default()
            };
            let page = self.c.controller.list_snapshots(request).await;
            let page = page.map_err(self.fail("snapshot list"))?.into_inner();
            views.extend(
                page.entries
                    .iter()
                    .map(|e| SnapshotView::new(e.snapshot.as_ref().unwrap_or(&Default::default()))),
            );
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        print_snapshots(&views, output, true)
    }

    async fn snapshot_delete(&mut self, snapshot: String) -> Result<(), String> {
        let request =
            csi::DeleteSnapshotRequest { snapshot_id: snapshot.clone(), ..Default::default() };
        self.c.controller.delete_snapshot(request).await.map_err(self.fail("snapshot delete"))?;
        println!("deleted {snapshot}");
        Ok(())
    }

    /// Grows the volume; if `qsd-csi publish` staged it here, its device and filesystem too.
    async fn expand(
        &mut self,
        volume: String,
        size: i64,
        staging_dir: &Path,
    ) -> Result<(), String> {
        let request = csi::ControllerExpandVolumeRequest {
            volume_id: volume.clone(),
            capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
            ..Default::default()
        };
        let grown = self.c.controller.controller_expand_volume(request);
        let grown = cli::with_spinner(format!("growing {volume}"), grown).await;
        let r = grown.map_err(self.fail("expand"))?.into_inner();
        let staging = cli::staging_path(staging_dir, &volume);
        if r.node_expansion_required && qsd_node::mount::is_mountpoint(&staging) {
            let request = csi::NodeExpandVolumeRequest {
                volume_id: volume.clone(),
                volume_path: staging.display().to_string(),
                ..Default::default()
            };
            self.c
                .node
                .node_expand_volume(request)
                .await
                .map_err(self.fail("expand on this node"))?;
        }
        println!("{volume}\t{}", cli::human(r.capacity_bytes));
        Ok(())
    }
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
