//! Integration tests of atlas-events.
mod fhircast;
mod subscriptions;
