//! De-identification of FHIR R4 resources.
//!
//! Owns: reading Microsoft's FHIR anonymizer configurations ([`DeidConfig`]),
//! the engine that applies them node by node ([`Deidentifier`]) with the
//! upstream tool's results on its test pairs, Atlas's additions
//! (`dateShiftScope: patient`, the built-in Safe-Harbor-minimal profile, a
//! record per resource of which elements changed and how), and the
//! streaming, parallel NDJSON driver behind `atlas deid` ([`stream`]).
//!
//! May call: `atlas-fhirpath` (the R4 model, its JSON tree, FHIRPath for
//! `where(...)` criteria and generalize cases), `atlas-ingest` (reading
//! inputs: NDJSON, Bundles, gzip, folders, with quarantine reasons) and
//! `atlas-fhir`. No storage, no async, no DataFusion: the lake and the
//! server call this crate, not the other way round.

mod config;
mod dates;
pub mod encrypt;
mod engine;
pub mod profile;
mod select;
pub mod stream;
mod tree;

pub use config::{ConfigError, DateShiftScope, DeidConfig, Parameters, ProcessingErrors, Rule};
pub use engine::{Change, DeidError, Deidentified, Deidentifier, Operation, ResourceContext};
pub use tree::InvalidInput;
