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
