//! Volumes that follow their pods: when a volume's node is cordoned or drained and the pod
//! using its claim cannot be scheduled, the leader moves the volume to a node the pod can go
//! to (a copy across that keeps the volume's ID), points the PersistentVolume's node affinity
//! there, and removes the old copy once the new one is in use.
//!
//! ```text
//!   every PERIOD (leading):
//!     pending pod, unschedulable ─► its claims ─► bound PV of this driver, class followPod=true,
//!                                   PV's node cordoned / not ready / gone
//!       ─► PV affinity change allowed? (dry run)  no ─► Warning VolumeCannotFollow
//!       ─► a node with an agent the pod can go to (schedulable, selector, taints)
//!                                                none ─► Warning VolumeCannotFollow
//!       ─► volume released on the old node?       no ─► wait for the next round
//!       ─► move_volume (copy across, ID kept) ─► PV affinity patched ─► VolumeFollowed
//!          (the patch refused: the new copy deleted; the volume stays where it was)
//!     moved volumes ─► PV names the new node and the new copy is in use ─► old copy deleted
//!                  ─► PV still names the old node (a move cut short) ─► new copy deleted
//! ```
//! Every step is decided again from what the API server and the agents say, so a controller
//! restarted midway picks up where the facts are; nothing is removed until its replacement is
//! known to be the one in use.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, ListParams, Patch, PatchParams};
use qsd_csi_model::id::{IdKind, ObjectId};
use qsd_csi_model::params::FOLLOW_POD;
use qsd_csi_proto::agent;
use tokio::sync::watch;

use crate::agents::Agents;
use crate::error::said;
use crate::events::{Events, Notice, PVC_NAME, PVC_NAMESPACE};
use crate::{ControllerService, PLUGIN_NAME};

mod fit;

use fit::{affinity_node, affinity_patch, closed, fits, unschedulable};

/// The node name a dry run of an affinity change names when no node is picked.
const FOLLOW_PROBE_NODE: &str = "qsd-follow-probe";

/// How often the leader looks for pods their volumes keep off every node.
pub const PERIOD: Duration = Duration::from_secs(5);

/// The leader's follower: the Kubernetes API, the agents, and the controller's copy.
#[derive(Clone)]
pub struct Follower {
    client: kube::Client,
    agents: Agents,
    controller: ControllerService,
    events: Events,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower").field("agents", &self.agents).finish_non_exhaustive()
    }
}

/// A volume of this driver and its PersistentVolume.
struct Bound {
    pv: PersistentVolume,
    id: String,
    /// The node the PV's affinity names.
    node: Option<String>,
}

impl Bound {
    fn of(pv: PersistentVolume) -> Option<Bound> {
        let csi = pv.spec.as_ref()?.csi.as_ref()?;
        if csi.driver != PLUGIN_NAME {
            return None;
        }
        let id = csi.volume_handle.clone();
        let node = affinity_node(&pv);
        Some(Bound { pv, id, node })
    }

    fn name(&self) -> String {
        self.pv.metadata.name.clone().unwrap_or_default()
    }

    /// The claim's namespace and name as the labels Events go by.
    fn claim_labels(&self) -> BTreeMap<String, String> {
        let claim = self.pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
        let mut labels = BTreeMap::new();
        if let Some(c) = claim {
            labels.insert(PVC_NAMESPACE.to_owned(), c.namespace.clone().unwrap_or_default());
            labels.insert(PVC_NAME.to_owned(), c.name.clone().unwrap_or_default());
        }
        labels
    }
}

impl Follower {
    /// Moves volumes through `controller`, reading and patching through `client`.
    pub fn new(
        client: kube::Client,
        agents: Agents,
        controller: ControllerService,
        events: Events,
    ) -> Self {
        Follower { client, agents, controller, events }
    }

    /// Looks every [`PERIOD`] while `leading`, until `stop`.
    pub async fn run(
        self,
        leading: watch::Receiver<bool>,
        stop: impl std::future::Future<Output = ()> + Send,
    ) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = tokio::time::sleep(PERIOD) => {}
                () = &mut stop => return,
            }
            if !*leading.borrow() {
                continue;
            }
            if let Err(e) = self.round().await {
                tracing::warn!(error = %said(&e), "looking for volumes to follow their pods failed");
            }
        }
    }

    /// One look: pods kept off every node by a volume, then moves cut short or finished.
    pub async fn round(&self) -> Result<(), kube::Error> {
        self.agents.find_moved().await;
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let bound: HashMap<String, Bound> = pvs
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(Bound::of)
            .map(|b| (b.name(), b))
            .collect();
        let nodes: Api<Node> = Api::all(self.client.clone());
        let nodes: HashMap<String, Node> = nodes
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
            .collect();
        let pods: Api<Pod> = Api::all(self.client.clone());
        let pending = pods.list(&ListParams::default().fields("status.phase=Pending")).await?;
        let mut moved_now = Vec::new();
        for pod in pending.items.iter().filter(|p| unschedulable(p)) {
            for pv in self.claimed(pod).await? {
                if let Some(volume) = bound.get(&pv) {
                    if self.consider(pod, volume, &nodes).await {
                        moved_now.push(volume.id.clone());
                    }
                }
            }
        }
        // The PVs were read before this round's moves: those are settled next round. Every
        // copy some node lists under another node's ID is settled by its PV (the authority; a
        // node's own listing is not).
        let by_id: HashMap<&str, &Bound> = bound.values().map(|b| (b.id.as_str(), b)).collect();
        let mut settled = false;
        for (id, holders) in self.agents.move_claims() {
            let Some(volume) = by_id.get(id.as_str()).filter(|b| !moved_now.contains(&b.id)) else {
                continue;
            };
            for holder in holders {
                settled |= self.settle(volume, &holder).await;
            }
        }
        if settled {
            self.agents.find_moved().await;
        }
        Ok(())
    }

    /// The PVs bound to `pod`'s claims.
    async fn claimed(&self, pod: &Pod) -> Result<Vec<String>, kube::Error> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &namespace);
        let mut pvs = Vec::new();
        let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
        for claim in
            volumes.into_iter().flatten().filter_map(|v| v.persistent_volume_claim.as_ref())
        {
            if let Some(pvc) = claims.get_opt(&claim.claim_name).await? {
                pvs.extend(pvc.spec.and_then(|s| s.volume_name));
            }
        }
        Ok(pvs)
    }

    /// The class parameters of a PV's volume if its class lets it follow its pod.
    async fn following(&self, volume: &Bound) -> Option<HashMap<String, String>> {
        let class = volume.pv.spec.as_ref()?.storage_class_name.clone()?;
        let classes: Api<StorageClass> = Api::all(self.client.clone());
        let parameters = classes.get_opt(&class).await.ok()??.parameters.unwrap_or_default();
        (parameters.get(FOLLOW_POD).map(String::as_str) == Some("true"))
            .then(|| parameters.into_iter().collect())
    }

    async fn tell(&self, volume: &Bound, warning: bool, reason: &'static str, note: String) {
        let notice = Notice { warning, reason, action: "FollowPod", note };
        self.events.report(&volume.claim_labels(), &notice).await;
    }

    /// A pending pod whose volume may have to move; returns whether it moved.
    async fn consider(&self, pod: &Pod, volume: &Bound, nodes: &HashMap<String, Node>) -> bool {
        let Some(from) = volume.node.clone() else { return false };
        if nodes.get(&from).is_some_and(|n| !closed(n)) {
            return false; // its node takes pods: the pod waits for something else
        }
        let Some(parameters) = self.following(volume).await else { return false };
        let pod_name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        let Some(to) = self.target(pod, &pod_name, volume, &from, nodes).await else {
            return false;
        };
        self.follow(volume, &pod_name, &from, &to, &parameters).await
    }

    /// The node a pending pod's volume can follow it to now, or `None` with the reason told
    /// (or logged, while the volume is still in use): the API server lets the PV's node
    /// affinity change, another node with an agent fits the pod, the volume is released on
    /// `from` and the target holds no copy of it that cannot go.
    async fn target(
        &self,
        pod: &Pod,
        pod_name: &str,
        volume: &Bound,
        from: &str,
        nodes: &HashMap<String, Node>,
    ) -> Option<String> {
        let (id, pv) = (&volume.id, volume.name());
        let to = self
            .agents
            .names()
            .into_iter()
            .filter(|n| n != from)
            .find(|n| nodes.get(n).is_some_and(|node| fits(pod, node)));
        // Whether the API server lets the PV's node affinity change at all, asked first (a
        // dry run towards the node picked, or any other name when none is).
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let probe = affinity_patch(to.as_deref().unwrap_or(FOLLOW_PROBE_NODE));
        let dry_run = PatchParams { dry_run: true, ..PatchParams::default() };
        if let Err(e) = pvs.patch(&pv, &dry_run, &Patch::Merge(&probe)).await {
            let note = format!(
                "volume {id} cannot follow pod {pod_name} off node {from}: the API server does not let PersistentVolume {pv}'s node affinity change (that needs the MutablePVNodeAffinity feature gate): {}; the volume stays on node {from}",
                said(&e)
            );
            self.tell(volume, true, "VolumeCannotFollow", note).await;
            return None;
        }
        let Some(to) = to else {
            let note = format!(
                "volume {id} cannot follow pod {pod_name} off node {from}: no other node with this driver can run the pod"
            );
            self.tell(volume, true, "VolumeCannotFollow", note).await;
            return None;
        };
        match self.in_use(from, id).await {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(
                    volume = id,
                    node = from,
                    "waiting for the volume to be released before it follows its pod"
                );
                return None;
            }
            Err(e) => {
                let note = format!(
                    "volume {id} cannot follow pod {pod_name} off node {from} now: {}",
                    e.message()
                );
                self.tell(volume, true, "VolumeCannotFollow", note).await;
                return None;
            }
        }
        // A copy the target still holds from an earlier move is stale (the PV names `from`):
        // it goes first, unless something uses it.
        let stale = match self.in_use(&to, id).await {
            Ok(in_use) => in_use || !self.remove(&to, id).await,
            Err(_) => false, // not there (or not answering: the copy will say)
        };
        if stale {
            let note = format!(
                "volume {id} cannot follow pod {pod_name} to node {to} now: that node holds an earlier copy of it that could not be removed"
            );
            self.tell(volume, true, "VolumeCannotFollow", note).await;
            return None;
        }
        Some(to)
    }

    /// Moves the volume from `from` to `to` and points its PV there; whether it moved (a
    /// failure is told, and leaves the volume where it was).
    async fn follow(
        &self,
        volume: &Bound,
        pod_name: &str,
        from: &str,
        to: &str,
        parameters: &HashMap<String, String>,
    ) -> bool {
        let (id, pv) = (&volume.id, volume.name());
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let patch = affinity_patch(to);
        let note =
            format!("volume {id} follows pod {pod_name}: copying it from node {from} to node {to}");
        self.tell(volume, false, "VolumeFollowing", note).await;
        if let Err(e) = self.controller.move_volume(id, from, to, parameters).await {
            let note = format!(
                "volume {id} could not be copied from node {from} to node {to}: {}; it stays on node {from}",
                e.message()
            );
            self.tell(volume, true, "VolumeFollowFailed", note).await;
            return false;
        }
        if let Err(e) = pvs.patch(&pv, &PatchParams::default(), &Patch::Merge(&patch)).await {
            let note = format!(
                "PersistentVolume {pv}'s node affinity could not be changed to node {to}: {}; the copy there is removed and the volume stays on node {from}",
                said(&e)
            );
            self.tell(volume, true, "VolumeFollowFailed", note).await;
            self.remove(to, id).await;
            self.agents.find_moved().await;
            return false;
        }
        let note = format!(
            "volume {id} now lives on node {to} for pod {pod_name}; its copy on node {from} is removed once the pod uses the new one"
        );
        self.tell(volume, false, "VolumeFollowed", note).await;
        true
    }

    /// A moved volume's two copies, reconciled with what its PV says: the PV names the node
    /// it moved to and the new copy is in use there: the old copy goes; the PV still names
    /// the old node (a move cut short before the PV changed): the new copy goes. Whether a
    /// copy was removed.
    async fn settle(&self, volume: &Bound, holder: &str) -> bool {
        let id = &volume.id;
        let Some(home) = ObjectId::parse(IdKind::Volume, id).ok().and_then(|i| i.location.node)
        else {
            return false;
        };
        let home = home.as_str();
        let named = volume.node.as_deref();
        if named == Some(holder) {
            let replaced =
                self.holds(home, id).await && matches!(self.in_use(holder, id).await, Ok(true));
            if replaced && self.remove(home, id).await {
                let note = format!(
                    "volume {id}'s old copy on node {home} is removed: the pod uses it on node {holder}"
                );
                self.tell(volume, false, "VolumeFollowDone", note).await;
                return true;
            }
        } else if named == Some(home) && matches!(self.in_use(holder, id).await, Ok(false)) {
            tracing::info!(volume = id, node = holder, "a move cut short; removing its copy");
            return self.remove(holder, id).await;
        }
        false
    }

    /// Whether `node` holds volume `id` (false when it cannot say).
    async fn holds(&self, node: &str, id: &str) -> bool {
        let Ok(agent) = self.agents.node(node) else { return false };
        agent.get_volume(agent::VolumeRef { volume_id: id.to_owned() }).await.is_ok()
    }

    /// Whether volume `id` is attached (staged or published) on `node`.
    async fn in_use(&self, node: &str, id: &str) -> Result<bool, tonic::Status> {
        let agent = self.agents.node(node)?;
        let volume = agent.get_volume(agent::VolumeRef { volume_id: id.to_owned() }).await?;
        Ok(volume.export() != agent::ExportKind::ExportNone)
    }

    /// Deletes `node`'s copy of volume `id`; whether it is gone.
    async fn remove(&self, node: &str, id: &str) -> bool {
        let deleted = match self.agents.node(node) {
            Ok(agent) => agent.delete_volume(agent::VolumeRef { volume_id: id.to_owned() }).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = &deleted {
            tracing::warn!(volume = id, node, error = %e.message(), "removing a copy failed; the next round tries again");
        }
        deleted.is_ok()
    }
}
