//! Volumes copied between nodes. The node holding the source serves it read-only over NBD
//! with TLS (a pre-shared key made for this copy); the node receiving it opens that export as
//! an `nbd` node in its own daemon and pulls it into a new image with the same backup job a
//! local copy clone uses: block status travels with the data, so holes stay holes and only
//! allocated data crosses the wire.
//!
//! ```text
//!   source node                                    target node
//!   snapshot S (or a volume's point-in-time        daemon: nbd node ══ backup job ══► [K]
//!   snapshot, taken for this copy)                   ▲ TLS-PSK, read-only
//!   copy server (qemu-storage-daemon) ── NBD/TCP ────┘
//! ```
//! The export lives while its [`CopyExport`] does (the agent keeps it for as long as the
//! controller holds the `ExportForCopy` stream). A killed plugin's copy server dies with it;
//! the intents below let the next start remove what either side left: the server's directory
//! and a point-in-time snapshot on the source, the `nbd` node, TLS object and key on the
//! target (its half-copied image goes with the `NewVolume` intent, as a local clone's does).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::clone::{new_record, CloneTask, OpenNodes, Running, CLONE_PROGRESS_PERIOD};
use super::ops::{Intent, Operation};
use super::snapshot::SnapshotBatch;
use super::volume::{CreateVolume, RemoteSource, VolumeSource};
use super::{EngineCore, Guard};
use crate::error::{Error, Result};
use crate::graph::{self, Names};
use crate::pool::id::{parse_size, IdKind, NodeName, ObjectId, PoolName};
use crate::pool::{LayerId, ObjectName, Pool, PoolKind, RecordedSource};
use crate::qmp::commands::{BlockdevAdd, BlockdevOptions, InetServer, ObjectAddTlsPsk, ObjectDel};
use crate::qsd::copy_server::{self, CopyServer, CopyServerConfig};

/// How long the source's copy server may take to accept a connection.
const REACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes of key made for each copy.
const KEY_BYTES: usize = 32;

/// What a killed copy leaves, by side; recovery removes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyLeftovers {
    /// The copy's directory (key, server pidfile).
    pub dir: PathBuf,
    /// Source side: the pool and the point-in-time snapshot taken for the copy.
    pub snapshot: Option<(PoolName, ObjectName)>,
    /// Target side: the tag naming the `nbd` node and TLS object in the daemon.
    pub daemon_tag: Option<String>,
}

/// A source served for one copy; the export, and any snapshot taken for it, go with
/// [`CopyExport::close`].
#[derive(Debug)]
pub struct CopyExport {
    remote: RemoteSource,
    server: Option<CopyServer>,
    temporary: Option<ObjectId>,
    engine: Arc<EngineCore>,
    guard: Option<Guard>,
    intent: Option<Intent>,
}

impl CopyExport {
    /// Where and how to read it.
    pub fn remote(&self) -> &RemoteSource {
        &self.remote
    }

    /// Stops serving, and deletes the snapshot taken for the copy.
    pub async fn close(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        drop(self.guard.take());
        if let Some(id) = self.temporary.take() {
            if let Err(e) = self.engine.delete_snapshot(&id).await {
                tracing::warn!(snapshot = %id, error = %e.with_causes(), "removing a copy's snapshot; it goes at the next start");
                std::mem::forget(self.intent.take()); // the intent stays for the next start
            }
        }
        tracing::info!(export = self.remote.export, "a copy's export ended");
    }
}

fn random_key() -> Result<Vec<u8>> {
    let mut key = vec![0u8; KEY_BYTES];
    getrandom::getrandom(&mut key)
        .map_err(|e| Error::Inconsistent(format!("no random bytes for a copy's key: {e}")))?;
    Ok(key)
}

impl EngineCore {
    /// The directory of the copy tagged `tag`.
    fn copy_dir(&self, tag: &str) -> PathBuf {
        self.config.daemon.run_dir.join("copies").join(tag)
    }

    /// Serves `source` (a snapshot, or a volume as of now) of a local pool read-only for a
    /// copy onto node `reader`.
    pub async fn export_for_copy(
        self: &Arc<Self>,
        source: &VolumeSource,
        reader: &NodeName,
    ) -> Result<CopyExport> {
        let host = self.config.copy_address.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "node {} has no address for copies to other nodes (--copy-address)",
                self.config.node.as_str()
            ))
        })?;
        let (pool, parsed) = self.resolve(source.kind(), source.id())?;
        if pool.kind() == PoolKind::Shared {
            return Err(Error::FailedPrecondition(format!(
                "{} is in shared pool {}, which every node reads: nothing to copy",
                source.id(),
                pool.name().as_str()
            )));
        }
        let tag = LayerId::random().to_string();
        let temporary = match source {
            VolumeSource::Volume(_) => Some(ObjectName::parse(&format!("xcopy-{tag}"))?),
            VolumeSource::Snapshot(_) => None,
        };
        let dir = self.copy_dir(&tag);
        let intent = self.operations.begin(Operation::Copy(CopyLeftovers {
            dir: dir.clone(),
            snapshot: temporary.clone().map(|s| (pool.name().clone(), s)),
            daemon_tag: None,
        }))?;
        let snapshot = match &temporary {
            Some(name) => {
                let items = [(source.id().clone(), name.clone())];
                let batch = SnapshotBatch { items: &items, group: None, freeze: false };
                self.create_snapshot_group(batch).await?;
                name.clone()
            }
            None => parsed.name,
        };
        let mut export = CopyExport {
            remote: RemoteSource {
                host: host.to_string(),
                port: 0,
                export: format!("copy-{tag}"),
                identity: format!("qsd-csi-{tag}"),
                key: random_key()?,
                size: 0,
                allocated: 0,
            },
            server: None,
            temporary: temporary
                .map(|name| self.object_id(IdKind::Snapshot, &pool, &name))
                .transpose()?,
            engine: self.clone(),
            guard: None,
            intent: Some(intent),
        };
        match self.serve_copy(&mut export, &pool, &snapshot, host, dir).await {
            Ok(()) => {
                tracing::info!(
                    source = %source.id(),
                    reader = %reader,
                    port = export.remote.port,
                    "serving a copy to another node"
                );
                Ok(export)
            }
            Err(e) => {
                export.close().await;
                Err(e)
            }
        }
    }

    /// Starts the copy server of `snapshot` for `export`, holding the snapshot meanwhile.
    async fn serve_copy(
        &self,
        export: &mut CopyExport,
        pool: &Pool,
        snapshot: &ObjectName,
        host: IpAddr,
        dir: PathBuf,
    ) -> Result<()> {
        export.guard = Some(self.lock(vec![Self::key(IdKind::Snapshot, pool, snapshot)])?);
        let record = pool.snapshot(snapshot).ok_or_else(|| Error::NotFound {
            what: "snapshot",
            id: self
                .object_id(IdKind::Snapshot, pool, snapshot)
                .map_or_else(|_| snapshot.to_string(), |id| id.to_string()),
        })?;
        let chain = pool.chain(record.layer)?;
        let options = graph::chain_options(pool, &Names::new("copy"), &chain, true)?;
        let node = options.node_name().to_owned();
        export.remote.size = record.size;
        let blockdev = serde_json::to_value(&options)
            .map_err(|e| Error::Inconsistent(format!("a copy's node definition: {e}")))?;
        // The server starts while the chain's allocation is counted (both read only the
        // snapshot's layers).
        let (server, allocated) = tokio::join!(
            CopyServer::start(CopyServerConfig {
                binary: &self.config.daemon.binary,
                dir,
                blockdev,
                node: &node,
                listen: host,
                export: &export.remote.export,
                identity: &export.remote.identity,
                key: &export.remote.key,
            }),
            super::changes::allocated_bytes(pool.layer_path(record.layer))
        );
        let server = server?;
        export.remote.allocated = allocated?;
        export.remote.port = server.port();
        export.server = Some(server);
        Ok(())
    }

    /// Starts a copy of a volume or snapshot another node serves ([`CreateVolume::remote`])
    /// into a new volume here; [`CloneTask::finish`] completes it, as for a local clone.
    pub async fn start_remote_copy(self: &Arc<Self>, request: &CreateVolume) -> Result<CloneTask> {
        let remote = request
            .remote
            .as_ref()
            .ok_or_else(|| Error::invalid("remote", "a remote copy needs the source's export"))?;
        let source = request
            .source
            .clone()
            .ok_or_else(|| Error::invalid("source", "a remote copy names its source"))?;
        let pool = self.requested_pool(&request.pool)?;
        let max_chain_depth = self.max_depth(request.max_chain_depth)?;
        let (volume_id, home) = self.copy_id(&pool, request, &source)?;
        let size = request.size.map(parse_size).transpose()?.unwrap_or(remote.size);
        // A moved volume is the same volume, not a copy of one.
        let recorded = request.keep_id.is_none().then(|| RecordedSource::Copied(source.clone()));
        let guard = self.lock(vec![Self::key(IdKind::Volume, &pool, &request.name)])?;
        if let Some(existing) = pool.volume(&request.name) {
            let info = self.check_recreate(&pool, &existing, request, size, &recorded)?;
            return Ok(CloneTask::done(self.clone(), info));
        }
        if size < remote.size {
            return Err(Error::OutOfRange {
                requested: request.size.unwrap_or_default(),
                reason: format!("the source holds {} bytes", remote.size),
            });
        }
        let graph_guard = self.graph.change().await;
        let tag = graph::fresh_tag();
        let dir = self.copy_dir(&tag);
        let leftovers = self.operations.begin(Operation::Copy(CopyLeftovers {
            dir: dir.clone(),
            snapshot: None,
            daemon_tag: Some(tag.clone()),
        }))?;
        let (target, new_volume) = self.copy_target(&pool, request, remote.size).await?;
        let (job, open) = self.start_pull(&pool, request, remote, target, &tag, &dir).await?;
        tracing::info!(
            volume = %request.name,
            source = %source.id(),
            from = remote.host,
            "copy from another node started"
        );
        let mut record = new_record(request, size, target, max_chain_depth, recorded);
        record.home = home;
        Ok(CloneTask::running(
            self.clone(),
            Running {
                job,
                volume_id,
                source_id: source.id().clone(),
                pool,
                record,
                open,
                intents: vec![new_volume, leftovers],
                _guard: guard,
                _graph: graph_guard,
            },
            CLONE_PROGRESS_PERIOD,
        ))
    }

    /// The new volume's ID and, for a move, the node its ID names when that is not this one
    /// (its home). A move keeps the ID; one back to the node the ID names is an ordinary
    /// volume there.
    fn copy_id(
        &self,
        pool: &Pool,
        request: &CreateVolume,
        source: &VolumeSource,
    ) -> Result<(ObjectId, Option<NodeName>)> {
        let volume_id = self.object_id(IdKind::Volume, pool, &request.name)?;
        let Some(kept) = &request.keep_id else { return Ok((volume_id, None)) };
        let here = volume_id.location.node.clone();
        let kept = self.kept_id(pool, &volume_id, kept, source)?;
        let home = kept.location.node.clone().filter(|n| Some(n) != here.as_ref());
        Ok((kept, home))
    }

    /// Opens the remote source and the new image `target` in the daemon and starts the job
    /// pulling one into the other; on failure closes what it opened and removes the image.
    async fn start_pull(
        &self,
        pool: &Pool,
        request: &CreateVolume,
        remote: &RemoteSource,
        target: LayerId,
        tag: &str,
        dir: &std::path::Path,
    ) -> Result<(crate::qmp::Job, OpenNodes)> {
        let qmp = self.daemon.qmp();
        let mut open = OpenNodes::remote(tag.to_owned(), dir.to_path_buf());
        let started = async {
            let source_node = self.open_remote(remote, tag, dir).await?;
            let names = Names::new(graph::fresh_tag());
            let target_node = graph::open_copy_target(&qmp, pool, &names, target).await?;
            open.target = Some(names.clone());
            graph::start_backup(&qmp, &names, source_node, target_node, request.clone_bandwidth)
                .await
        }
        .await;
        open.started(&qmp, pool, target, started).await
    }

    /// The ID a moved volume keeps (`kept`): its source's, a volume of the same name in a
    /// local pool of the same name (on another node, or on this one: a move back to the node
    /// the ID names); `own` is the ID it would get here.
    fn kept_id(
        &self,
        pool: &Pool,
        own: &ObjectId,
        kept: &ObjectId,
        source: &VolumeSource,
    ) -> Result<ObjectId> {
        let bad = |why: &str| Error::invalid("keep_id", format!("{kept} {why}"));
        let id = kept.clone();
        if source != &VolumeSource::Volume(kept.clone()) {
            return Err(bad("is not the source of the copy"));
        }
        if pool.kind() != PoolKind::Local || id.location.pool != own.location.pool {
            return Err(bad("is not a volume of this local pool"));
        }
        if id.name != own.name {
            return Err(bad("names another volume than the request"));
        }
        if id.location.node.is_none() {
            return Err(bad("is not a local pool's volume"));
        }
        Ok(id)
    }

    /// Adds the TLS credentials and the read-only `nbd` node of a remote source; returns the
    /// node's name.
    async fn open_remote(
        &self,
        remote: &RemoteSource,
        tag: &str,
        dir: &std::path::Path,
    ) -> Result<String> {
        // The daemon's connect would hold its monitor for as long as the kernel keeps trying
        // (minutes, for an address that does not answer): try it here first, briefly.
        let address = (remote.host.as_str(), remote.port);
        match tokio::time::timeout(REACH_TIMEOUT, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Error::Transport(Box::new(e))),
            Err(_) => {
                let reason = format!("{}:{} did not answer in time", remote.host, remote.port);
                return Err(Error::Transport(reason.into()));
            }
        }
        let qmp = self.daemon.qmp();
        copy_server::write_key(dir, &remote.identity, &remote.key)?;
        graph::call(
            &qmp,
            &ObjectAddTlsPsk {
                qom_type: "tls-creds-psk",
                id: format!("tls-{tag}"),
                endpoint: "client",
                dir: dir.display().to_string(),
                username: remote.identity.clone(),
                priority: copy_server::TLS_PRIORITY,
            },
        )
        .await?;
        let node = format!("n-{tag}");
        graph::call(
            &qmp,
            &BlockdevAdd(BlockdevOptions::Nbd {
                node_name: node.clone(),
                server: InetServer::new(&remote.host, remote.port),
                export: remote.export.clone(),
                tls_creds: format!("tls-{tag}"),
                read_only: Some(true),
            }),
        )
        .await?;
        Ok(node)
    }

    /// Removes every copy directory a killed plugin left (at start, after recovery: nothing
    /// copies yet), and stops any copy server still running from one.
    pub(super) fn sweep_copies(&self) {
        let root = self.config.daemon.run_dir.join("copies");
        let Ok(entries) = std::fs::read_dir(&root) else { return };
        for entry in entries.flatten() {
            copy_server::sweep(&entry.path());
        }
    }

    /// Removes what a killed copy left on this side.
    pub(super) async fn recover_copy(&self, leftovers: &CopyLeftovers) -> Result<()> {
        if let Some(tag) = &leftovers.daemon_tag {
            close_remote(&self.daemon.qmp(), tag).await?;
        }
        copy_server::sweep(&leftovers.dir);
        if let Some((pool, name)) = &leftovers.snapshot {
            let pool = self.pool(pool)?;
            if pool.snapshot(name).is_some() {
                // Its record only: the layer stays in the volume's chain, as an unpinned layer
                // the next shortening may merge.
                pool.remove_snapshot(name)?;
            }
        }
        Ok(())
    }
}

/// Removes a remote source's `nbd` node and TLS object (either may be gone already).
pub(super) async fn close_remote(qmp: &crate::qmp::QmpClient, tag: &str) -> Result<()> {
    graph::delete_node_if_owned(qmp, &format!("n-{tag}")).await?;
    match graph::call(qmp, &ObjectDel { id: format!("tls-{tag}") }).await {
        Ok(_) => Ok(()),
        Err(e) if e.qmp_desc_contains("not found") => Ok(()),
        Err(e) => Err(e),
    }
}
