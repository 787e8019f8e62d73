//! The lake: where Atlas keeps everything it has landed and stored.
//!
//! Owns: the lake location (a local folder or an object-store URL), raw
//! landing of original bytes with a manifest per batch, and the Delta tables
//! `resources` (the resource store), `quarantine` and `batches`, including how
//! an ingest batch is committed atomically and idempotently, and `stats`.
//!
//! May call: `atlas-ingest` for events, `atlas-fhir` for version order,
//! `deltalake`/DataFusion/object_store for storage. It never prints: callers
//! watch progress through [`ingest::Progress`] counters.
//!
//! Layout under the lake root:
//! ```text
//! raw/<source>/<yyyy-mm-dd>/<batch>/<n>-<file>   original input bytes
//! raw/<source>/<yyyy-mm-dd>/<batch>/manifest.json
//! tables/resources/   Delta, partitioned by resource_type
//! tables/quarantine/  Delta
//! tables/batches/     Delta, one row per completed batch
//! _locks/writer/      the writer lease (one writer per lake at a time)
//! ```

pub mod changes;
pub mod ingest;
pub mod lake;
pub mod lease;
pub mod schema;
pub mod stats;

pub use changes::{ChangeEvent, ChangeFeed, ChangeOp, ChangePage, ReadOptions};
pub use ingest::{BatchReport, IngestOptions, Outcomes, Progress, ingest};
pub use lake::{Lake, LakeError};
pub use lease::{LeaseHolder, LeaseOptions, WriterLease};
pub use stats::{Stats, stats};
