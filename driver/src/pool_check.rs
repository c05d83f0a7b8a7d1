//! `qsd-csi pool check [--repair]`: the node library's checker (`qsd_node::pool::check`)
//! over the pools the driver's own settings name, printed for people or as JSON.

use qsd_node::pool::check::{self, Depth, Finding, Report};

use crate::engine_args::EngineArgs;
use crate::output::Output;

/// One pool's outcome.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Checked {
    pool: String,
    path: std::path::PathBuf,
    /// What a repair removed (empty without --repair).
    repaired: Vec<Finding>,
    /// The check after any repair.
    report: Report,
}

/// Checks (and repairs) every pool; prints the outcome. Returns whether every pool is clean.
pub async fn run(
    engine: &EngineArgs,
    repair: bool,
    records_only: bool,
    output: Output,
) -> anyhow::Result<bool> {
    let config = engine.config()?;
    let depth = if records_only { Depth::Records } else { Depth::Images };
    let mut all = Vec::new();
    for pool in &config.pools {
        let (repaired, report) = if repair {
            let (repaired, report) = check::repair(&pool.path, pool.kind, depth).await?;
            (repaired.removed, report)
        } else {
            (Vec::new(), check::check(&pool.path, pool.kind, depth).await?)
        };
        let name = pool.name.as_str().to_owned();
        all.push(Checked { pool: name, path: pool.path.clone(), repaired, report });
    }
    match output {
        Output::Json | Output::Yaml => println!("{}", serde_json::to_string_pretty(&all)?),
        Output::Table | Output::Wide | Output::Name => print!("{}", human(&all)),
    }
    Ok(all.iter().all(|c| c.report.findings.is_empty()))
}

fn human(all: &[Checked]) -> String {
    let mut text = String::new();
    for c in all {
        let r = &c.report;
        text += &format!(
            "pool {} ({}): {} volumes, {} snapshots, {} layers; {} leaked clusters\n",
            c.pool,
            c.path.display(),
            r.volumes,
            r.snapshots,
            r.layers,
            r.leaked_clusters
        );
        for f in &c.repaired {
            text += &format!("  repaired: {f}\n");
        }
        for f in &r.findings {
            let note = if f.repairable() { " (--repair removes it)" } else { "" };
            text += &format!("  {f}{note}\n");
        }
        if r.findings.is_empty() {
            text += "  ok\n";
        }
    }
    text
}
