//! Block jobs: backup, stream and commit (manual finalize and dismiss), their speed, and the
//! job verbs and listing.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::Command;

/// Options shared by the block jobs we start with manual finalize and dismiss.
#[derive(Debug, Clone, Serialize)]
pub struct ManualJob {
    /// Always false: we finalize when the job is pending.
    #[serde(rename = "auto-finalize")]
    pub auto_finalize: bool,
    /// Always false: we read the job's error before dismissing it.
    #[serde(rename = "auto-dismiss")]
    pub auto_dismiss: bool,
}

impl ManualJob {
    /// Manual finalize and dismiss.
    pub const MANUAL: ManualJob = ManualJob { auto_finalize: false, auto_dismiss: false };
}

/// `blockdev-backup` (a job).
#[derive(Debug, Serialize)]
pub struct BlockdevBackup {
    /// Job id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// Source node.
    pub device: String,
    /// Target node.
    pub target: String,
    /// Always `full` for clones.
    pub sync: &'static str,
    /// Bytes per second; 0 = unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// Finalize / dismiss mode.
    #[serde(flatten)]
    pub manual: ManualJob,
}
command!(BlockdevBackup, "blockdev-backup", IgnoredAny);

/// `block-stream` (a job): copy the data of the layers between `base-node` and `device` into
/// `device`, then make `base-node` its backing.
#[derive(Debug, Serialize)]
pub struct BlockStream {
    /// Job id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// The node that receives the data.
    pub device: String,
    /// The new backing node (none: stream everything).
    #[serde(rename = "base-node", skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
    /// Backing string to write into `device`'s header.
    #[serde(rename = "backing-file", skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Finalize / dismiss mode.
    #[serde(flatten)]
    pub manual: ManualJob,
}
command!(BlockStream, "block-stream", IgnoredAny);

/// `block-commit` (a job): merge `top-node` into `base-node`. We always pass `top-node`.
#[derive(Debug, Serialize)]
pub struct BlockCommit {
    /// Job id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// The root node of the graph containing the chain.
    pub device: String,
    /// The layer whose data moves down.
    #[serde(rename = "top-node")]
    pub top_node: String,
    /// The layer that receives it.
    #[serde(rename = "base-node")]
    pub base_node: String,
    /// Backing string to write into the overlay of `top-node`.
    #[serde(rename = "backing-file", skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Finalize / dismiss mode.
    #[serde(flatten)]
    pub manual: ManualJob,
}
command!(BlockCommit, "block-commit", IgnoredAny);

/// `block-job-set-speed`.
#[derive(Debug, Serialize)]
pub struct BlockJobSetSpeed {
    /// Job id.
    pub device: String,
    /// Bytes per second; 0 = unlimited.
    pub speed: u64,
}
command!(BlockJobSetSpeed, "block-job-set-speed", IgnoredAny);

/// `job-finalize`.
#[derive(Debug, Serialize)]
pub struct JobFinalize {
    /// Job id.
    pub id: String,
}
command!(JobFinalize, "job-finalize", IgnoredAny);

/// `job-dismiss`.
#[derive(Debug, Serialize)]
pub struct JobDismiss {
    /// Job id.
    pub id: String,
}
command!(JobDismiss, "job-dismiss", IgnoredAny);

/// `job-cancel`.
#[derive(Debug, Serialize)]
pub struct JobCancel {
    /// Job id.
    pub id: String,
}
command!(JobCancel, "job-cancel", IgnoredAny);

/// `query-jobs`.
#[derive(Debug, Serialize)]
pub struct QueryJobs {}
command!(QueryJobs, "query-jobs", Vec<JobInfo>);

/// One job as reported by `query-jobs`.
#[derive(Debug, Clone, Deserialize)]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Job type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Status (created, running, pending, concluded, ...).
    pub status: String,
    /// Work done.
    #[serde(rename = "current-progress")]
    pub current_progress: u64,
    /// Work in total.
    #[serde(rename = "total-progress")]
    pub total_progress: u64,
    /// Set when the job failed.
    pub error: Option<String>,
}
