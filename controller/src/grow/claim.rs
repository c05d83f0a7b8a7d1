//! Growing a claim in a cluster: its requested storage is raised, and Kubernetes' own resizer
//! (ControllerExpandVolume) and the kubelet (NodeExpandVolume) do the growing, so the claim
//! shows the new size as any resize would.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, Patch, PatchParams};
use qsd_csi_model::grow::size;
use qsd_csi_proto::agent;

use super::{Grower, Grown};
use crate::error::said;
use crate::events::{PVC_NAME, PVC_NAMESPACE};

/// Raises claims' requests through the API server.
#[derive(Clone)]
pub struct ClaimGrower {
    client: kube::Client,
}

impl std::fmt::Debug for ClaimGrower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimGrower").finish_non_exhaustive()
    }
}

impl ClaimGrower {
    /// Through `client`.
    pub fn new(client: kube::Client) -> Self {
        ClaimGrower { client }
    }
}

#[tonic::async_trait]
impl Grower for ClaimGrower {
    async fn grow(&self, event: &agent::VolumeEvent, from: u64, to: u64) -> Result<Grown, String> {
        let (Some(namespace), Some(name)) =
            (event.labels.get(PVC_NAMESPACE), event.labels.get(PVC_NAME))
        else {
            return Err("the volume names no claim (its class was provisioned without --extra-create-metadata)".into());
        };
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        let claim =
            claims.get(name).await.map_err(|e| format!("reading claim {namespace}/{name}: {e}"))?;
        let requested = claim
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .and_then(|q| quantity_bytes(&q.0));
        if requested.is_some_and(|r| r >= to) {
            return Ok(Grown::AlreadyAsked);
        }
        let storage = format!("{}Mi", to.div_ceil(1 << 20));
        let patch =
            serde_json::json!({ "spec": { "resources": { "requests": { "storage": storage } } } });
        claims
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| {
                format!(
                    "the API server refused to raise claim {namespace}/{name}'s request to {storage}: {}",
                    said(&e)
                )
            })?;
        Ok(Grown::Done(format!(
            "claim {namespace}/{name}'s request raised from {} to {} ({storage}); Kubernetes' resizer and the kubelet grow the volume",
            size(requested.unwrap_or(from)),
            size(to),
        )))
    }
}

/// A Kubernetes quantity in bytes (`1Gi`, `1500Mi`, `2G`, `1073741824`, `1.5Gi`); `None` for
/// what is not a size.
pub fn quantity_bytes(quantity: &str) -> Option<u64> {
    let split =
        quantity.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        _ => return None,
    };
    let value: f64 = number.parse().ok()?;
    let bytes = (value * multiplier).ceil();
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::quantity_bytes;

    #[test]
    fn quantities_read_as_bytes() {
        for (q, bytes) in [
            ("1Gi", 1 << 30),
            ("1280Mi", 1280 << 20),
            ("2G", 2_000_000_000),
            ("1073741824", 1 << 30),
            ("1.5Gi", 3 << 29),
            ("500k", 500_000),
        ] {
            assert_eq!(quantity_bytes(q), Some(bytes), "{q}");
        }
        for bad in ["", "Gi", "1GB", "-1Gi", "1e3", "lots"] {
            assert_eq!(quantity_bytes(bad), None, "{bad}");
        }
    }
}
