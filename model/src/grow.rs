//! Claims that grow themselves: a class's `autoExpand*` parameters, and the one decision made
//! when such a volume crosses its write threshold.
//!
//! ```text
//!   crossing (allocation, size, filesystem usage, pool free) ─► AutoExpand::decide ─► Growth
//!     Grow { to }      cluster: patch the claim's request │ standalone: expand it here
//!     otherwise        say why (Event / log), once; the volume keeps working
//! ```
//! The decision is pure so that the cluster controller and standalone mode make the same one,
//! and so that it is tested as a table.

use serde::{Deserialize, Serialize};

use crate::params::{bytes, threshold_percent};
use crate::{Error, Result};

/// Parameter: `"true"` makes the volume grow itself when its write threshold is crossed.
pub const AUTO_EXPAND: &str = "autoExpand";
/// Parameter: how much one growth adds: a percentage of the current size (`25%`) or a size
/// (`1Gi`). Default `25%`.
pub const AUTO_EXPAND_STEP: &str = "autoExpandStep";
/// Parameter: the largest size growth reaches (a size). Default: no limit but the pool's space.
pub const AUTO_EXPAND_LIMIT: &str = "autoExpandLimit";

/// The write threshold of an auto-expanding class that names none (`writeThresholdPercent`).
pub const DEFAULT_THRESHOLD_PERCENT: u64 = 80;
/// The step of a class that names none.
pub const DEFAULT_STEP: Step = Step::Percent(25);
/// Sizes grow in whole MiB.
pub const ALIGN: u64 = 1 << 20;

/// How much one growth adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// This percentage of the size at the time (1 to 1000).
    Percent(u64),
    /// This many bytes.
    Bytes(u64),
}

impl Step {
    /// Parses `25%` or a size (`1Gi`).
    pub fn parse(value: &str) -> Result<Step> {
        if let Some(digits) = value.strip_suffix('%') {
            return digits
                .parse()
                .ok()
                .filter(|p| (1..=1000).contains(p))
                .map(Step::Percent)
                .ok_or_else(|| {
                    Error::invalid(
                        AUTO_EXPAND_STEP,
                        format!("{value:?} is not a whole percentage from 1% to 1000%"),
                    )
                });
        }
        match bytes(AUTO_EXPAND_STEP, value)? {
            0 => Err(Error::invalid(AUTO_EXPAND_STEP, "a step of 0 bytes grows nothing")),
            n => Ok(Step::Bytes(n)),
        }
    }

    /// The bytes this step adds to a volume of `size` bytes, in whole MiB (at least one).
    pub fn bytes_for(self, size: u64) -> u64 {
        let raw = match self {
            Step::Percent(p) => (u128::from(size) * u128::from(p) / 100) as u64,
            Step::Bytes(n) => n,
        };
        raw.div_ceil(ALIGN).max(1).saturating_mul(ALIGN)
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Percent(p) => write!(f, "{p}%"),
            Step::Bytes(n) => write!(f, "{}", crate::grow::size(*n)),
        }
    }
}

/// An auto-expanding volume's policy, kept in its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoExpand {
    /// How much one growth adds.
    pub step: Step,
    /// The largest size growth reaches (`None`: the pool's space is the limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// The write threshold, percent of the size; a filesystem grows only once its own usage
    /// reaches it too.
    pub threshold_percent: u64,
}

impl AutoExpand {
    /// The policy a class's parameters ask for: `None` unless `autoExpand` is `"true"`. `get`
    /// looks a parameter up. A step or limit without `autoExpand: "true"` is refused (it would
    /// silently do nothing).
    pub fn from_parameters<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Option<Self>> {
        let enabled = match get(AUTO_EXPAND) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(Error::invalid(
                    AUTO_EXPAND,
                    format!("{other:?} is neither \"true\" nor \"false\""),
                ))
            }
        };
        let step = get(AUTO_EXPAND_STEP).map(Step::parse).transpose()?;
        let limit = get(AUTO_EXPAND_LIMIT).map(|v| bytes(AUTO_EXPAND_LIMIT, v)).transpose()?;
        if !enabled {
            if let Some(key) =
                [(AUTO_EXPAND_STEP, step.is_some()), (AUTO_EXPAND_LIMIT, limit.is_some())]
                    .into_iter()
                    .find_map(|(key, set)| set.then_some(key))
            {
                return Err(Error::invalid(key, "is set but autoExpand is not \"true\""));
            }
            return Ok(None);
        }
        let threshold_percent = match get(crate::params::WRITE_THRESHOLD_PERCENT) {
            Some(value) => threshold_percent(value)?,
            None => DEFAULT_THRESHOLD_PERCENT,
        };
        Ok(Some(AutoExpand { step: step.unwrap_or(DEFAULT_STEP), limit, threshold_percent }))
    }

    /// What to do about a crossing.
    pub fn decide(&self, crossing: &Crossing) -> Growth {
        let size = crossing.size;
        match crossing.filesystem {
            // A filesystem's own usage says whether it fills: rewritten or deleted files
            // allocate in the image without filling the filesystem.
            Some(fs) if !reached(fs.used, fs.total, self.threshold_percent) => {
                return Growth::NotFilling { used: fs.used, total: fs.total }
            }
            Some(_) => {}
            // A block volume fills by its allocation; one already grown since the crossing
            // (its size now larger) needs nothing more.
            None if !reached(crossing.allocated, size, self.threshold_percent) => {
                return Growth::Enough { allocated: crossing.allocated, size }
            }
            None => {}
        }
        let limit = self.limit.map(|l| l / 512 * 512);
        if let Some(limit) = limit.filter(|l| size >= *l) {
            return Growth::AtLimit { size, limit };
        }
        let wanted = size.saturating_add(self.step.bytes_for(size));
        let to = limit.map_or(wanted, |l| wanted.min(l));
        if let Some(free) = crossing.pool_free.filter(|free| to - size > *free) {
            return Growth::NoRoom { step: to - size, free };
        }
        Growth::Grow { from: size, to }
    }
}

/// `part` is at least `percent` of `whole`.
fn reached(part: u64, whole: u64, percent: u64) -> bool {
    u128::from(part) * 100 >= u128::from(whole) * u128::from(percent)
}

/// A filesystem's usage (as NodeGetVolumeStats reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    /// Bytes used.
    pub used: u64,
    /// Bytes in all.
    pub total: u64,
}

/// What is known when a threshold is crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossing {
    /// The volume's size now.
    pub size: u64,
    /// Host bytes its head image had allocated when the threshold fired.
    pub allocated: u64,
    /// Its filesystem's usage, when it is staged with one.
    pub filesystem: Option<FsUsage>,
    /// Free bytes in its pool, when known.
    pub pool_free: Option<u64>,
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// Grow the volume from `from` to `to` bytes.
    Grow {
        /// The size now.
        from: u64,
        /// The size wanted.
        to: u64,
    },
    /// The filesystem is not filling (files rewritten or deleted): no growth.
    NotFilling {
        /// Its used bytes.
        used: u64,
        /// Its size.
        total: u64,
    },
    /// The volume's allocation is below the threshold of its present size (it grew already).
    Enough {
        /// Allocated bytes at the crossing.
        allocated: u64,
        /// The size now.
        size: u64,
    },
    /// The volume is at its class's limit.
    AtLimit {
        /// The size now.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The pool cannot hold the step.
    NoRoom {
        /// Bytes the growth would add.
        step: u64,
        /// Free bytes in the pool.
        free: u64,
    },
}

impl Growth {
    /// Why nothing grows, for people; `None` for [`Growth::Grow`] and for the quiet outcomes
    /// (nothing to do).
    pub fn refusal(&self, volume: &str) -> Option<String> {
        match *self {
            Growth::Grow { .. } | Growth::NotFilling { .. } | Growth::Enough { .. } => None,
            Growth::AtLimit { size, limit } => Some(format!(
                "volume {volume} is at its autoExpandLimit ({} of {}): it is not grown further and keeps working",
                self::size(size),
                self::size(limit)
            )),
            Growth::NoRoom { step, free } => Some(format!(
                "volume {volume} cannot grow by {}: its pool has {} free; it keeps working at its present size",
                self::size(step),
                self::size(free)
            )),
        }
    }
}

/// A size for people: `1.25 GiB`, `512 MiB`.
pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn params(list: &[(&str, &str)]) -> Result<Option<AutoExpand>> {
        let list: Vec<(String, String)> =
            list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        AutoExpand::from_parameters(|key| {
            list.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
        })
    }

    #[test]
    fn parameters_make_a_policy_or_say_what_is_wrong() {
        assert_eq!(params(&[]), Ok(None));
        assert_eq!(params(&[(AUTO_EXPAND, "false")]), Ok(None));
        assert_eq!(
            params(&[(AUTO_EXPAND, "true")]),
            Ok(Some(AutoExpand { step: Step::Percent(25), limit: None, threshold_percent: 80 }))
        );
        assert_eq!(
            params(&[
                (AUTO_EXPAND, "true"),
                (AUTO_EXPAND_STEP, "1Gi"),
                (AUTO_EXPAND_LIMIT, "3Gi"),
                ("writeThresholdPercent", "70"),
            ]),
            Ok(Some(AutoExpand {
                step: Step::Bytes(GIB),
                limit: Some(3 * GIB),
                threshold_percent: 70
            }))
        );
        for bad in [
            vec![(AUTO_EXPAND, "yes")],
            vec![(AUTO_EXPAND, "true"), (AUTO_EXPAND_STEP, "0%")],
            vec![(AUTO_EXPAND, "true"), (AUTO_EXPAND_STEP, "2000%")],
            vec![(AUTO_EXPAND, "true"), (AUTO_EXPAND_STEP, "0")],
            vec![(AUTO_EXPAND, "true"), (AUTO_EXPAND_STEP, "lots")],
            vec![(AUTO_EXPAND, "true"), (AUTO_EXPAND_LIMIT, "3GB")],
            vec![(AUTO_EXPAND_STEP, "25%")],
            vec![(AUTO_EXPAND, "false"), (AUTO_EXPAND_LIMIT, "3Gi")],
        ] {
            assert!(params(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_crossing_is_decided_by_usage_limit_and_room() {
        let policy =
            AutoExpand { step: Step::Percent(25), limit: Some(3 * GIB), threshold_percent: 80 };
        let block =
            |size, allocated| Crossing { size, allocated, filesystem: None, pool_free: None };
        let fs = |used| Crossing {
            filesystem: Some(FsUsage { used, total: GIB - 10 * MIB }),
            ..block(GIB, 850 * MIB)
        };
        let table = [
            (
                "block, filling",
                block(GIB, 850 * MIB),
                Growth::Grow { from: GIB, to: GIB + 256 * MIB },
            ),
            (
                "block, grown since",
                block(GIB + 256 * MIB, 850 * MIB),
                Growth::Enough { allocated: 850 * MIB, size: GIB + 256 * MIB },
            ),
            ("filesystem filling", fs(900 * MIB), Growth::Grow { from: GIB, to: GIB + 256 * MIB }),
            (
                "filesystem rewritten",
                fs(100 * MIB),
                Growth::NotFilling { used: 100 * MIB, total: GIB - 10 * MIB },
            ),
            (
                "the step capped at the limit",
                block(2800 * MIB, 2500 * MIB),
                Growth::Grow { from: 2800 * MIB, to: 3 * GIB },
            ),
            (
                "at the limit",
                block(3 * GIB, 2600 * MIB),
                Growth::AtLimit { size: 3 * GIB, limit: 3 * GIB },
            ),
            (
                "no room",
                Crossing { pool_free: Some(100 * MIB), ..block(GIB, 900 * MIB) },
                Growth::NoRoom { step: 256 * MIB, free: 100 * MIB },
            ),
            (
                "room",
                Crossing { pool_free: Some(GIB), ..block(GIB, 900 * MIB) },
                Growth::Grow { from: GIB, to: GIB + 256 * MIB },
            ),
        ];
        for (what, crossing, expected) in table {
            assert_eq!(policy.decide(&crossing), expected, "{what}");
        }
        let unlimited =
            AutoExpand { step: Step::Bytes(100_000), limit: None, threshold_percent: 80 };
        assert_eq!(unlimited.decide(&block(GIB, GIB)), Growth::Grow { from: GIB, to: GIB + MIB });
        assert!(Growth::AtLimit { size: GIB, limit: GIB }
            .refusal("v")
            .is_some_and(|s| s.contains("autoExpandLimit")));
        assert_eq!(Growth::Enough { allocated: 1, size: 2 }.refusal("v"), None);
    }
}
