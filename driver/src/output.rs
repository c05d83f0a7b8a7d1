//! How client commands print what they got, the way kubectl does: a table by default (`wide`
//! adds columns), `json` or `yaml` for programs, `name` for the bare IDs a shell captures
//! (`V=$(qsd-csi volume create data -o name)`). Times are RFC 3339 in json, yaml and wide,
//! and an age ("5m", "3d") in the default table.

use std::time::{Duration, SystemTime};

use qsd_csi_proto::csi;
use serde::Serialize;

use crate::calls::human;

/// An output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Columns for people.
    #[default]
    Table,
    /// More columns.
    Wide,
    /// JSON: an object, or an array for lists.
    Json,
    /// YAML: a mapping, or a sequence for lists.
    Yaml,
    /// The IDs alone, one per line.
    Name,
}

/// A volume as the client prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeView {
    /// Its ID.
    pub id: String,
    /// Its size in bytes.
    pub size_bytes: i64,
    /// The snapshot or volume it was made from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Nodes it is published on (list only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub published_nodes: Vec<String>,
    /// Its pool.
    pub pool: String,
    /// The node a local pool's volume lives on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl VolumeView {
    /// What a CSI volume (and, from a list, its status) says.
    pub fn new(v: &csi::Volume, published: Vec<String>) -> Self {
        use csi::volume_content_source::Type;
        let source = match v.content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            Some(Type::Snapshot(s)) => Some(s.snapshot_id.clone()),
            Some(Type::Volume(s)) => Some(s.volume_id.clone()),
            None => None,
        };
        let node = v
            .accessible_topology
            .iter()
            .find_map(|t| t.segments.get(qsd_csi_model::params::TOPOLOGY_KEY).cloned());
        VolumeView {
            id: v.volume_id.clone(),
            size_bytes: v.capacity_bytes,
            source,
            published_nodes: published,
            pool: v.volume_context.get("pool").cloned().unwrap_or_default(),
            node,
        }
    }
}

/// A snapshot as the client prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotView {
    /// Its ID.
    pub id: String,
    /// The size of the volume it was taken of, in bytes.
    pub size_bytes: i64,
    /// That volume's ID.
    pub source_volume_id: String,
    /// When it was taken, RFC 3339 (UTC).
    pub created_at: String,
    /// Whether it can be restored from.
    pub ready_to_use: bool,
    #[serde(skip)]
    created: Option<SystemTime>,
}

impl SnapshotView {
    /// What a CSI snapshot says.
    pub fn new(s: &csi::Snapshot) -> Self {
        let created = s.creation_time.as_ref().and_then(|t| {
            let secs = u64::try_from(t.seconds).ok()?;
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        });
        SnapshotView {
            id: s.snapshot_id.clone(),
            size_bytes: s.size_bytes,
            source_volume_id: s.source_volume_id.clone(),
            created_at: created.map(rfc3339).unwrap_or_default(),
            ready_to_use: s.ready_to_use,
            created,
        }
    }
}

/// A time as RFC 3339, in UTC, to the second.
pub fn rfc3339(at: SystemTime) -> String {
    let time = time::OffsetDateTime::from(at)
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// How long ago, as kubectl prints ages: `45s`, `12m`, `5h`, `3d`.
pub fn age(then: SystemTime, now: SystemTime) -> String {
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Rows with their columns aligned (two spaces apart), as kubectl's tables.
fn table(rows: Vec<Vec<String>>) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len().saturating_sub(1);
        for (c, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if c < last {
                out.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
            }
        }
        out.push('\n');
    }
    out
}

fn serialized<T: Serialize>(value: &T, output: Output) -> Result<String, String> {
    match output {
        Output::Json => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(|e| format!("cannot print JSON: {e}")),
        _ => serde_saphyr::to_string(value).map_err(|e| format!("cannot print YAML: {e}")),
    }
}

/// Volumes in `output` (a list when `list`, else the one volume created).
pub fn volumes(views: &[VolumeView], output: Output, list: bool) -> Result<String, String> {
    let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    match output {
        Output::Name => Ok(views.iter().map(|v| format!("{}\n", v.id)).collect()),
        Output::Json | Output::Yaml if list => serialized(&views, output),
        Output::Json | Output::Yaml => match views.first() {
            Some(v) => serialized(v, output),
            None => Ok(String::new()),
        },
        Output::Table | Output::Wide => {
            let wide = output == Output::Wide;
            let mut header = vec!["ID", "SIZE", "SOURCE", "PUBLISHED"];
            if wide {
                header.extend(["POOL", "NODE", "BYTES"]);
            }
            let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
            for v in views {
                let published = if v.published_nodes.is_empty() {
                    "-".into()
                } else {
                    v.published_nodes.join(",")
                };
                let mut row = vec![v.id.clone(), human(v.size_bytes), dash(&v.source), published];
                if wide {
                    row.extend([v.pool.clone(), dash(&v.node), v.size_bytes.to_string()]);
                }
                rows.push(row);
            }
            Ok(table(rows))
        }
    }
}

/// Snapshots in `output` (a list when `list`, else the one taken); ages are counted to `now`.
pub fn snapshots(
    views: &[SnapshotView],
    output: Output,
    list: bool,
    now: SystemTime,
) -> Result<String, String> {
    match output {
        Output::Name => Ok(views.iter().map(|s| format!("{}\n", s.id)).collect()),
        Output::Json | Output::Yaml if list => serialized(&views, output),
        Output::Json | Output::Yaml => match views.first() {
            Some(s) => serialized(s, output),
            None => Ok(String::new()),
        },
        Output::Table | Output::Wide => {
            let wide = output == Output::Wide;
            let created = if wide { "CREATED" } else { "AGE" };
            let mut header = vec!["ID", "SIZE", "SOURCE", created];
            if wide {
                header.extend(["READY", "BYTES"]);
            }
            let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
            for s in views {
                let when = match (wide, s.created) {
                    (true, _) => s.created_at.clone(),
                    (false, Some(at)) => age(at, now),
                    (false, None) => "-".into(),
                };
                let mut row =
                    vec![s.id.clone(), human(s.size_bytes), s.source_volume_id.clone(), when];
                if wide {
                    row.extend([s.ready_to_use.to_string(), s.size_bytes.to_string()]);
                }
                rows.push(row);
            }
            Ok(table(rows))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> VolumeView {
        VolumeView {
            id: "vol:default@n1:data".into(),
            size_bytes: 10 << 30,
            source: Some("snap:default@n1:s1".into()),
            published_nodes: vec![],
            pool: "default".into(),
            node: Some("n1".into()),
        }
    }

    fn snapshot(at: u64) -> SnapshotView {
        SnapshotView::new(&csi::Snapshot {
            size_bytes: 1 << 30,
            snapshot_id: "snap:default@n1:s1".into(),
            source_volume_id: "vol:default@n1:data".into(),
            creation_time: Some(prost_types::Timestamp { seconds: at as i64, nanos: 0 }),
            ready_to_use: true,
            group_snapshot_id: String::new(),
            accessible_topology: vec![],
        })
    }

    #[test]
    fn name_prints_the_bare_id_a_shell_can_capture() {
        assert_eq!(volumes(&[volume()], Output::Name, false), Ok("vol:default@n1:data\n".into()));
        let s = snapshots(&[snapshot(0)], Output::Name, true, SystemTime::now());
        assert_eq!(s, Ok("snap:default@n1:s1\n".into()));
    }

    #[test]
    fn tables_align_and_wide_adds_columns() {
        let t = volumes(&[volume()], Output::Table, true).expect("table");
        assert_eq!(
            t,
            "ID                   SIZE  SOURCE              PUBLISHED\n\
             vol:default@n1:data  10G   snap:default@n1:s1  -\n"
        );
        let w = volumes(&[volume()], Output::Wide, true).expect("wide");
        assert!(w.lines().next().is_some_and(|h| h.ends_with("POOL     NODE  BYTES")), "{w}");
        assert!(w.contains("default  n1    10737418240"), "{w}");
    }

    #[test]
    fn times_are_rfc3339_or_an_age_never_a_raw_epoch() {
        // 2026-12-01T18:14:56Z
        let s = snapshot(1_796_148_896);
        assert_eq!(s.created_at, "2026-12-01T18:14:56Z");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_148_896 + 3 * 3600);
        let t = snapshots(std::slice::from_ref(&s), Output::Table, true, now).expect("table");
        assert!(
            t.starts_with("ID ") && t.contains("  AGE\n") && t.trim_end().ends_with("  3h"),
            "{t}"
        );
        let w = snapshots(std::slice::from_ref(&s), Output::Wide, true, now).expect("wide");
        assert!(w.contains("2026-12-01T18:14:56Z") && !w.contains("1796148896"), "{w}");
        for (secs, shown) in
            [(5, "5s"), (119, "119s"), (600, "10m"), (7200, "2h"), (3 * 86_400, "3d")]
        {
            let then = SystemTime::UNIX_EPOCH;
            assert_eq!(age(then, then + Duration::from_secs(secs)), shown);
        }
    }

    #[test]
    fn json_and_yaml_carry_every_field_with_camel_case_keys() {
        let j = volumes(&[volume()], Output::Json, false).expect("json");
        let parsed: serde_json::Value = serde_json::from_str(&j).expect("valid JSON");
        assert_eq!(parsed["id"], "vol:default@n1:data");
        assert_eq!(parsed["sizeBytes"], 10_i64 << 30);
        assert_eq!(parsed["node"], "n1");
        let list = snapshots(&[snapshot(1_796_148_896)], Output::Json, true, SystemTime::now());
        let parsed: serde_json::Value = serde_json::from_str(&list.expect("json")).expect("valid");
        assert_eq!(parsed[0]["createdAt"], "2026-12-01T18:14:56Z");
        assert_eq!(parsed[0]["readyToUse"], true);
        let y = volumes(&[volume()], Output::Yaml, true).expect("yaml");
        assert!(y.starts_with("- id: vol:default@n1:data\n"), "{y}");
        assert!(y.contains("  sizeBytes: 10737418240\n"), "{y}");
    }
}
