//! `atlas demo`: the tour. Generates a population, ingests it, shows the
//! stats, builds the views and runs a sample query, all under one writer
//! lease, by calling the same module functions as `atlas synth`,
//! `ingest`, `stats`, `views refresh` and `sql`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use atlas_lake::{Lake, WriterLease};
use clap::Args;

use crate::cli::Globals;
use crate::{deid, ingest, lake, progress, sql, stats, synth, views};

#[derive(Args)]
#[command(after_help = "Example:
  atlas demo --patients 200 --lake /tmp/demo-lake")]
pub struct DemoArgs {
    /// How many synthetic patients.
    #[arg(long, default_value_t = 100)]
    pub patients: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub async fn run(args: DemoArgs, g: &Globals) -> Result<()> {
    let started = Instant::now();
    let lake = lake::open_lake(&g.lake)?;
    let lease = progress::take_lease(&lake, g.wait, g.show).await?;
    let result = run_leased(&lake, &g.lake, &args, g.show, &lease).await;
    lake::release(lease, result).await?;
    let elapsed = started.elapsed().as_secs_f64();
    print_next_steps(&lake, &g.lake, elapsed);
    Ok(())
}

/// Where the generated files go: next to a local lake, else a temporary folder.
fn demo_data(lake: &Lake, lake_location: &str) -> PathBuf {
    if lake.is_local() {
        PathBuf::from(format!("{}-demo-data", lake_location.trim_end_matches('/')))
    } else {
        std::env::temp_dir().join("atlas-demo-data")
    }
}

async fn run_leased(
    lake: &Lake,
    lake_location: &str,
    args: &DemoArgs,
    show: bool,
    lease: &WriterLease,
) -> Result<()> {
    let data = demo_data(lake, lake_location);
    let (patients, seed) = (args.patients, args.seed);
    eprintln!(
        "1/4 generating {patients} synthetic patients (seed {seed}) into {}",
        data.display()
    );
    let synth = synth::SynthArgs {
        scale: None,
        patients,
        seed,
        out: Some(data.clone()),
        gzip: false,
    };
    synth::run(synth, show)?;
    eprintln!("2/4 ingesting them into the lake at {}", lake.root());
    let ingest = ingest::IngestArgs {
        paths: vec![data.display().to_string()],
        source: "synth".into(),
        synthetic: true,
        max_line_bytes: 64 << 20,
        chunk_mb: 48,
        json: false,
        deid: None,
        deid_source: deid::DeidSource::default(),
    };
    ingest::run_leased(lake, &ingest, show, lease).await?;
    eprintln!("3/4 what the lake holds now:\n");
    stats::print_stats(&atlas_lake::stats(lake).await?);
    eprintln!(
        "\n4/4 building the views behind the ontology (patient, encounter, observation, ...)\n"
    );
    let store = atlas_viewstore::ViewStore::new(lake.clone());
    let reports = views::refresh(&store, &[], false, show, Some(lease.clone())).await?;
    views::print_refresh(&reports);
    let sample = "SELECT p.gender, count(DISTINCT p.id) AS patients, count(o.id) AS heart_rates, round(avg(o.value_quantity), 1) AS mean_bpm FROM patient p JOIN observation o ON o.patient_id = p.id WHERE o.code = '8867-4' GROUP BY p.gender ORDER BY p.gender";
    println!("\nA sample query across views (heart rate by gender):\n  atlas sql \"{sample}\"\n");
    sql::run(lake_location, sample, sql::SqlFormat::Table, None).await?;
    Ok(())
}

fn print_next_steps(lake: &Lake, lake_location: &str, elapsed: f64) {
    // DuckDB wants a plain path for a local lake, the URL otherwise.
    let root = lake
        .root()
        .to_file_path()
        .map(|p| format!("{}/", p.display().to_string().trim_end_matches('/')))
        .unwrap_or_else(|_| lake.root().to_string());
    println!(
        "\nDemo done in {elapsed:.1} s. Try next:
  atlas --lake {lake_location} stats --json
  atlas --lake {lake_location} views status
  atlas --lake {lake_location} ontology show
  atlas --lake {lake_location} sql \"SELECT code_display, count(*) FROM condition GROUP BY 1 ORDER BY 2 DESC LIMIT 10\"
  atlas --lake {lake_location} ingest {}      # again: nothing changes
  atlas --lake {lake_location} serve --dev-auth &
  TOKEN=$(atlas --lake {lake_location} token --sub me --scope 'user/*.rs')
  curl -s -H \"Authorization: Bearer $TOKEN\" 'localhost:8080/api/v2/ontologies/atlas/objects/Patient?pageSize=3'
  duckdb -c \"INSTALL delta; LOAD delta; SELECT resource_type, count(*) FROM delta_scan('{root}tables/resources') GROUP BY 1\"",
        demo_data(lake, lake_location).display(),
    );
}
