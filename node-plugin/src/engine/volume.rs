//! Volume lifecycle: create (empty, from a snapshot, as a clone), delete, expand, QoS.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::plan::{self, Growth};
use super::EngineCore;
use crate::error::{Error, Result};
use crate::graph::{self, ExportKind, Names, NewImage};
use crate::pool::id::{parse_size, IdKind, ObjectId, PoolName};
use crate::pool::{LayerId, LayerRecord, Pool, RecordedSource, VolumeRecord};
pub use qsd_csi_model::volume::{
    CloneMode, CreateVolume, Format, Preallocation, Qos, RemoteSource, VolumeSource,
};

/// The head image of a new volume.
#[derive(Debug, Clone, Copy)]
pub(super) struct NewHead {
    /// Virtual size.
    pub size: u64,
    /// The layer it overlays, if any.
    pub backing: Option<LayerId>,
    /// Its allocation.
    pub preallocation: Preallocation,
}

/// What callers see of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The volume's ID.
    pub id: ObjectId,
    /// Virtual size in bytes.
    pub size: u64,
    /// Layers in its chain, head included.
    pub chain_depth: usize,
    /// Where its content came from, by the source's ID.
    pub source: Option<VolumeSource>,
    /// Its export, if attached.
    pub export: Option<ExportKind>,
    /// The labels it was created with.
    pub labels: BTreeMap<String, String>,
    /// How it grows itself, if it does.
    pub auto_expand: Option<qsd_csi_model::grow::AutoExpand>,
}

/// What the metrics report of a volume, read from the pool's index and the attachment journal
/// only (no QMP, no volume lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFacts {
    /// The volume's ID.
    pub id: ObjectId,
    /// Its pool.
    pub pool: PoolName,
    /// The labels it was created with (the claim's namespace and name).
    pub labels: BTreeMap<String, String>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Layers in its chain, head included.
    pub chain_depth: usize,
    /// Its head image's file.
    pub head: std::path::PathBuf,
    /// Its export, if attached here.
    pub export: Option<ExportKind>,
    /// Where its write threshold is armed (host bytes of the head), if it is.
    pub threshold: Option<u64>,
}

/// What the metrics report of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFacts {
    /// Its name.
    pub name: PoolName,
    /// Its directory.
    pub root: std::path::PathBuf,
    /// Volumes, snapshots and layers in its index.
    pub volumes: usize,
    /// Snapshots.
    pub snapshots: usize,
    /// Layers (qcow2 images).
    pub layers: usize,
}

/// What a volume's record keeps of the source a request names: its name in the pool.
pub(super) fn source_label(
    source: &Option<VolumeSource>,
    engine: &EngineCore,
) -> Result<Option<RecordedSource>> {
    Ok(match source {
        None => None,
        Some(VolumeSource::Snapshot(id)) => {
            Some(RecordedSource::Snapshot(engine.resolve(IdKind::Snapshot, id)?.1.name))
        }
        Some(VolumeSource::Volume(id)) => {
            Some(RecordedSource::Volume(engine.resolve(IdKind::Volume, id)?.1.name))
        }
    })
}

impl EngineCore {
    pub(super) fn volume_info(&self, pool: &Pool, record: &VolumeRecord) -> Result<VolumeInfo> {
        Ok(VolumeInfo {
            id: self.volume_id(pool, record)?,
            size: record.size,
            chain_depth: pool.chain(record.head)?.len(),
            source: self.recorded_source(pool, record.source.as_ref())?,
            export: self.journal.get(record.uid).map(|a| a.endpoint.kind),
            labels: record.labels.clone(),
            auto_expand: record.auto_expand,
        })
    }

    /// A volume record's source (a snapshot or volume in the same pool) as the source's ID.
    fn recorded_source(
        &self,
        pool: &Pool,
        recorded: Option<&RecordedSource>,
    ) -> Result<Option<VolumeSource>> {
        Ok(match recorded {
            Some(RecordedSource::Snapshot(name)) => {
                Some(VolumeSource::Snapshot(self.object_id(IdKind::Snapshot, pool, name)?))
            }
            Some(RecordedSource::Volume(name)) => {
                Some(VolumeSource::Volume(self.volume_id_by_name(pool, name)?))
            }
            Some(RecordedSource::Copied(source)) => Some(source.clone()),
            Some(RecordedSource::Unknown(_)) | None => None,
        })
    }

    /// Validates the depth limit of a request.
    pub(super) fn max_depth(&self, requested: Option<u32>) -> Result<u32> {
        match requested.unwrap_or(self.config.default_max_chain_depth.max(1)) {
            0 => Err(Error::invalid("maxChainDepth", "must be at least 1")),
            d if d > 64 => Err(Error::invalid("maxChainDepth", "must be at most 64")),
            d => Ok(d),
        }
    }

    /// An existing volume answers a re-create only if size and source match.
    pub(super) fn check_recreate(
        &self,
        pool: &Pool,
        existing: &VolumeRecord,
        request: &CreateVolume,
        size: u64,
        source: &Option<RecordedSource>,
    ) -> Result<VolumeInfo> {
        plan::recreate(existing, size, request.limit, source)?;
        self.volume_info(pool, existing)
    }

    /// Creates a volume: empty and thin, a linked overlay on a snapshot, or a full clone.
    /// Idempotent by name.
    pub async fn create_volume(self: &Arc<Self>, request: &CreateVolume) -> Result<VolumeInfo> {
        request.format.check()?;
        if request.remote.is_some() {
            return self.start_remote_copy(request).await?.finish_detached().await;
        }
        if request.keep_id.is_some() {
            return Err(Error::invalid("keep_id", "only a copy from another node keeps an ID"));
        }
        match &request.source {
            Some(VolumeSource::Snapshot(_)) => self.restore_snapshot(request).await,
            Some(VolumeSource::Volume(_)) if request.clone_mode == CloneMode::Linked => {
                self.linked_clone(request).await
            }
            Some(VolumeSource::Volume(_)) => {
                let task = self.start_clone_with_speed(request, request.clone_bandwidth).await?;
                task.finish_detached().await
            }
            None => self.create_empty(request).await,
        }
    }

    async fn create_empty(&self, request: &CreateVolume) -> Result<VolumeInfo> {
        let size = parse_size(request.size.ok_or_else(|| Error::invalid("size", "is required"))?)?;
        let max_chain_depth = self.max_depth(request.max_chain_depth)?;
        let pool = self.requested_pool(&request.pool)?;
        self.object_id(IdKind::Volume, &pool, &request.name)?;
        let _guard = self.lock(vec![Self::key(IdKind::Volume, &pool, &request.name)])?;
        if let Some(existing) = pool.volume(&request.name) {
            return self.check_recreate(&pool, &existing, request, size, &None);
        }
        plan::room_for(pool.name().as_str(), request.preallocation, size, || {
            Ok(crate::mount::usage(pool.root())?.bytes_available)
        })?;
        let _graph = self.graph.change().await;
        let head = NewHead { size, backing: None, preallocation: request.preallocation };
        self.create_with_head(&pool, request, head, max_chain_depth, None).await
    }

    /// Creates a new volume's head image (over `backing`, if any) and records the volume.
    /// Callers hold the new volume's guard and the graph read lock.
    pub(super) async fn create_with_head(
        &self,
        pool: &Pool,
        request: &CreateVolume,
        head: NewHead,
        max_chain_depth: u32,
        source: Option<RecordedSource>,
    ) -> Result<VolumeInfo> {
        let id = LayerId::random();
        let _intent = self.operations.begin(super::ops::Operation::NewVolume {
            pool: pool.name().clone(),
            name: request.name.clone(),
            head: id,
        })?;
        let image = NewImage {
            path: &pool.layer_path(id),
            size: head.size,
            backing: head.backing.map(Pool::layer_file_name),
            preallocation: head.preallocation,
            format: request.format,
        };
        graph::create_image(&self.daemon.qmp(), image).await?;
        crate::fault_point!("create:after-image");
        let mut record = super::clone::new_record(request, head.size, id, max_chain_depth, source);
        record.preallocation = head.preallocation;
        self.commit_new_volume(pool, LayerRecord { id, backing: head.backing }, record)
    }

    /// Records a new volume whose head image exists; on failure removes the image again.
    pub(super) fn commit_new_volume(
        &self,
        pool: &Pool,
        head: LayerRecord,
        record: VolumeRecord,
    ) -> Result<VolumeInfo> {
        let id = head.id;
        let written = pool.put_layer(head).and_then(|_| {
            crate::fault_point!("create:after-layer-record");
            pool.put_volume(record.clone())
        });
        if let Err(e) = written {
            let _ = pool.release(id);
            let _ = std::fs::remove_file(pool.layer_path(id));
            return Err(e);
        }
        self.volume_info(pool, &record)
    }

    /// Deletes a volume. Layers that snapshots or other volumes still need stay.
    pub async fn delete_volume(&self, id: &ObjectId) -> Result<()> {
        let (pool, parsed, record) = self.resolve_volume(id)?;
        let _guard = self.lock(vec![Self::key(IdKind::Volume, &pool, &parsed.name)])?;
        if let Some(attachment) = self.journal.get(record.uid) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is attached ({:?} export); detach it first",
                attachment.endpoint.kind
            )));
        }
        self.held_here(&pool, &record, id)?;
        let deleted = pool.remove_volume(&record.name)?;
        tracing::info!(volume = %id, layers_deleted = deleted.len(), "deleted volume");
        Ok(())
    }

    /// A volume by ID.
    pub fn get_volume(&self, id: &ObjectId) -> Result<VolumeInfo> {
        let (pool, _, record) = self.resolve_volume(id)?;
        self.volume_info(&pool, &record)
    }

    /// Every volume in every pool.
    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut all = Vec::new();
        for pool in self.pools()? {
            for record in pool.volumes() {
                all.push(self.volume_info(&pool, &record)?);
            }
        }
        Ok(all)
    }

    /// Every pool's and volume's facts for the metrics: local pools' volumes all, shared
    /// pools' those attached here (the node holding one reports it).
    pub fn facts(&self) -> (Vec<PoolFacts>, Vec<VolumeFacts>) {
        let (mut pools, mut volumes) = (Vec::new(), Vec::new());
        for pool in self.pools.values() {
            let records = pool.volumes();
            pools.push(PoolFacts {
                name: pool.name().clone(),
                root: pool.root().to_owned(),
                volumes: records.len(),
                snapshots: pool.snapshots().len(),
                layers: pool.layer_ids().len(),
            });
            for record in records {
                let attachment = self.journal.get(record.uid);
                if pool.kind() == crate::pool::PoolKind::Shared && attachment.is_none() {
                    continue;
                }
                let Ok(id) = self.volume_id(pool, &record) else { continue };
                volumes.push(VolumeFacts {
                    id,
                    pool: pool.name().clone(),
                    size: record.size,
                    chain_depth: pool.chain(record.head).map_or(0, |c| c.len()),
                    head: pool.layer_path(record.head),
                    export: attachment.as_ref().map(|a| a.endpoint.kind),
                    threshold: attachment.and_then(|a| a.threshold).map(|t| t.armed_at),
                    labels: record.labels,
                });
            }
        }
        (pools, volumes)
    }

    /// Grows a volume (online through the export, or offline). Returns the new size.
    pub async fn expand_volume(&self, id: &ObjectId, requested: i64) -> Result<u64> {
        let size = parse_size(requested)?;
        let (pool, parsed, record) = self.resolve_volume(id)?;
        let _guard = self.lock(vec![Self::key(IdKind::Volume, &pool, &parsed.name)])?;
        let record = pool.volume(&record.name).unwrap_or(record);
        // Attached or not cannot change under the volume's guard; the endpoint can (a restarted
        // daemon's), so it is read again under the graph lock.
        let attached = self.journal.get(record.uid).is_some();
        let growth = plan::growth(record.size, size, requested, attached)?;
        if growth == Growth::None {
            return Ok(size);
        }
        self.held_here(&pool, &record, id)?;
        let _graph = self.graph.change().await;
        let qmp = self.daemon.qmp();
        let _intent = self.operations.begin(super::ops::Operation::Expand {
            pool: pool.name().clone(),
            name: record.name.clone(),
            size,
            head: record.head,
        })?;
        match self.journal.get(record.uid).filter(|_| growth == Growth::Online) {
            Some(attachment) => {
                let names = Names::new(record.uid.to_string());
                graph::resize_attached(&qmp, &names, &attachment.endpoint, size).await?;
                if let Err(e) = self.rearm_for_size(&record, size).await {
                    tracing::warn!(volume = %id, error = %e, "moving the write threshold to the new size failed");
                }
            }
            None => graph::resize_offline(&qmp, &pool, record.head, size).await?,
        }
        crate::fault_point!("expand:after-resize");
        pool.put_volume(VolumeRecord { size, ..record })?;
        Ok(size)
    }

    /// Changes a volume's I/O limits; applied live when attached.
    pub async fn set_qos(&self, id: &ObjectId, qos: Qos) -> Result<()> {
        let (pool, parsed, record) = self.resolve_volume(id)?;
        let _guard = self.lock(vec![Self::key(IdKind::Volume, &pool, &parsed.name)])?;
        self.held_here(&pool, &record, id)?;
        let _graph = self.graph.change().await;
        if self.journal.get(record.uid).is_some() {
            let names = Names::new(record.uid.to_string());
            graph::set_limits(&self.daemon.qmp(), &names, qos).await?;
        }
        pool.put_volume(VolumeRecord { qos, ..record })
    }
}
