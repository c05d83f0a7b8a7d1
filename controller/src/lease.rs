//! Leader election on a `coordination.k8s.io/v1` Lease, so the controller can run with replicas.
//!
//! Every replica serves CSI: the sidecars in front of each replica elect their own leaders, and
//! only the leading sidecar calls. What must happen once per cluster is the controller's own
//! background work (relaying node events to the claims); it runs on the Lease's holder.
//!
//! ```text
//!   every RETRY:  get the Lease ─ absent ─────────────────────────► create it, holder = me
//!                               ─ mine ──────────────────────────► renew it
//!                               ─ another's, unchanged for its duration, or released ─► take it
//!   writes carry the resourceVersion read: a conflict means another replica wrote first.
//!   a holder that cannot renew within RENEW_DEADLINE steps down; a stopping holder releases.
//! ```
//! Expiry is judged by our own clock since we last saw the record change, never by comparing
//! the holder's timestamps with our clock.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a Lease stays valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// A holder that has not renewed for this long stops acting as leader.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often each replica tries to acquire or renew.
pub const RETRY: Duration = Duration::from_secs(2);

/// Which Lease, and who we are.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
}

/// One replica's view of the election.
#[derive(Debug)]
pub struct Election {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The record last seen (resourceVersion) and when we first saw it.
    observed: Option<(String, Instant)>,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Election {
    /// An election over the Lease `config` names.
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Election { api: Api::namespaced(client, &config.namespace), config, observed: None }
    }

    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let mine = previous
            .and_then(|p| p.holder_identity.as_deref())
            .is_some_and(|h| h == self.config.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: if mine {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if mine || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..Default::default()
        }
    }

    /// One attempt to acquire or renew. Ok(true): we hold the Lease now.
    pub async fn round(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let seen_at = match &self.observed {
            Some((v, at)) if *v == version => *at,
            _ => {
                let now = Instant::now();
                self.observed = Some((version, now));
                now
            }
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(LEASE_DURATION, Duration::from_secs);
        let free = holder.is_empty() || seen_at.elapsed() >= duration;
        if holder != self.config.identity && !free {
            return Ok(false);
        }
        lease.spec = Some(self.spec(Some(&spec)));
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(written) => {
                if let Some(v) = written.metadata.resource_version {
                    self.observed = Some((v, Instant::now()));
                }
                Ok(true)
            }
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if we hold it, so another replica takes over at its next round.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api.replace(&self.config.name, &PostParams::default(), &lease).await.map(|_| ())
    }

    /// Campaigns until `stop` resolves, publishing whether we lead on `leading`; then
    /// releases the Lease if we hold it.
    pub async fn run(
        mut self,
        leading: watch::Sender<bool>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut renewed: Option<Instant> = None;
        loop {
            // Our renewal counts from when it was sent: the others start their clocks when they
            // see the record, which is after that. A holder's round may last only until its
            // deadline, so a call that hangs cannot keep it leading while the Lease runs out for
            // the others (two leaders would both relay every event).
            let started = Instant::now();
            let deadline = renewed.map_or(started + RENEW_DEADLINE, |at| at + RENEW_DEADLINE);
            let lead = match tokio::time::timeout_at(deadline, self.round()).await {
                Ok(Ok(true)) => {
                    renewed = Some(started);
                    true
                }
                Ok(Ok(false)) => false,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, lease = %self.config.name, "leader election: the API server did not answer");
                    renewed.is_some_and(|at| at.elapsed() < RENEW_DEADLINE)
                }
                Err(_) => {
                    tracing::warn!(lease = %self.config.name, "leader election: the API server did not answer in time");
                    false
                }
            };
            if !lead {
                renewed = None;
            }
            leading.send_if_modified(|was| {
                if *was != lead {
                    tracing::info!(identity = %self.config.identity, lease = %self.config.name, leading = lead, "leadership changed");
                    *was = lead;
                    true
                } else {
                    false
                }
            });
            tokio::select! {
                () = tokio::time::sleep(RETRY) => {}
                () = &mut stop => break,
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "releasing the lease failed; it expires by itself");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    /// An API server that lets us create the Lease, then never answers again.
    fn api_server_that_stalls() -> (kube::Client, tokio::task::JoinHandle<()>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut handle = std::pin::pin!(handle);
            let (get, respond) = handle.next_request().await.expect("get");
            assert_eq!(get.method(), http::Method::GET);
            let missing = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                "code": 404, "message": "not found",
            });
            respond.send_response(
                Response::builder()
                    .status(404)
                    .body(Body::from(serde_json::to_vec(&missing).expect("json")))
                    .expect("response"),
            );
            let (create, respond) = handle.next_request().await.expect("create");
            assert_eq!(create.method(), http::Method::POST);
            let created = serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": "l", "namespace": "qsd", "resourceVersion": "1" },
                "spec": { "holderIdentity": "me", "leaseDurationSeconds": 15 },
            });
            respond.send_response(
                Response::builder()
                    .status(201)
                    .body(Body::from(serde_json::to_vec(&created).expect("json")))
                    .expect("response"),
            );
            // Every later request hangs: the next renewal never comes back.
            let mut held = Vec::new();
            while let Some(pending) = handle.next_request().await {
                held.push(pending);
            }
        });
        (kube::Client::new(service, "qsd"), server)
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_whose_renewal_hangs_stops_leading_before_its_lease_runs_out_for_others() {
        let (client, server) = api_server_that_stalls();
        let config =
            LeaseConfig { namespace: "qsd".into(), name: "l".into(), identity: "me".into() };
        let (leading_tx, mut leading) = watch::channel(false);
        let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
        let started = Instant::now();
        let election = tokio::spawn(Election::new(client, config).run(leading_tx, async {
            let _ = stop.await;
        }));
        leading.wait_for(|l| *l).await.expect("leads after creating the Lease");
        // Another replica may take the Lease LEASE_DURATION after it saw our last write; we
        // must have stepped down before then, although our renewal call never returned.
        tokio::time::timeout(LEASE_DURATION, leading.wait_for(|l| !*l))
            .await
            .expect("still leading when the Lease ran out for the others")
            .expect("election running");
        assert!(started.elapsed() <= RENEW_DEADLINE, "stepped down after {:?}", started.elapsed());
        let _ = stop_tx.send(());
        election.abort();
        server.abort();
    }
}
