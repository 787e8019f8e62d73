//! Integration tests of atlas-events.
mod fhircast;
mod ledger;
mod subscriptions;
