//! CSI SnapshotMetadata: changed-block tracking for backup tools, answered by the node whose
//! pool holds the snapshots (its engine reads the qcow2 chain) and streamed through.
//!
//! ```text
//!   GetMetadataAllocated(snap)        ─► agent SnapshotChanges(target)       ─► stream
//!   GetMetadataDelta(base, target)    ─► agent SnapshotChanges(base, target) ─► stream
//! ```
//! Ranges are VARIABLE_LENGTH, in offset order, whole qcow2 clusters.

use qsd_csi_model::id::IdKind;
use qsd_csi_proto::agent;
use qsd_csi_proto::csi::{self, snapshot_metadata_server::SnapshotMetadata};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::agents::Agents;
use crate::error::{required, ControllerError};

/// The SnapshotMetadata service.
#[derive(Debug, Clone)]
pub struct MetadataService {
    agents: Agents,
}

impl MetadataService {
    /// Snapshot metadata through `agents`.
    pub fn new(agents: Agents) -> Self {
        MetadataService { agents }
    }

    /// The agent's ranges for (`base`, `target`) from `start`, `max_results` per message.
    async fn changes(
        &self,
        base: &str,
        target: &str,
        start: i64,
        max_results: i32,
    ) -> Result<impl Stream<Item = Result<(i64, Vec<csi::BlockMetadata>), Status>>, Status> {
        if start < 0 {
            return Err(
                ControllerError::OutOfRange("starting_offset must not be negative".into()).into()
            );
        }
        if max_results < 0 {
            return Err(
                ControllerError::Unsupported("max_results must not be negative".into()).into()
            );
        }
        let stream = self
            .agents
            .for_id(IdKind::Snapshot, target)
            .await?
            .snapshot_changes(agent::ChangesRequest {
                base_snapshot_id: base.to_owned(),
                target_snapshot_id: target.to_owned(),
                starting_offset: start as u64,
                max_results: max_results as u32,
            })
            .await?;
        Ok(stream.map(|batch| {
            batch.map(|b| {
                let ranges = b
                    .ranges
                    .iter()
                    .map(|r| csi::BlockMetadata {
                        byte_offset: r.offset as i64,
                        size_bytes: r.length as i64,
                    })
                    .collect();
                (b.volume_size_bytes as i64, ranges)
            })
        }))
    }
}

type Streamed<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotMetadata for MetadataService {
    type GetMetadataAllocatedStream = Streamed<csi::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Streamed<csi::GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        request: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let req = request.into_inner();
        required("snapshot_id", &req.snapshot_id)?;
        let stream =
            self.changes("", &req.snapshot_id, req.starting_offset, req.max_results).await?;
        Ok(Response::new(Box::pin(stream.map(|batch| {
            batch.map(|(size, block_metadata)| csi::GetMetadataAllocatedResponse {
                block_metadata_type: csi::BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes: size,
                block_metadata,
            })
        }))))
    }

    async fn get_metadata_delta(
        &self,
        request: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let req = request.into_inner();
        required("base_snapshot_id", &req.base_snapshot_id)?;
        required("target_snapshot_id", &req.target_snapshot_id)?;
        let stream = self
            .changes(
                &req.base_snapshot_id,
                &req.target_snapshot_id,
                req.starting_offset,
                req.max_results,
            )
            .await?;
        Ok(Response::new(Box::pin(stream.map(|batch| {
            batch.map(|(size, block_metadata)| csi::GetMetadataDeltaResponse {
                block_metadata_type: csi::BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes: size,
                block_metadata,
            })
        }))))
    }
}
