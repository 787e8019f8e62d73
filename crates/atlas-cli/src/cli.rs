//! The command line: the global flags and the list of commands.
//!
//! Each command's own flags and examples live in the module that runs it
//! (`ingest::IngestArgs`, `views::ViewsCommand`, ...), so a command's
//! definition and its body are read together; this file only names them,
//! in the order `atlas --help` lists them.

use clap::{Parser, Subcommand};

use crate::{
    audit, changes, deid, demo, fhirpath, ingest, mockehr, ontology, policy, pull, serve, sql,
    stats, synth, token, view, views,
};

const AFTER_HELP: &str = "Examples:
  atlas demo                                   generate 100 patients, ingest them, show stats
  atlas synth --patients 1000 --seed 7 --out data/
  atlas ingest data/                           ingest every .ndjson/.json/.tar.gz below data/
  atlas stats --json

The lake is ./atlas-lake unless --lake or ATLAS_LAKE says otherwise; it may be
a folder or an s3://, gs:// or az:// URL (credentials from AWS_*/GOOGLE_*/AZURE_* variables).";

#[derive(Parser)]
#[command(name = "atlas", version, about = "Atlas: an open FHIR R4 data platform", after_help = AFTER_HELP)]
pub struct Cli {
    /// Where the lake lives: a folder or an object-store URL.
    #[arg(
        long,
        global = true,
        env = "ATLAS_LAKE",
        default_value = "./atlas-lake"
    )]
    pub lake: String,
    /// No progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Commands that write the lake (ingest, views refresh/create/drop,
    /// demo) hold its writer lease: one writer at a time. When another
    /// writer holds it, wait (showing who) instead of failing at once.
    #[arg(long, global = true)]
    pub wait: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// What every command gets besides its own arguments.
pub struct Globals {
    /// The `--lake` location, as given (a folder or an object-store URL).
    pub lake: String,
    /// Draw progress bars: not `--quiet` and stderr is a terminal.
    pub show: bool,
    /// `--wait` for the writer lease instead of failing at once.
    pub wait: bool,
}

// Doc comments here are `--help` text, where `<lake>` is a placeholder
// for the user, not an HTML tag.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Subcommand)]
pub enum Command {
    /// Land and store FHIR inputs: NDJSON (.ndjson, .ndjson.gz), JSON resources and Bundles,
    /// folders, .tar.gz archives, or `-` for stdin.
    Ingest(ingest::IngestArgs),
    /// De-identify FHIR inputs into per-type NDJSON with a Microsoft FHIR
    /// anonymizer configuration or the built-in safe-harbor-minimal profile.
    Deid(deid::DeidArgs),
    /// Show what the lake holds: resources per type, quarantine reasons, batches.
    Stats(stats::StatsArgs),
    /// Print the resource store's change feed: what each commit created,
    /// updated or deleted, from a store version on (or follow it).
    Changes(changes::ChangesArgs),
    /// Generate deterministic synthetic FHIR R4 data, or scale a real dataset.
    Synth(synth::SynthArgs),
    /// Evaluate FHIRPath expressions, or run the HL7 FHIRPath conformance suite.
    #[command(subcommand)]
    Fhirpath(fhirpath::FhirpathCommand),
    /// Run SQL-on-FHIR v2 ViewDefinitions over files or the lake, or run the
    /// SQL-on-FHIR conformance suite.
    #[command(subcommand)]
    View(view::ViewCommand),
    /// Materialized views: the built-in views behind the ontology plus your
    /// own, written as Delta tables under <lake>/views/ and refreshed incrementally.
    #[command(subcommand)]
    Views(views::ViewsCommand),
    /// The ontology: object types backed by views, their links and saved object sets.
    #[command(subcommand)]
    Ontology(ontology::OntologyCommand),
    /// Run read-only SQL (DataFusion) over the lake: every view by name
    /// (patient, encounter, observation, ...) and the resources, quarantine
    /// and batches tables.
    Sql(sql::SqlArgs),
    /// Serve the lake over HTTP: object sets (Foundry ontology API v2
    /// shape) behind bearer-token auth, ontology metadata, health and
    /// Prometheus metrics.
    Serve(serve::ServeArgs),
    /// Test an access policy before deploying it: the decision, the rows,
    /// the hidden fields and the rules behind them.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// The audit trail `atlas serve` writes: verify its hash chain, export
    /// it as FHIR AuditEvent.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Mint a bearer token from the lake's local dev issuer (accepted by
    /// `atlas serve --dev-auth` on the same lake).
    Token(token::TokenArgs),
    /// Generate a small population, ingest it and show what to try next.
    Demo(demo::DemoArgs),
    /// Pull from a FHIR server into the lake: Bulk Data `$export` with SMART
    /// Backend Services auth, or REST `_lastUpdated`/`_history` deltas.
    #[command(subcommand)]
    Pull(pull::PullCommand),
    /// Run a deterministic mock EHR on loopback (FHIR R4 REST, Bulk Data
    /// `$export`, SMART Backend Services, scripted faults) for demos and tests.
    MockEhr(mockehr::MockEhrArgs),
    /// FHIRcast: follow an external hub's session topic and republish its
    /// context changes to this server's hub (`atlas fhircast listen`).
    #[command(subcommand)]
    Fhircast(crate::fhircast::FhircastCommand),
}
