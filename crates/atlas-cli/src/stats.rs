//! `atlas stats`: what the lake holds (`atlas-lake::stats`), as a table or
//! as the stable JSON document scripts read.

use anyhow::Result;
use atlas_lake::Stats;
use clap::Args;

use crate::lake::open_lake;

#[derive(Args)]
#[command(after_help = "Examples:
  atlas stats
  atlas stats --json | jq '.resources.Patient.live'

JSON shape (stable): {\"resources\": {\"<Type>\": {\"live\": n, \"deleted\": n}},
\"quarantine\": {\"<reason>\": n}, \"batches\": [{\"batch_id\", \"source\", \"started_at\",
\"finished_at\", \"lines_read\", \"stored\", \"unchanged\", \"older_than_stored\", \"quarantined\",
\"skipped\", \"deleted\", \"outcome\", \"superseded\"}]} (superseded: deprecated, = older_than_stored)")]
pub struct StatsArgs {
    /// Print the stable JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StatsArgs, lake_location: &str) -> Result<()> {
    let lake = open_lake(lake_location)?;
    let s = atlas_lake::stats(&lake).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_stats(&s);
    }
    Ok(())
}

/// The table: resources per type, quarantine reasons, one line per batch;
/// shared with `atlas demo`.
pub fn print_stats(s: &Stats) {
    println!("{:<28} {:>10} {:>10}", "resource type", "live", "deleted");
    let (mut live, mut deleted) = (0, 0);
    for (t, c) in &s.resources {
        println!("{:<28} {:>10} {:>10}", t, c.live, c.deleted);
        live += c.live;
        deleted += c.deleted;
    }
    println!("{:<28} {:>10} {:>10}", "total", live, deleted);
    if !s.quarantine.is_empty() {
        println!("\n{:<28} {:>10}", "quarantine reason", "lines");
        for (r, n) in &s.quarantine {
            println!("{r:<28} {n:>10}");
        }
    }
    println!("\n{} batches", s.batches.len());
    for b in &s.batches {
        println!(
            "  {} {} {}: read {} stored {} unchanged {} older than stored {} quarantined {} skipped {}",
            b.batch_id,
            b.source,
            b.started_at,
            b.lines_read,
            b.stored,
            b.unchanged,
            b.older_than_stored,
            b.quarantined,
            b.skipped
        );
    }
}
