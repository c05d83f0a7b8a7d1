//! Claims that grow themselves: what the leader does with a crossed write threshold of an
//! auto-expanding volume.
//!
//! ```text
//!   relay ─► WriteThresholdCrossed (policy, allocation, filesystem usage, pool free)
//!        ─► AutoExpand::decide (qsd-csi-model, pure)
//!        ─► Grow { to }: Grower::grow — cluster: raise the claim's requested storage, so
//!                        Kubernetes' resizer and kubelet grow it; standalone: expand here
//!           otherwise:   a Warning (at the limit, no room) or nothing (not filling)
//!        ─► Event on the claim (one per expansion), counters for the metrics
//! ```
//! At most one growth per volume runs at a time; a crossing that arrives meanwhile is dropped
//! (the running growth re-arms the threshold at the new size, so filling on alerts again). A
//! refusal is said once per crossing and never retried in a loop: the next crossing (the
//! threshold re-armed a step higher) is the next try.

mod claim;

pub use claim::{quantity_bytes, ClaimGrower};

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use qsd_csi_model::grow::{size, AutoExpand, Crossing, FsUsage, Growth};
use qsd_csi_proto::agent::{self, volume_event::Kind};

use crate::events::{Events, Notice, PVC_NAME, PVC_NAMESPACE};

/// What a growth did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grown {
    /// The volume grows (or was asked to) to the new size; the note says how.
    Done(String),
    /// Someone already asked for this size or more (a resize in flight): nothing to do.
    AlreadyAsked,
}

/// Carries a growth out.
#[tonic::async_trait]
pub trait Grower: Send + Sync + std::fmt::Debug {
    /// Grows `event`'s volume from `from` to `to` bytes. An error is said in a Warning.
    async fn grow(&self, event: &agent::VolumeEvent, from: u64, to: u64) -> Result<Grown, String>;
}

/// The leader's auto-expansion: decisions, one growth per volume at a time, Events, counters.
#[derive(Debug, Clone)]
pub struct AutoGrow {
    grower: Arc<dyn Grower>,
    events: Events,
    in_flight: Arc<Mutex<HashSet<String>>>,
    metrics: GrowMetrics,
}

/// `qsd_csi_volume_auto_expansions_total` and `qsd_csi_volume_auto_expand_refusals_total`.
#[derive(Debug, Clone)]
pub struct GrowMetrics {
    /// Growths carried out, by volume.
    pub expansions: prometheus::IntCounterVec,
    /// Growths refused, by volume and reason (`limit`, `no_room`, `failed`).
    pub refusals: prometheus::IntCounterVec,
}

impl GrowMetrics {
    /// The two families, unregistered.
    pub fn new() -> Self {
        let labels = ["volume", "pool", "namespace", "claim"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), labels)
                .expect("a valid counter")
        };
        GrowMetrics {
            expansions: counter(
                "qsd_csi_volume_auto_expansions_total",
                "Automatic expansions of auto-expanding volumes (a claim's request raised, or the volume grown in standalone mode).",
                &labels,
            ),
            refusals: counter(
                "qsd_csi_volume_auto_expand_refusals_total",
                "Automatic expansions not made, by reason: limit (at autoExpandLimit), no_room (the pool cannot hold the step), failed (the API server or the expansion refused).",
                &[&labels[..], &["reason"]].concat(),
            ),
        }
    }

    /// Registers both in `registry`.
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.expansions.clone()))?;
        registry.register(Box::new(self.refusals.clone()))
    }
}

impl Default for GrowMetrics {
    fn default() -> Self {
        GrowMetrics::new()
    }
}

/// The labels of `event`'s volume for the metrics: ID, pool, claim namespace and name.
fn volume_labels(event: &agent::VolumeEvent) -> [String; 4] {
    let label = |key: &str| event.labels.get(key).cloned().unwrap_or_default();
    let pool = crate::shapes::location(qsd_csi_model::id::IdKind::Volume, &event.volume_id)
        .map(|(pool, _)| pool)
        .unwrap_or_default();
    [event.volume_id.clone(), pool, label(PVC_NAMESPACE), label(PVC_NAME)]
}

/// The policy and the crossing an event reports, if it is an auto-expanding volume's crossing.
pub fn crossing(event: &agent::VolumeEvent) -> Option<(AutoExpand, Crossing)> {
    let Some(Kind::WriteThresholdCrossed(t)) = &event.kind else { return None };
    let policy = AutoExpand::try_from(t.auto_expand?).ok()?;
    let filesystem = t
        .filesystem_used_bytes
        .zip(t.filesystem_size_bytes)
        .map(|(used, total)| FsUsage { used, total });
    let crossing = Crossing {
        size: t.size_bytes,
        allocated: t.threshold_bytes.saturating_add(t.exceeded_bytes),
        filesystem,
        pool_free: t.pool_free_bytes,
    };
    Some((policy, crossing))
}

impl AutoGrow {
    /// Growths carried out by `grower`, told through `events`, counted in `metrics`.
    pub fn new(grower: Arc<dyn Grower>, events: Events, metrics: GrowMetrics) -> Self {
        AutoGrow { grower, events, in_flight: Arc::default(), metrics }
    }

    /// Acts on one node event (in the background: the relay goes on).
    pub fn on_event(&self, event: &agent::VolumeEvent) {
        let Some((policy, crossing)) = crossing(event) else { return };
        if !self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(event.volume_id.clone())
        {
            tracing::debug!(
                volume = event.volume_id,
                "a growth is already running; crossing dropped"
            );
            return;
        }
        let (this, event) = (self.clone(), event.clone());
        tokio::spawn(async move {
            this.act(&event, &policy, &crossing).await;
            this.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&event.volume_id);
        });
    }

    async fn act(&self, event: &agent::VolumeEvent, policy: &AutoExpand, crossing: &Crossing) {
        let volume = &event.volume_id;
        let labels = volume_labels(event);
        let refuse = |reason: &str| {
            let values = [&labels[..], &[reason.to_owned()]].concat();
            self.metrics.refusals.with_label_values(&values).inc();
        };
        let (from, to) = match policy.decide(crossing) {
            Growth::Grow { from, to } => (from, to),
            other => {
                tracing::info!(volume, decision = ?other, "write threshold crossed; no growth");
                if let Some(note) = other.refusal(volume) {
                    let (label, reason) = match other {
                        Growth::AtLimit { .. } => ("limit", "AutoExpandLimitReached"),
                        _ => ("no_room", "AutoExpandNoRoom"),
                    };
                    refuse(label);
                    let notice = Notice { warning: true, reason, action: "AutoExpand", note };
                    self.events.report(&event.labels, &notice).await;
                }
                return;
            }
        };
        let why = why(policy, crossing);
        match self.grower.grow(event, from, to).await {
            Ok(Grown::Done(how)) => {
                self.metrics.expansions.with_label_values(&labels).inc();
                let note = format!(
                    "volume {volume} grows from {} to {} (step {}{}): {why}; {how}",
                    size(from),
                    size(to),
                    policy.step,
                    policy.limit.map_or(String::new(), |l| format!(", limit {}", size(l))),
                );
                let notice =
                    Notice { warning: false, reason: "AutoExpanded", action: "AutoExpand", note };
                self.events.report(&event.labels, &notice).await;
            }
            Ok(Grown::AlreadyAsked) => {
                tracing::info!(volume, to, "a growth to this size or more is already asked for");
            }
            Err(e) => {
                refuse("failed");
                let note = format!(
                    "volume {volume} could not grow from {} to {}: {e}; it keeps working at its present size",
                    size(from),
                    size(to)
                );
                let notice = Notice {
                    warning: true,
                    reason: "AutoExpandFailed",
                    action: "AutoExpand",
                    note,
                };
                self.events.report(&event.labels, &notice).await;
            }
        }
    }
}

/// Why a volume grows, for the Event.
fn why(policy: &AutoExpand, crossing: &Crossing) -> String {
    let percent = |part: u64, whole: u64| u128::from(part) * 100 / u128::from(whole.max(1));
    let allocation = format!(
        "{} of {} allocated ({}%), past its {}% write threshold",
        size(crossing.allocated),
        size(crossing.size),
        percent(crossing.allocated, crossing.size),
        policy.threshold_percent
    );
    match crossing.filesystem {
        Some(fs) => format!(
            "{allocation}, and its filesystem is {}% full ({} of {})",
            percent(fs.used, fs.total),
            size(fs.used),
            size(fs.total)
        ),
        None => allocation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qsd_csi_model::grow::Step;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn event(used: Option<u64>) -> agent::VolumeEvent {
        let policy =
            AutoExpand { step: Step::Percent(25), limit: Some(3 * GIB), threshold_percent: 80 };
        agent::VolumeEvent {
            volume_id: "vol:default@n1:pvc-1".into(),
            labels: [
                (PVC_NAMESPACE.to_owned(), "ns".to_owned()),
                (PVC_NAME.to_owned(), "data".to_owned()),
            ]
            .into(),
            kind: Some(Kind::WriteThresholdCrossed(agent::WriteThresholdCrossed {
                threshold_bytes: 800 * MIB,
                exceeded_bytes: 60 * MIB,
                size_bytes: GIB,
                auto_expand: Some(policy.into()),
                filesystem_used_bytes: used,
                filesystem_size_bytes: used.map(|_| GIB - 10 * MIB),
                pool_free_bytes: Some(10 * GIB),
                ..Default::default()
            })),
        }
    }

    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<(u64, u64)>>);

    #[tonic::async_trait]
    impl Grower for Recorder {
        async fn grow(&self, _: &agent::VolumeEvent, from: u64, to: u64) -> Result<Grown, String> {
            self.0.lock().expect("lock").push((from, to));
            Ok(Grown::Done("asked".into()))
        }
    }

    #[test]
    fn an_event_carries_the_policy_and_the_crossing_the_decision_needs() {
        let (policy, crossing) =
            crossing(&event(Some(900 * MIB))).expect("an auto-expanding crossing");
        assert_eq!(policy.threshold_percent, 80);
        assert_eq!(crossing.allocated, 860 * MIB);
        assert_eq!(crossing.filesystem, Some(FsUsage { used: 900 * MIB, total: GIB - 10 * MIB }));
        let mut plain = event(None);
        if let Some(Kind::WriteThresholdCrossed(t)) = &mut plain.kind {
            t.auto_expand = None;
        }
        assert_eq!(super::crossing(&plain), None, "a volume without a policy never grows");
        assert_eq!(volume_labels(&plain)[1..], ["default".to_owned(), "ns".into(), "data".into()]);
    }

    #[tokio::test]
    async fn a_filling_volume_grows_once_and_a_rewritten_filesystem_does_not() {
        let recorder = Arc::new(Recorder::default());
        let grow = AutoGrow::new(recorder.clone(), Events::log_only(), GrowMetrics::new());
        let filling = event(Some(900 * MIB));
        grow.act(
            &filling,
            &crossing(&filling).expect("policy").0,
            &crossing(&filling).expect("c").1,
        )
        .await;
        let rewritten = event(Some(100 * MIB));
        grow.act(
            &rewritten,
            &crossing(&rewritten).expect("policy").0,
            &crossing(&rewritten).expect("c").1,
        )
        .await;
        assert_eq!(*recorder.0.lock().expect("lock"), vec![(GIB, GIB + 256 * MIB)]);
        let counted = grow.metrics.expansions.with_label_values(&volume_labels(&filling)).get();
        assert_eq!(counted, 1);
    }
}
