//! Kubernetes Events about volumes, posted on their PersistentVolumeClaims.
//!
//! ```text
//!   CSI calls served here (snapshot taken or failed) ─────────────┐
//!   node agents' WatchEvents, relayed by the leader (relay.rs):   ├─► Notice ─► Events ─► PVC
//!     write threshold crossed, clone progress, clone outcome ─────┘      (and the log)
//! ```
//! A volume knows its claim from the labels it was created with: external-provisioner's
//! `--extra-create-metadata` parameters (`csi.storage.k8s.io/pvc/{name,namespace}`), which the
//! engine keeps in the volume's record. A volume without them (standalone mode, or a volume
//! created by hand) only gets log lines. Posting is best effort: a failure is logged, never
//! returned to a CSI caller.
//!
//! The same notice again (same claim, reason and note) within [`FOLD_WINDOW`] is folded into
//! the first Event's series, as `kubectl` shows repeats. Notices that differ in their note stay
//! separate Events: two snapshots, or two crossings at different allocations, are two facts.
//! (kube-runtime's `Recorder` folds by reason alone, which would show the first note with a
//! count.)

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Resource;
use qsd_csi_proto::agent::{self, volume_event::Kind};
use tokio::time::Instant;

/// Repeats of one notice within this window count in one Event's series.
pub const FOLD_WINDOW: Duration = Duration::from_secs(6 * 60);

/// Label (from the provisioner's parameters) naming the volume's claim.
pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
/// Label naming the claim's namespace.
pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";

/// One thing to tell the claim's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// A Warning rather than a Normal event.
    pub warning: bool,
    /// Short PascalCase reason (`kubectl describe` shows it).
    pub reason: &'static str,
    /// What was being done, PascalCase.
    pub action: &'static str,
    /// The sentence for people.
    pub note: String,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn percent(part: u64, whole: u64) -> u64 {
    (u128::from(part) * 100 / u128::from(whole.max(1))) as u64
}

impl Notice {
    /// What a node's volume event means for the claim.
    pub fn from_volume_event(event: &agent::VolumeEvent) -> Option<Notice> {
        let volume = &event.volume_id;
        Some(match event.kind.as_ref()? {
            Kind::WriteThresholdCrossed(t) => threshold_crossed(volume, t),
            Kind::CloneProgress(p) => copy_progress(volume, p),
            Kind::CloneFinished(f) => copy_finished(volume, f),
        })
    }
}

fn threshold_crossed(volume: &str, t: &agent::WriteThresholdCrossed) -> Notice {
    let allocated = t.threshold_bytes + t.exceeded_bytes;
    let missed = if t.missed { " (it fired while the node plugin was reconnecting)" } else { "" };
    Notice {
        warning: true,
        reason: "WriteThresholdCrossed",
        action: "WriteThreshold",
        note: format!(
            "volume {volume} has allocated {} of {} ({}%), past its threshold at {}{missed}; next alert at {}",
            mib(allocated),
            mib(t.size_bytes),
            percent(allocated, t.size_bytes),
            mib(t.threshold_bytes),
            mib(t.rearmed_at_bytes),
        ),
    }
}

/// A copy's progress: a move copies a volume onto another node under its own ID, a clone
/// into a new one.
fn copy_progress(volume: &str, p: &agent::CloneProgress) -> Notice {
    let (done, total) = (mib(p.done_bytes), mib(p.total_bytes));
    let share = percent(p.done_bytes, p.total_bytes);
    let (action, note) = if p.source_volume_id == volume {
        (
            "MoveVolume",
            format!("moving volume {volume} to another node: {done} of {total} copied ({share}%)"),
        )
    } else {
        let source = &p.source_volume_id;
        (
            "CloneVolume",
            format!("copying volume {source} into {volume}: {done} of {total} ({share}%)"),
        )
    };
    Notice { warning: false, reason: "CloneProgress", action, note }
}

fn copy_finished(volume: &str, f: &agent::CloneFinished) -> Notice {
    let (source, error) = (&f.source_volume_id, &f.error);
    let seconds = f.elapsed_millis as f64 / 1000.0;
    let (action, note) = match (source == volume, error.is_empty()) {
        (true, true) => (
            "MoveVolume",
            format!("volume {volume} is copied whole onto its new node ({seconds:.1} s)"),
        ),
        (true, false) => (
            "MoveVolume",
            format!(
                "moving volume {volume} to another node failed: {error}; it stays where it was"
            ),
        ),
        (false, true) => (
            "CloneVolume",
            format!(
                "volume {volume} is a complete point-in-time copy of {source} ({seconds:.1} s)"
            ),
        ),
        (false, false) => {
            ("CloneVolume", format!("copying volume {source} into {volume} failed: {error}"))
        }
    };
    let (warning, reason) =
        if error.is_empty() { (false, "CloneCompleted") } else { (true, "CloneFailed") };
    Notice { warning, reason, action, note }
}

/// The API server refuses an Event whose note is longer than this (bytes).
pub const NOTE_MAX: usize = 1024;

/// `note` cut to [`NOTE_MAX`] bytes at a character boundary, marked with "…" when cut (the
/// whole sentence stays in the log).
pub fn fit_note(note: &str) -> String {
    if note.len() <= NOTE_MAX {
        return note.to_owned();
    }
    let mut end = NOTE_MAX - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

/// Who posts: the `reportingController` and `reportingInstance` of our Events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporter {
    /// The driver's name.
    pub controller: String,
    /// This replica (its pod name).
    pub instance: String,
}

/// An Event already posted, for folding repeats into it.
#[derive(Debug, Clone)]
struct Posted {
    name: String,
    count: i32,
    at: Instant,
}

/// (claim uid, reason, note): what makes a notice the same notice.
type FoldKey = (String, &'static str, String);

struct Kubernetes {
    client: kube::Client,
    reporter: Reporter,
    posted: Mutex<HashMap<FoldKey, Posted>>,
}

/// Where notices go: Kubernetes Events (cluster mode) or only the log.
#[derive(Clone)]
pub struct Events {
    kubernetes: Option<Arc<Kubernetes>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("kubernetes", &self.kubernetes.is_some()).finish()
    }
}

/// Whether a notice is a repeat to fold into `previous` (`Some(count)` for the series) or a
/// new Event.
fn fold(previous: Option<&Posted>, now: Instant) -> Option<i32> {
    previous.filter(|p| now.duration_since(p.at) < FOLD_WINDOW).map(|p| p.count + 1)
}

impl Events {
    /// Notices are logged only (standalone mode).
    pub fn log_only() -> Self {
        Events { kubernetes: None }
    }

    /// Notices are also posted as Events on the claims, reported as `reporter`.
    pub fn kubernetes(client: kube::Client, reporter: Reporter) -> Self {
        let posted = Mutex::new(HashMap::new());
        Events { kubernetes: Some(Arc::new(Kubernetes { client, reporter, posted })) }
    }

    /// [`publish`](Self::publish), best effort: a failure to post is logged, not returned.
    pub async fn report(&self, labels: &BTreeMap<String, String>, notice: &Notice) {
        if let Err(e) = self.publish(labels, notice).await {
            tracing::warn!(error = %e, reason = notice.reason, "posting an event failed");
        }
    }

    /// Logs the notice and posts it on the claim named by `labels`. Returns whether an Event
    /// was posted (false: no claim is known, or it no longer exists).
    pub async fn publish(
        &self,
        labels: &BTreeMap<String, String>,
        notice: &Notice,
    ) -> Result<bool, kube::Error> {
        let claim = labels.get(PVC_NAMESPACE).zip(labels.get(PVC_NAME));
        if notice.warning {
            tracing::warn!(?claim, reason = notice.reason, "{}", notice.note);
        } else {
            tracing::info!(?claim, reason = notice.reason, "{}", notice.note);
        }
        let (Some(k), Some((namespace, name))) = (&self.kubernetes, claim) else {
            return Ok(false);
        };
        // The claim's uid goes into the reference, so `kubectl describe pvc` finds the Event.
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(k.client.clone(), namespace);
        let Some(claim) = claims.get_opt(name).await? else {
            return Ok(false);
        };
        let regarding = claim.object_ref(&());
        let key: FoldKey =
            (regarding.uid.clone().unwrap_or_default(), notice.reason, notice.note.clone());
        let now = Instant::now();
        let previous = k.posted.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        let events: Api<Event> = Api::namespaced(k.client.clone(), namespace);
        let posted = match (fold(previous.as_ref(), now), previous) {
            (Some(count), Some(previous)) => {
                let series = EventSeries { count, last_observed_time: MicroTime(Timestamp::now()) };
                let patch = serde_json::json!({ "series": series });
                events
                    .patch(&previous.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                Posted { count, at: now, ..previous }
            }
            _ => {
                let at = Timestamp::now();
                let event = Event {
                    metadata: ObjectMeta {
                        name: Some(format!("{name}.{:x}", at.as_nanosecond())),
                        namespace: Some(namespace.clone()),
                        ..Default::default()
                    },
                    event_time: Some(MicroTime(at)),
                    type_: Some(if notice.warning { "Warning" } else { "Normal" }.to_owned()),
                    reason: Some(notice.reason.to_owned()),
                    action: Some(notice.action.to_owned()),
                    note: Some(fit_note(&notice.note)),
                    regarding: Some(regarding),
                    reporting_controller: Some(k.reporter.controller.clone()),
                    reporting_instance: Some(k.reporter.instance.clone()),
                    ..Default::default()
                };
                let created = events.create(&PostParams::default(), &event).await?;
                let name = created.metadata.name.unwrap_or_default();
                Posted { name, count: 1, at: now }
            }
        };
        let mut cache = k.posted.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, p| now.duration_since(p.at) < FOLD_WINDOW);
        cache.insert(key, posted);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: Kind) -> agent::VolumeEvent {
        agent::VolumeEvent {
            volume_id: "vol:default@w1:pvc-1".into(),
            labels: BTreeMap::new(),
            kind: Some(kind),
        }
    }

    #[test]
    fn a_long_note_is_cut_to_what_the_api_server_takes() {
        let long = "é".repeat(NOTE_MAX);
        let cut = fit_note(&long);
        assert!(cut.len() <= NOTE_MAX && cut.ends_with('…'), "{}", cut.len());
        assert_eq!(fit_note("short"), "short");
    }

    #[test]
    fn a_crossed_threshold_is_a_warning_with_allocation_and_the_next_alert() {
        let n = Notice::from_volume_event(&event(Kind::WriteThresholdCrossed(
            agent::WriteThresholdCrossed {
                threshold_bytes: 80 << 20,
                exceeded_bytes: 4 << 20,
                missed: false,
                rearmed_at_bytes: 89 << 20,
                size_bytes: 100 << 20,
                ..Default::default()
            },
        )))
        .expect("notice");
        assert!(n.warning);
        assert_eq!(n.reason, "WriteThresholdCrossed");
        assert!(n.note.contains("84.0 MiB of 100.0 MiB (84%)"), "{}", n.note);
        assert!(n.note.contains("next alert at 89.0 MiB"), "{}", n.note);
    }

    #[test]
    fn clone_progress_and_outcomes_read_as_sentences() {
        let progress =
            Notice::from_volume_event(&event(Kind::CloneProgress(agent::CloneProgress {
                source_volume_id: "vol:default@w1:src".into(),
                done_bytes: 1 << 20,
                total_bytes: 4 << 20,
            })))
            .expect("progress");
        assert_eq!((progress.warning, progress.reason), (false, "CloneProgress"));
        assert!(progress.note.contains("(25%)"), "{}", progress.note);
        let done = |error: &str| {
            Notice::from_volume_event(&event(Kind::CloneFinished(agent::CloneFinished {
                source_volume_id: "vol:default@w1:src".into(),
                error: error.into(),
                elapsed_millis: 1500,
            })))
            .expect("finished")
        };
        assert_eq!((done("").warning, done("").reason), (false, "CloneCompleted"));
        let failed = done("no space left");
        assert_eq!((failed.warning, failed.reason), (true, "CloneFailed"));
        assert!(failed.note.ends_with("failed: no space left"), "{}", failed.note);
        // A move copies the volume onto another node under its own ID: said as a move.
        let moved = |error: &str| {
            Notice::from_volume_event(&event(Kind::CloneFinished(agent::CloneFinished {
                source_volume_id: "vol:default@w1:pvc-1".into(),
                error: error.into(),
                elapsed_millis: 1500,
            })))
            .expect("finished")
        };
        let done = moved("");
        assert_eq!((done.reason, done.action), ("CloneCompleted", "MoveVolume"));
        assert!(done.note.contains("is copied whole onto its new node (1.5 s)"), "{}", done.note);
        let failed = moved("no space left");
        assert!(
            failed.warning && failed.note.ends_with("it stays where it was"),
            "{}",
            failed.note
        );
    }

    #[test]
    fn a_repeat_within_the_window_counts_in_the_first_events_series() {
        let start = Instant::now();
        let first = Posted { name: "e".into(), count: 1, at: start };
        assert_eq!(fold(None, start), None, "nothing posted yet: a new Event");
        assert_eq!(fold(Some(&first), start + Duration::from_secs(60)), Some(2));
        let third = Posted { count: 2, ..first.clone() };
        assert_eq!(fold(Some(&third), start + Duration::from_secs(1)), Some(3));
        assert_eq!(fold(Some(&first), start + FOLD_WINDOW), None, "too old: a new Event");
    }

    #[test]
    fn an_event_without_a_kind_tells_nobody_anything() {
        let mut e = event(Kind::CloneProgress(Default::default()));
        e.kind = None;
        assert_eq!(Notice::from_volume_event(&e), None);
    }
}
