//! Integration tests of atlas-events.
