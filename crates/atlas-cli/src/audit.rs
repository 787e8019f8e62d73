//! `atlas audit verify` and `atlas audit export`: the lake's audit trail,
//! written by `atlas serve` (one hash-chained record per request).

use anyhow::{Context, Result};
use atlas_audit::{AuditStore, audit_event, records, verify};
use clap::{Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the whole trail: every record present, in order, unchanged.
    /// Names the first bad record and exits with status 1.
    #[command(after_help = "Example:
  atlas --lake /tmp/demo-lake audit verify

Prints the number of records and each chain's head (one chain per server
run); keep the newest head elsewhere (a ticket, a log) to be able to prove
later that nothing was cut off the end.")]
    Verify,
    /// Write the trail as FHIR R4 AuditEvent NDJSON (or the records as they
    /// are stored).
    #[command(after_help = "Examples:
  atlas --lake /tmp/demo-lake audit export --format auditevent --out audit.ndjson
  atlas --lake /tmp/demo-lake audit export --format records | jq -c 'select(.decision == \"deny\")'")]
    Export {
        #[arg(long, value_enum, default_value_t = ExportFormat::Auditevent)]
        format: ExportFormat,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// FHIR R4 AuditEvent, one per line.
    Auditevent,
    /// The chained records as stored.
    Records,
}

fn store(lake_location: &str) -> Result<AuditStore> {
    let lake = crate::lake::open_lake(lake_location)?;
    let local = lake
        .is_local()
        .then(|| lake.root().to_file_path().ok())
        .flatten();
    Ok(AuditStore::new(
        lake.object_store().clone(),
        &lake.path(""),
        local,
    ))
}

pub async fn run(cmd: AuditCommand, lake_location: &str) -> Result<()> {
    let store = store(lake_location)?;
    match cmd {
        AuditCommand::Verify => match verify(&store).await? {
            Ok(r) => {
                println!(
                    "audit trail sound: {} records in {} chains ({} segments)",
                    r.records, r.chains, r.segments
                );
                for (chain, seq, hash) in &r.heads {
                    println!("  chain {chain}: {seq} records, head {hash}");
                }
                if r.torn_tail {
                    println!(
                        "note: a chain ends in a partial record from a crash; it was never acknowledged (no response carried it) and is not counted"
                    );
                }
                Ok(())
            }
            Err(b) => {
                println!("audit trail BROKEN at {b}");
                std::process::exit(1);
            }
        },
        AuditCommand::Export { format, out } => {
            let recs = records(&store).await?;
            let mut w: Box<dyn Write> = match &out {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            for r in &recs {
                let line = match format {
                    ExportFormat::Auditevent => serde_json::to_string(&audit_event(r))?,
                    ExportFormat::Records => serde_json::to_string(r)?,
                };
                writeln!(w, "{line}")?;
            }
            w.flush()?;
            if let Some(p) = out {
                eprintln!("{} records written to {}", recs.len(), p.display());
            }
            Ok(())
        }
    }
}
