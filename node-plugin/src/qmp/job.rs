//! Block jobs driven by their events.
//!
//! A [`Job`] subscribes to events *before* the command that starts it, so no status change can be
//! missed. It finalizes a job that reaches `pending` (for jobs started with manual finalize),
//! and on `concluded` reads the job's error with `query-jobs`, dismisses it and returns the
//! outcome. There are no polling sleeps: every step waits on an event.

use tokio::sync::mpsc;

use super::commands::{BlockJobSetSpeed, Command, JobDismiss, JobFinalize, QueryJobs};
use super::{Event, QmpClient};
use crate::error::{Error, Result};

/// How a job was started.
#[derive(Debug, Clone, Copy)]
pub struct JobOptions {
    /// The job was started with `auto-finalize: false`: finalize it when it is pending.
    pub manual_finalize: bool,
}

/// A running block job.
#[derive(Debug)]
pub struct Job {
    client: QmpClient,
    id: String,
    kind: &'static str,
    events: mpsc::UnboundedReceiver<Event>,
    options: JobOptions,
    status: String,
}

impl Job {
    /// Starts a job with `command` (whose `job-id` must be `id`) and returns a handle to it.
    pub async fn start<C: Command>(
        client: &QmpClient,
        id: String,
        kind: &'static str,
        command: &C,
        options: JobOptions,
    ) -> Result<Job> {
        let events = client.subscribe();
        client.call(command).await.map_err(|source| Error::Qmp { command: C::NAME, source })?;
        Ok(Job { client: client.clone(), id, kind, events, options, status: "created".into() })
    }

    /// Runs a job to its end.
    pub async fn run<C: Command>(
        client: &QmpClient,
        id: String,
        kind: &'static str,
        command: &C,
        options: JobOptions,
    ) -> Result<()> {
        Job::start(client, id, kind, command, options).await?.wait().await
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Changes the job's rate limit (bytes per second, 0 = unlimited).
    pub async fn set_speed(&self, speed: u64) -> Result<()> {
        self.client
            .call(&BlockJobSetSpeed { device: self.id.clone(), speed })
            .await
            .map_err(|source| Error::Qmp { command: BlockJobSetSpeed::NAME, source })?;
        Ok(())
    }

    /// Progress as (done, total), if the daemon still knows the job.
    pub async fn progress(&self) -> Result<Option<(u64, u64)>> {
        progress(&self.client, &self.id).await
    }

    /// Waits until the job has left `created` (it is running, or already further along).
    pub async fn running(&mut self) -> Result<()> {
        while self.status == "created" {
            self.next_status().await?;
        }
        Ok(())
    }

    /// Waits for the job to end; finalizes and dismisses it; returns its error if it failed.
    pub async fn wait(mut self) -> Result<()> {
        loop {
            match self.status.as_str() {
                "pending" if self.options.manual_finalize => {
                    self.client
                        .call(&JobFinalize { id: self.id.clone() })
                        .await
                        .map_err(|source| Error::Qmp { command: JobFinalize::NAME, source })?;
                }
                "concluded" => return self.conclude().await,
                _ => {}
            }
            self.next_status().await?;
        }
    }

    async fn next_status(&mut self) -> Result<()> {
        loop {
            let Some(event) = self.events.recv().await else {
                return Err(Error::Qmp {
                    command: "job event stream",
                    source: super::QmpError::Disconnected,
                });
            };
            if event.event != "JOB_STATUS_CHANGE" {
                continue;
            }
            if event.data.get("id").and_then(|v| v.as_str()) != Some(self.id.as_str()) {
                continue;
            }
            if let Some(status) = event.data.get("status").and_then(|v| v.as_str()) {
                self.status = status.to_owned();
                return Ok(());
            }
        }
    }

    async fn conclude(self) -> Result<()> {
        let jobs = self
            .client
            .call(&QueryJobs {})
            .await
            .map_err(|source| Error::Qmp { command: QueryJobs::NAME, source })?;
        let error = jobs.into_iter().find(|j| j.id == self.id).and_then(|j| j.error);
        self.client
            .call(&JobDismiss { id: self.id.clone() })
            .await
            .map_err(|source| Error::Qmp { command: JobDismiss::NAME, source })?;
        match error {
            None => Ok(()),
            Some(message) => Err(Error::Job { job: self.id, kind: self.kind.to_owned(), message }),
        }
    }
}

/// The progress of job `id` as (done, total), if the daemon knows the job.
pub async fn progress(client: &QmpClient, id: &str) -> Result<Option<(u64, u64)>> {
    let jobs = client
        .call(&QueryJobs {})
        .await
        .map_err(|source| Error::Qmp { command: QueryJobs::NAME, source })?;
    Ok(jobs.into_iter().find(|j| j.id == id).map(|j| (j.current_progress, j.total_progress)))
}

/// How long [`settle_jobs`] waits for cancelled jobs to conclude.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Cancels every block job the daemon runs and dismisses each once it has concluded. After a
/// restart no job has an owner in this process: the operation it served is completed or undone
/// from its intent (`engine::ops`), and a cancelled job changed nothing that matters (a backup's
/// target is discarded; a commit or stream that was not finalized left the chain as it was, its
/// copied data readable the same through the layers above). Event-driven: each round re-reads
/// `query-jobs` after a status change. Returns the jobs it could not settle in time.
pub async fn settle_jobs(client: &QmpClient) -> Result<Vec<(String, Error)>> {
    let call_err = |command: &'static str| move |source| Error::Qmp { command, source };
    let mut events = client.subscribe();
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    let mut cancelled = std::collections::HashSet::new();
    loop {
        let jobs = client.call(&QueryJobs {}).await.map_err(call_err(QueryJobs::NAME))?;
        let mut open = Vec::new();
        for job in jobs {
            match job.status.as_str() {
                "concluded" => {
                    tracing::warn!(job = job.id, kind = job.kind, error = ?job.error, "dismissing a block job left by a restart");
                    client
                        .call(&JobDismiss { id: job.id.clone() })
                        .await
                        .map_err(call_err(JobDismiss::NAME))?;
                }
                "null" => {}
                _ => {
                    if cancelled.insert(job.id.clone()) {
                        tracing::warn!(
                            job = job.id,
                            kind = job.kind,
                            status = job.status,
                            "cancelling a block job left by a restart"
                        );
                        // A job that concluded meanwhile refuses; the next round dismisses it.
                        let _ =
                            client.call(&super::commands::JobCancel { id: job.id.clone() }).await;
                    }
                    open.push(job.id);
                }
            }
        }
        if open.is_empty() {
            return Ok(Vec::new());
        }
        let changed = async {
            while let Some(event) = events.recv().await {
                if event.event == "JOB_STATUS_CHANGE" {
                    return true;
                }
            }
            false
        };
        match tokio::time::timeout_at(deadline, changed).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::Qmp {
                    command: "job event stream",
                    source: super::QmpError::Disconnected,
                })
            }
            Err(_) => {
                return Ok(open
                    .into_iter()
                    .map(|id| {
                        let message = format!(
                            "did not conclude within {} s of job-cancel",
                            SETTLE_WAIT.as_secs()
                        );
                        (id.clone(), Error::Job { job: id, kind: "unknown".into(), message })
                    })
                    .collect())
            }
        }
    }
}
