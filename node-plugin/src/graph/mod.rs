//! The QEMU nodes of a volume, and how they are built and torn down.
//!
//! ```text
//!   export  x-<uid>      nbd (on the daemon's NBD server) | fuse (a file) | vhost-user-blk
//!     │
//!   throttle t-<uid>     in throttle group g-<uid>; limits change live with qom-set
//!     │
//!   qcow2   q-<tag>-<L>  head layer (writable)         ─┐ one nested blockdev-add; each qcow2
//!     │ backing                                         │ node has its file node f-<tag>-<L>
//!   qcow2   q-<tag>-<L'> older layers (read-only)      ─┘ (write thresholds watch the head's)
//! ```
//!
//! `<uid>` is the volume's short id and `<tag>` names one opening of a chain: the volume's uid
//! while attached, a random tag for the short-lived nodes of offline operations. A layer shared
//! by two volumes is opened once per chain, under different tags, always read-only.
//! Teardown runs in the order that never leaves a user without its node: export (waiting for
//! `BLOCK_EXPORT_DELETED`), throttle node, qcow2 nodes top-down, throttle group.

mod chain;
mod image;

use std::path::{Path, PathBuf};

pub use chain::{
    arm_write_threshold, block_graph, commit, delete_throttle_groups, export_ids, named_nodes,
    resize_node, start_backup, stream, switch_to_overlays, OverlaySwitch,
};
pub use image::{create_image, NewImage};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pool::{LayerId, Pool};
use crate::qmp::commands::{
    BlockExportAdd, BlockExportDel, BlockdevAdd, BlockdevDel, BlockdevOptions, BlockdevRef,
    Command, FileCache, LegacyUnixAddress, LegacyUnixData, NbdServerStart, ObjectAddThrottleGroup,
    ObjectDel, QomSetLimits, ThrottleLimits, UnixSocketAddress,
};
use crate::qmp::QmpClient;
use qsd_csi_model::volume::Qos;

/// A volume's limits as QMP's throttle-group properties.
pub fn throttle_limits(q: Qos) -> ThrottleLimits {
    ThrottleLimits {
        iops_total: q.iops_total,
        iops_read: q.iops_read,
        iops_write: q.iops_write,
        bps_total: q.bps_total,
        bps_read: q.bps_read,
        bps_write: q.bps_write,
    }
}

/// Calls a typed command, naming it in the error.
pub async fn call<C: Command>(qmp: &QmpClient, command: &C) -> Result<C::Reply> {
    qmp.call(command).await.map_err(|source| Error::Qmp { command: C::NAME, source })
}

/// A 12-hex-digit tag for short-lived nodes and jobs.
pub fn fresh_tag() -> String {
    LayerId::random().to_string()
}

/// Node and object names for one volume or one temporary opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    tag: String,
}

impl Names {
    /// Names under `tag` (a volume uid or a fresh tag).
    pub fn new(tag: impl Into<String>) -> Self {
        Names { tag: tag.into() }
    }

    /// The qcow2 node of `layer` in this opening.
    pub fn format(&self, layer: LayerId) -> String {
        format!("q-{}-{layer}", self.tag)
    }

    /// The file node of `layer` in this opening.
    pub fn file(&self, layer: LayerId) -> String {
        format!("f-{}-{layer}", self.tag)
    }

    /// The throttle filter node.
    pub fn throttle(&self) -> String {
        format!("t-{}", self.tag)
    }

    /// The throttle group object.
    pub fn group(&self) -> String {
        format!("g-{}", self.tag)
    }

    /// The export id (and NBD export name).
    pub fn export(&self) -> String {
        format!("x-{}", self.tag)
    }

    /// A job id for `what` on this volume, unique per call.
    pub fn job(&self, what: &str) -> String {
        format!("{what}-{}-{}", self.tag, fresh_tag())
    }
}

/// One layer: its qcow2 node over its file node, with `backing` below it (`None`: explicitly
/// none). Discards are passed down (`unmap`) so a guest's TRIM gives space back to the pool.
pub fn layer_options(
    pool: &Pool,
    names: &Names,
    layer: LayerId,
    read_only: bool,
    backing: Option<BlockdevOptions>,
) -> BlockdevOptions {
    let read_only = read_only.then_some(true);
    BlockdevOptions::Qcow2 {
        node_name: names.format(layer),
        file: Box::new(BlockdevRef::Definition(BlockdevOptions::File {
            node_name: names.file(layer),
            filename: pool.layer_path(layer).display().to_string(),
            read_only,
            discard: Some("unmap"),
            cache: None,
        })),
        backing: Some(backing.map(|b| Box::new(BlockdevRef::Definition(b)))),
        read_only,
        discard: Some("unmap"),
        l2_cache_size: None,
    }
}

/// Sets the L2 cache of a qcow2 definition's top node (an attached volume's head).
pub fn with_l2_cache(mut options: BlockdevOptions, size: Option<u64>) -> BlockdevOptions {
    if let BlockdevOptions::Qcow2 { l2_cache_size, .. } = &mut options {
        *l2_cache_size = size;
    }
    options
}

/// The nested `blockdev-add` definition of a chain (top first). The bottom layer gets an
/// explicit `backing: null`, so the records, not the image headers, define the graph. Only the
/// top can be opened read-only on request; lower layers are read-only as backing children.
/// An empty chain (no record names one) is an error, not a panic.
pub fn chain_options(
    pool: &Pool,
    names: &Names,
    chain: &[LayerId],
    read_only: bool,
) -> Result<BlockdevOptions> {
    let (top, below) = chain.split_first().ok_or_else(|| {
        Error::Inconsistent(format!("opening {}: an empty layer chain", names.tag))
    })?;
    let backing = below
        .iter()
        .rev()
        .fold(None, |under, layer| Some(layer_options(pool, names, *layer, false, under)));
    Ok(layer_options(pool, names, *top, read_only, backing))
}

/// Opens a chain as nodes named by `names`; returns the top qcow2 node's name.
pub async fn open_chain(
    qmp: &QmpClient,
    pool: &Pool,
    names: &Names,
    chain: &[LayerId],
    read_only: bool,
) -> Result<String> {
    add_definition(qmp, chain_options(pool, names, chain, read_only)?).await
}

/// Adds a nested node definition; returns its top node's name.
async fn add_definition(qmp: &QmpClient, options: BlockdevOptions) -> Result<String> {
    let top = options.node_name().to_owned();
    call(qmp, &BlockdevAdd(options)).await?;
    Ok(top)
}

/// Opens a new, empty layer to be filled by a copy job: its file node bypasses the host's page
/// cache (O_DIRECT), so the copy is not staged in the page cache and written back behind it.
/// Measured on a 1 GiB copy (docs/benchmarks.md): 2.6 s buffered against 0.65 s direct on QEMU
/// 11.1; 7.2 gains too. A filesystem without O_DIRECT (tmpfs before Linux 6.6) gets a buffered
/// node. Returns the qcow2 node's name.
pub async fn open_copy_target(
    qmp: &QmpClient,
    pool: &Pool,
    names: &Names,
    layer: LayerId,
) -> Result<String> {
    let mut options = layer_options(pool, names, layer, false, None);
    let top = options.node_name().to_owned();
    if let BlockdevOptions::Qcow2 { file, .. } = &mut options {
        if let BlockdevRef::Definition(BlockdevOptions::File { cache, .. }) = file.as_mut() {
            *cache = Some(FileCache { direct: true });
        }
    }
    match call(qmp, &BlockdevAdd(options)).await {
        Ok(_) => Ok(top),
        Err(e) if e.qmp_desc_contains("O_DIRECT") || e.qmp_desc_contains("Invalid argument") => {
            open_chain(qmp, pool, names, &[layer], false).await
        }
        Err(e) => Err(e),
    }
}

/// Deletes the monitor-owned qcow2 nodes of a chain, top first. Nodes that are only children
/// (freed with their parent) or already gone are skipped.
pub async fn close_chain(qmp: &QmpClient, names: &Names, chain: &[LayerId]) -> Result<()> {
    for layer in chain {
        delete_node_if_owned(qmp, &names.format(*layer)).await?;
    }
    Ok(())
}

/// `blockdev-del` that treats "not found" and "not owned by the monitor" as done.
pub async fn delete_node_if_owned(qmp: &QmpClient, node: &str) -> Result<()> {
    match call(qmp, &BlockdevDel { node_name: node.to_owned() }).await {
        Ok(_) => Ok(()),
        Err(e)
            if e.qmp_desc_contains("Failed to find node")
                || e.qmp_desc_contains("not owned by the monitor")
                || e.qmp_desc_contains("Cannot find") =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// How a volume is exported from the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportKind {
    /// On the daemon's NBD server (unix socket); for the nbd and ublk kernel devices.
    Nbd,
    /// A FUSE file; for a loop device.
    Fuse,
    /// A vhost-user-blk socket; for VMs.
    VhostUserBlk,
}

/// Where a client reaches an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportEndpoint {
    /// The export type.
    pub kind: ExportKind,
    /// NBD: the server socket; FUSE: the file; vhost-user-blk: the socket.
    pub path: PathBuf,
    /// NBD export name (also the export id).
    pub name: String,
    /// Every write is flushed before it is acknowledged. The kernel NBD client re-sends a flush
    /// that was in flight when the daemon died to the restarted daemon, which has lost the dead
    /// one's unflushed qcow2 metadata: without this, that flush would vouch for lost writes.
    #[serde(default)]
    pub writethrough: bool,
}

/// Starts the daemon's NBD server on `socket` unless it already runs.
pub async fn ensure_nbd_server(qmp: &QmpClient, socket: &Path) -> Result<()> {
    let start = NbdServerStart {
        addr: LegacyUnixAddress {
            kind: "unix",
            data: LegacyUnixData { path: socket.display().to_string() },
        },
    };
    match call(qmp, &start).await {
        Ok(_) => Ok(()),
        Err(e) if e.qmp_desc_contains("already running") => Ok(()),
        Err(e) => Err(e),
    }
}

/// The `block-export-add` for a volume.
pub fn export_command(names: &Names, endpoint: &ExportEndpoint) -> BlockExportAdd {
    let id = names.export();
    let node_name = names.throttle();
    let path = endpoint.path.display().to_string();
    match endpoint.kind {
        ExportKind::Nbd => BlockExportAdd::Nbd {
            id: id.clone(),
            node_name,
            name: id,
            writable: true,
            writethrough: endpoint.writethrough,
        },
        ExportKind::Fuse => {
            BlockExportAdd::Fuse { id, node_name, mountpoint: path, writable: true }
        }
        ExportKind::VhostUserBlk => BlockExportAdd::VhostUserBlk {
            id,
            node_name,
            addr: UnixSocketAddress { kind: "unix", path },
            writable: true,
        },
    }
}

/// Adds the export, preparing its mountpoint or socket path first.
pub async fn add_export(qmp: &QmpClient, names: &Names, endpoint: &ExportEndpoint) -> Result<()> {
    if endpoint.kind == ExportKind::Fuse {
        prepare_fuse_mountpoint(&endpoint.path).await?;
    }
    call(qmp, &export_command(names, endpoint)).await?;
    Ok(())
}

/// The FUSE export mounts over an existing regular file. A daemon killed while exporting leaves
/// a dead FUSE mount there; detach it before mounting again.
async fn prepare_fuse_mountpoint(path: &Path) -> Result<()> {
    if crate::mount::is_mountpoint(path) {
        crate::command::run("umount", &["-l".as_ref(), path.as_os_str()]).await?;
    }
    if !path.exists() {
        std::fs::File::create(path).map_err(|e| Error::io("create FUSE mountpoint", path, e))?;
    }
    Ok(())
}

/// Deletes an export and waits until the daemon reports it gone. `hard` disconnects clients.
pub async fn delete_export(qmp: &QmpClient, id: &str, hard: bool) -> Result<()> {
    let mut events = qmp.subscribe();
    let del = BlockExportDel { id: id.to_owned(), mode: hard.then_some("hard") };
    match call(qmp, &del).await {
        Ok(_) => {}
        Err(e) if e.qmp_desc_contains("not found") => return Ok(()),
        Err(e) => return Err(e),
    }
    while let Some(event) = events.recv().await {
        if event.event == "BLOCK_EXPORT_DELETED"
            && event.data.get("id").and_then(|v| v.as_str()) == Some(id)
        {
            return Ok(());
        }
    }
    Err(Error::Qmp { command: "block-export-del", source: crate::qmp::QmpError::Disconnected })
}

/// Builds a volume's graph: throttle group, chain, throttle node, export. Undoes what it built
/// if a step fails.
pub async fn attach(
    qmp: &QmpClient,
    pool: &Pool,
    names: &Names,
    chain: &[LayerId],
    qos: Qos,
    l2_cache_size: Option<u64>,
    endpoint: &ExportEndpoint,
) -> Result<()> {
    let result = async {
        call(
            qmp,
            &ObjectAddThrottleGroup {
                qom_type: "throttle-group",
                id: names.group(),
                limits: throttle_limits(qos),
            },
        )
        .await?;
        let head = with_l2_cache(chain_options(pool, names, chain, false)?, l2_cache_size);
        let top = add_definition(qmp, head).await?;
        call(
            qmp,
            &BlockdevAdd(BlockdevOptions::Throttle {
                node_name: names.throttle(),
                throttle_group: names.group(),
                file: Box::new(BlockdevRef::Node(top)),
                discard: Some("unmap"),
            }),
        )
        .await?;
        add_export(qmp, names, endpoint).await
    }
    .await;
    if result.is_err() {
        if let Err(e) = detach(qmp, names, chain).await {
            tracing::warn!(error = %e, "cleaning up after a failed attach");
        }
    }
    result
}

/// Tears a volume's graph down in the safe order; every step tolerates a missing piece, so it
/// also cleans up after a half-built or half-removed graph.
pub async fn detach(qmp: &QmpClient, names: &Names, chain: &[LayerId]) -> Result<()> {
    delete_export(qmp, &names.export(), false).await?;
    delete_node_if_owned(qmp, &names.throttle()).await?;
    close_chain(qmp, names, chain).await?;
    match call(qmp, &ObjectDel { id: names.group() }).await {
        Ok(_) => Ok(()),
        Err(e) if e.qmp_desc_contains("not found") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Grows an attached volume to `size` bytes. At the root: a filter above a resized node keeps
/// its old cached length. The NBD export refuses resize, so it is dropped (clients reconnect),
/// the volume resized, and the export added again.
pub async fn resize_attached(
    qmp: &QmpClient,
    names: &Names,
    endpoint: &ExportEndpoint,
    size: u64,
) -> Result<()> {
    let re_export = match endpoint.kind {
        ExportKind::Nbd => true,
        // QEMU after 7.2 tells a vhost-user-blk client of the new size, and with no client
        // connected that message goes to a device never set up: 11.1 segfaults (7.2 does not;
        // the versions between are untested and treated like 11.1). Without a client, the
        // export is taken down around the resize instead; a connected client hears of it.
        ExportKind::VhostUserBlk => {
            qmp.version().at_least(8, 0) && !unix_socket_has_peer(&endpoint.path)
        }
        ExportKind::Fuse => false,
    };
    if re_export {
        delete_export(qmp, &names.export(), true).await?;
        let resized = resize_node(qmp, names.throttle(), size).await;
        add_export(qmp, names, endpoint).await?;
        resized
    } else {
        resize_node(qmp, names.throttle(), size).await
    }
}

/// True when some process holds a connection accepted on the listening unix socket at `path`
/// (the kernel lists accepted sockets under their listener's path in `/proc/net/unix`, state
/// 03, connected).
fn unix_socket_has_peer(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else { return false };
    socket_table_has_peer(&table, &path.to_string_lossy())
}

fn socket_table_has_peer(table: &str, path: &str) -> bool {
    // Num RefCount Protocol Flags Type St Inode Path
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8 && fields[5] == "03" && fields[7] == path
    })
}

/// Grows a detached volume's head layer to `size` bytes. Only the head is opened: a head is
/// never smaller than its backing layers, so nothing below could need zeroing (O(1) in depth).
pub async fn resize_offline(qmp: &QmpClient, pool: &Pool, head: LayerId, size: u64) -> Result<()> {
    let names = Names::new(fresh_tag());
    let top = open_chain(qmp, pool, &names, &[head], false).await?;
    let resized = resize_node(qmp, top, size).await;
    close_chain(qmp, &names, &[head]).await?;
    resized
}

/// Replaces an attached volume's I/O limits, live (`qom-set` on its throttle group).
pub async fn set_limits(qmp: &QmpClient, names: &Names, qos: Qos) -> Result<()> {
    let set = QomSetLimits { path: names.group(), property: "limits", value: throttle_limits(qos) };
    call(qmp, &set).await.map(drop)
}

#[cfg(test)]
mod tests;
