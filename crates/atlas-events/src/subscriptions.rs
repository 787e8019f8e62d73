//! FHIR Subscriptions, R4 backport (filled in by issue 21, part 5).
