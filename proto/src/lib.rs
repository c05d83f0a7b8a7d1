//! Generated protocol code for qsd-csi.
//!
//! The generated code, and the conversions between `agent.proto` and the shared model
//! ([`convert`]). `proto/csi.proto` is our rendering of the CSI spec v1.13
//! (package `csi.v1`); `proto/check-wire-compat` proves in CI that every field, enum value and
//! RPC matches the published spec, so any CO or sidecar speaks to us unchanged.
//! `proto/agent.proto` is what the controller asks of a node plugin.

/// The CSI v1 types and services.
#[allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// The node agent: what the controller asks of a node's engine.
#[allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod agent {
    tonic::include_proto!("qsd.agent.v1");

    /// A node's volume events as `WatchEvents` streams them, ending when the watcher hangs up;
    /// the one stream type of every `Agent` implementation, so callers can hold any as
    /// `dyn Agent<WatchEventsStream = EventStream>`.
    pub type EventStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<VolumeEvent, tonic::Status>> + Send>,
    >;

    /// A snapshot's changed ranges as `SnapshotChanges` streams them (the one stream type of
    /// every implementation, like [`EventStream`]).
    pub type ChangesStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<ChangedRanges, tonic::Status>> + Send>,
    >;

    /// A copy's export as `ExportForCopy` streams it: one message, then open until the caller
    /// hangs up (the one stream type of every implementation, like [`EventStream`]).
    pub type CopyExportStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<CopyExport, tonic::Status>> + Send>,
    >;

    /// Writes held as `HoldWrites` streams it: one message, then held until the caller hangs
    /// up (the one stream type of every implementation, like [`EventStream`]).
    pub type HeldStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Held, tonic::Status>> + Send>>;
}

pub mod convert;
pub mod failures;
pub mod metrics;
pub mod paging;
pub mod tls;
pub mod transport;

/// Who is who between the controller and the node agents: the names their certificates carry.
///
/// ```text
///   controller  ── client certificate, CN = controller identity ──► node agent (authorizes it)
///   node agent  ── server certificate, CN = DNS name = node name ──► controller (checks the node)
/// ```
/// Pure rules shared by the signer (controller), the requester (node) and the agent's
/// authorization; no I/O.
pub mod identity {
    /// The identity the agents obey unless configured otherwise: the CN of the controller's
    /// client certificate.
    pub const DEFAULT_CONTROLLER_IDENTITY: &str = "qsd-csi-controller";

    /// The Kubernetes signer name of node agent certificates (certificates.k8s.io): node
    /// plugins ask for their certificate under it, the controller approves and signs.
    pub const AGENT_SIGNER: &str = "qsd.csi.dev/node-agent";

    /// Whether `name` can be a node's certificate name: a lowercase RFC 1123 DNS subdomain (what
    /// Kubernetes accepts as a node name), so it fits a DNS subject alternative name.
    pub fn valid_node_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn node_names_are_dns_subdomains() {
            for good in ["w1", "worker-1.example.com", "a", &"a".repeat(63)] {
                assert!(valid_node_name(good), "{good}");
            }
            let long_label = "a".repeat(64);
            let long_name = ["a"; 127].join(".") + ".ab";
            for bad in ["", "W1", "-w", "w-", "a..b", "w_1", "w 1", "*.x", &long_label, &long_name]
            {
                assert!(!valid_node_name(bad), "{bad}");
            }
        }
    }
}
