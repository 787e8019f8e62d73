//! The access seam: the one way data leaves an Atlas lake.
//!
//! # What this crate owns
//! * [`Access`]: what every serving path shares (the lake's tables at
//!   latest or pinned versions, the policy in force, page-token keys,
//!   de-identifiers) and [`Access::decide`], the one access decision
//!   (`atlas-policy`'s `PolicyEngine` over the principal's SMART scopes,
//!   `patient` claim, purpose of use and the policy file's rules).
//! * Scoped scans ([`query`]): every table a request reads is opened
//!   through `Planner::scan`, which applies the grant's row scope to the
//!   scan itself, under every filter, sort, count, aggregate and link;
//!   keyset pages over pinned Delta versions with signed page tokens
//!   ([`token`]); one patient's rows read straight from the clustered view
//!   files ([`mod@slice`]).
//! * [`Egress`]: the only place a row or a resource leaves. It notes each
//!   answered patient for the audit trail, counts rows, removes what the
//!   grant hides and applies the grant's de-identification, for Arrow
//!   batches, object JSON and FHIR JSON alike.
//! * The request's audit facts ([`facts`]) the HTTP layer writes into each
//!   record.
//! * Change notices ([`notice`]): what the events paths (SSE,
//!   Subscriptions) may tell a principal about a change, through `Egress`.
//! * SQL for people ([`sql`]): a DataFusion session whose tables are the
//!   views (and the resource store) as one principal's grant sees them.
//!
//! # What it may call
//! `atlas-policy` (decisions), `atlas-deid` (egress de-identification),
//! `atlas-lake` and `atlas-viewstore` (tables), `atlas-ontology` and
//! `atlas-objectset` (object types and sets), `atlas-fhirpath` (policy
//! criteria, hidden element paths), DataFusion and deltalake. Not axum:
//! the HTTP layer (`atlas-serve`) parses requests, calls this crate and
//! writes the answers; future paths (Bulk export, AI context, events) do
//! the same.

pub mod deid;
pub mod egress;
mod error;
pub mod facts;
pub mod notice;
pub mod policy;
pub mod query;
pub mod slice;
pub mod sql;
pub mod tables;
pub mod text;
pub mod token;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use atlas_lake::Lake;
use atlas_ontology::{ObjectType, Ontology};

pub use egress::Egress;
pub use error::AccessError;
pub use policy::{LakeDirectory, PolicyConfig, PolicyHandle, read_policy};
pub use tables::{PinnedSet, Tables};
pub use token::PageTokens;

/// Settings of the seam that the server's configuration carries.
#[derive(Debug, Clone)]
pub struct AccessSettings {
    /// Answer one patient's object-set pages from the view's slice index
    /// instead of a query plan.
    pub slice_reads: bool,
}

/// Counters the seam keeps for the server's metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Object-set pages answered from a one-patient slice read.
    pub slice_reads: AtomicU64,
}

/// What every path out of the lake shares. Cheap to clone.
#[derive(Clone)]
pub struct Access {
    pub lake: Lake,
    pub ontology: Arc<Ontology>,
    pub tables: Arc<Tables>,
    /// The policy in force; ask it through [`Access::decide`].
    pub policy: Arc<PolicyHandle>,
    pub page_tokens: Arc<PageTokens>,
    /// De-identifiers for grants whose rule says `deid`.
    pub deid: Arc<deid::Engines>,
    pub settings: AccessSettings,
    pub counters: Arc<Counters>,
}

/// The object type named `name`, or a 404 listing the known ones.
pub fn object_type<'o>(ontology: &'o Ontology, name: &str) -> Result<&'o ObjectType, AccessError> {
    ontology.object_type(name).ok_or_else(|| {
        let known: Vec<&str> = ontology
            .object_types
            .iter()
            .map(|t| t.api_name.as_str())
            .collect();
        AccessError::new(
            http::StatusCode::NOT_FOUND,
            "ObjectTypeNotFound",
            "objectType",
            name,
            format!("no object type '{name}'; known: {}", known.join(", ")),
        )
    })
}
