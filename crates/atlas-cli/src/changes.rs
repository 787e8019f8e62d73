//! `atlas changes`: the resource store's change feed
//! (`atlas_lake::ChangeFeed`) as NDJSON, one change per line, from a store
//! version on; `--follow` keeps reading new commits.

use std::time::Duration;

use anyhow::Result;
use atlas_lake::ChangeFeed;
use atlas_lake::changes::ReadOptions;
use clap::Args;

use crate::lake::open_lake;

#[derive(Args)]
#[command(after_help = "Examples:
  atlas changes --since 0
  atlas changes --since 12 --until 20 --types Observation,Condition
  atlas changes --follow | jq -c 'select(.op == \"delete\")'

Each line: {\"storeVersion\", \"seq\", \"type\", \"id\", \"version\", \"op\": create|update|delete,
\"batch\", \"patient\", \"lastUpdated\", \"contentHash\"}. `--since N` starts after store
version N (-1: from the first commit). When the store's log no longer reaches back to N
(log cleanup), the live rows of the newest version are printed instead and a warning on
stderr says so.")]
pub struct ChangesArgs {
    /// Start after this store version (-1: from the first commit; default:
    /// the newest, which with --follow prints only what comes next).
    #[arg(long, allow_negative_numbers = true)]
    pub since: Option<i64>,
    /// Stop at this store version.
    #[arg(long)]
    pub until: Option<i64>,
    /// Only these resource types (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub types: Vec<String>,
    /// Keep reading new commits (every --poll-ms) until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// How often --follow looks for new commits, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
}

pub async fn run(args: ChangesArgs, lake_location: &str) -> Result<()> {
    let lake = open_lake(lake_location)?;
    let feed = ChangeFeed::new(lake);
    let newest = feed.latest_version().await?.unwrap_or(-1);
    let mut since = args.since.unwrap_or(newest);
    if since < -1 {
        anyhow::bail!("--since {since}: a store version, or -1 for the first commit on");
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let opts = ReadOptions {
            with_resources: false,
            max_commits: None,
            until: args.until,
            scan_when_gone: true,
        };
        let page = feed.read(since, &opts).await?;
        if let Some(why) = &page.fallback {
            eprintln!("warning: {why}");
        }
        for e in &page.events {
            if args.types.is_empty() || args.types.contains(&e.resource_type) {
                serde_json::to_writer(&mut out, e)?;
                std::io::Write::write_all(&mut out, b"\n")?;
            }
        }
        std::io::Write::flush(&mut out)?;
        let done = args.until.is_some_and(|u| page.until >= u);
        if done || (page.until >= page.latest && !args.follow) {
            return Ok(());
        }
        if page.until == since {
            tokio::time::sleep(Duration::from_millis(args.poll_ms.max(10))).await;
        }
        since = page.until;
    }
}
