//! What is wrong with a volume or a pool, as the node sees it: the CSI v1.13 health vocabulary
//! (`VolumeHealthErrorType`, `StorageHealthErrorType`) with qsd-csi's reasons.
//!
//! ```text
//!   pool filesystem ─ statvfs ─┐
//!   chain files ─── exist? ────┼─► findings ─► agent.proto ─► ControllerGet/ListVolumeHealth
//!   daemon, export ─ QMP ──────┤                           └► NodeGetVolumeHealth
//!   kernel device ── node ─────┘                              NodeGetStorageHealth
//! ```
//! An empty list means healthy. Each finding has a CamelCase reason a CO can match on.

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Usable, but not as it should be (its pool nearly full).
    Degraded,
    /// Not usable from here (export, device or daemon gone; pool unreachable).
    Inaccessible,
    /// Data is gone (a layer of its chain is missing).
    DataLoss,
}

/// One thing wrong with a volume or a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// CamelCase, for machines: `PoolNearlyFull`, `PoolFull`, `LayerMissing`, ...
    pub reason: String,
    /// For people.
    pub message: String,
}

impl Finding {
    /// A finding.
    pub fn new(severity: Severity, reason: &str, message: impl Into<String>) -> Self {
        Finding { severity, reason: reason.to_owned(), message: message.into() }
    }
}

/// A pool below this share of free space is nearly full.
pub const NEARLY_FULL_PERCENT: u64 = 5;
/// A pool with less free space than this cannot allocate a qcow2 cluster or its metadata:
/// writes to unallocated clusters fail with ENOSPC.
pub const FULL_BYTES: u64 = 1 << 20;

/// What the free space of a pool's filesystem means (`None`: enough).
pub fn pool_space(pool: &str, available: u64, total: u64) -> Option<Finding> {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    if available < FULL_BYTES {
        return Some(Finding::new(
            Severity::Degraded,
            "PoolFull",
            format!(
                "pool {pool} has {:.1} MiB free: writes to unallocated space fail (ENOSPC)",
                mib(available)
            ),
        ));
    }
    if total > 0 && available.saturating_mul(100) < total.saturating_mul(NEARLY_FULL_PERCENT) {
        return Some(Finding::new(
            Severity::Degraded,
            "PoolNearlyFull",
            format!(
                "pool {pool} has {:.1} of {:.1} MiB free (under {NEARLY_FULL_PERCENT}%)",
                mib(available),
                mib(total)
            ),
        ));
    }
    None
}

/// Keeps each (severity, reason) once, the first message winning, worst first.
pub fn normalize(mut findings: Vec<Finding>) -> Vec<Finding> {
    let mut seen = std::collections::HashSet::new();
    findings.retain(|f| seen.insert((f.severity, f.reason.clone())));
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_space_findings() {
        const MIB: u64 = 1 << 20;
        // (available, total, expected reason)
        let cases = [
            (10 * MIB, 100 * MIB, None),
            (5 * MIB, 100 * MIB, None),
            (5 * MIB - 1, 100 * MIB, Some("PoolNearlyFull")),
            (MIB, 100 * MIB, Some("PoolNearlyFull")),
            (MIB - 1, 100 * MIB, Some("PoolFull")),
            (0, 0, Some("PoolFull")),
            (200 * MIB, 0, None),
        ];
        for (available, total, reason) in cases {
            let got = pool_space("p", available, total);
            assert_eq!(got.as_ref().map(|f| f.reason.as_str()), reason, "{available}/{total}");
            assert!(got.is_none_or(|f| f.severity == Severity::Degraded));
        }
    }

    #[test]
    fn normalized_findings_are_unique_and_worst_first() {
        let f = |s, r: &str| Finding::new(s, r, r);
        let got = normalize(vec![
            f(Severity::Degraded, "PoolNearlyFull"),
            f(Severity::DataLoss, "LayerMissing"),
            f(Severity::Degraded, "PoolNearlyFull"),
            f(Severity::Inaccessible, "ExportGone"),
        ]);
        let reasons: Vec<_> = got.iter().map(|f| f.reason.as_str()).collect();
        assert_eq!(reasons, ["LayerMissing", "ExportGone", "PoolNearlyFull"]);
    }
}
