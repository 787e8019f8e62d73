//! Reading FHIR inputs into classified events; no storage.
//!
//! Owns: input discovery (files, folders, `.tar.gz`, stdin), line splitting
//! with limits, gzip and archive faults, Bundle unpacking with reference
//! rewriting, and the quarantine classifier that gives every line exactly one
//! outcome: a resource, a deletion, a rejection with a reason, or a skip.
//!
//! May call: `atlas-fhir`. Never the lake: what happens to events is the
//! caller's business, which keeps this crate fast to build and to test.

pub mod bundle;
pub mod classify;
pub mod input;
pub mod lines;
pub mod reader;

pub use bundle::{IdentifierIndex, is_conditional_reference};
pub use classify::{
    ClassifyOptions, DeleteTarget, Deletion, Event, Origin, ParsedResource, Reason, Rejection,
};
pub use input::{Input, InputError, InputKind, InputSet, collect_inputs, hash_file, hash_inputs};
pub use reader::{Block, ReadOptions, prescan_identifiers, read_events};
