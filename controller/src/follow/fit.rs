//! What the follower reads of the scheduler's world: a PV's node, a node that takes pods, a
//! pod that fits a node, a pod the scheduler could not place.

use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod, Taint, Toleration};
use qsd_csi_model::params::TOPOLOGY_KEY;

/// The node a PV's required affinity names for this driver's topology key, if one.
pub(super) fn affinity_node(pv: &PersistentVolume) -> Option<String> {
    let terms = &pv.spec.as_ref()?.node_affinity.as_ref()?.required.as_ref()?.node_selector_terms;
    let mut nodes = terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter(|e| e.key == TOPOLOGY_KEY && e.operator == "In")
        .flat_map(|e| e.values.iter().flatten());
    let first = nodes.next()?.clone();
    nodes.next().is_none().then_some(first)
}

/// The merge patch pointing a PV's node affinity at `node`.
pub(super) fn affinity_patch(node: &str) -> serde_json::Value {
    serde_json::json!({ "spec": { "nodeAffinity": { "required": { "nodeSelectorTerms": [
        { "matchExpressions": [ { "key": TOPOLOGY_KEY, "operator": "In", "values": [node] } ] }
    ] } } } })
}

/// Whether a node takes no new pods: cordoned, not ready, or tainted against scheduling.
pub(super) fn closed(node: &Node) -> bool {
    let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    cordoned || !ready
}

/// Whether `pod` tolerates `taint`.
fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let key = t.key.as_deref().unwrap_or("");
        let effect = t.effect.as_deref().unwrap_or("");
        let key_matches = (key.is_empty() && t.operator.as_deref() == Some("Exists"))
            || (key == taint.key
                && match t.operator.as_deref() {
                    Some("Exists") => true,
                    _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
                });
        key_matches && (effect.is_empty() || effect == taint.effect)
    })
}

/// Whether `pod` could run on `node` as far as its volume's move goes: the node takes pods,
/// has the pod's node selector labels, and no taint the pod does not tolerate keeps it off.
pub(super) fn fits(pod: &Pod, node: &Node) -> bool {
    if closed(node) {
        return false;
    }
    let spec = pod.spec.as_ref();
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let selected = spec
        .and_then(|s| s.node_selector.as_ref())
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let tolerations = spec.and_then(|s| s.tolerations.clone()).unwrap_or_default();
    let untainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerates(&tolerations, t));
    selected && untainted
}

/// Whether the scheduler has said it cannot place `pod` now.
pub(super) fn unschedulable(pod: &Pod) -> bool {
    let unbound = pod.spec.as_ref().is_none_or(|s| s.node_name.is_none());
    let said = pod.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
        c.iter().any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
    });
    unbound && said
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from<T: k8s_openapi::DeepMerge + for<'a> k8s_openapi::serde::Deserialize<'a>>(
        v: serde_json::Value,
    ) -> T {
        serde_json::from_value(v).expect("a valid object")
    }

    fn node(unschedulable: bool, ready: &str, taint: Option<&str>) -> Node {
        from(serde_json::json!({
            "metadata": { "name": "n", "labels": { "zone": "a" } },
            "spec": { "unschedulable": unschedulable,
                      "taints": taint.map(|k| vec![serde_json::json!({ "key": k, "effect": "NoSchedule" })]) },
            "status": { "conditions": [ { "type": "Ready", "status": ready } ] },
        }))
    }

    #[test]
    fn a_pod_fits_open_nodes_it_selects_and_whose_taints_it_tolerates() {
        let pod: Pod = from(serde_json::json!({ "spec": { "containers": [],
            "nodeSelector": { "zone": "a" },
            "tolerations": [ { "key": "gpu", "operator": "Exists" } ] } }));
        assert!(fits(&pod, &node(false, "True", None)));
        assert!(fits(&pod, &node(false, "True", Some("gpu"))), "tolerated");
        assert!(!fits(&pod, &node(false, "True", Some("dedicated"))), "not tolerated");
        assert!(!fits(&pod, &node(true, "True", None)), "cordoned");
        assert!(!fits(&pod, &node(false, "Unknown", None)), "not ready");
        let elsewhere: Pod = from(serde_json::json!({ "spec": { "containers": [],
            "nodeSelector": { "zone": "b" } } }));
        assert!(!fits(&elsewhere, &node(false, "True", None)), "not selected");
    }

    #[test]
    fn only_a_pod_the_scheduler_could_not_place_counts() {
        let pod = |reason: &str, node: Option<&str>| -> Pod {
            from(serde_json::json!({ "spec": { "containers": [], "nodeName": node },
                "status": { "conditions": [ { "type": "PodScheduled", "status": "False", "reason": reason } ] } }))
        };
        assert!(unschedulable(&pod("Unschedulable", None)));
        assert!(!unschedulable(&pod("SchedulingGated", None)));
        assert!(!unschedulable(&pod("Unschedulable", Some("w1"))));
    }

    #[test]
    fn a_pvs_node_is_read_from_its_required_affinity_and_patched_back() {
        let pv = |terms: serde_json::Value| -> PersistentVolume {
            from(serde_json::json!({ "spec": { "nodeAffinity": { "required": terms } } }))
        };
        let patched = affinity_patch("w2")["spec"]["nodeAffinity"]["required"].clone();
        assert_eq!(affinity_node(&pv(patched)), Some("w2".to_owned()));
        let two = serde_json::json!({ "nodeSelectorTerms": [ { "matchExpressions": [
            { "key": TOPOLOGY_KEY, "operator": "In", "values": ["w1", "w2"] } ] } ] });
        assert_eq!(affinity_node(&pv(two)), None, "a PV on two nodes is not moved");
        let other = serde_json::json!({ "nodeSelectorTerms": [ { "matchExpressions": [
            { "key": "zone", "operator": "In", "values": ["a"] } ] } ] });
        assert_eq!(affinity_node(&pv(other)), None);
    }
}
