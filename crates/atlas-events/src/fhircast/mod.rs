//! FHIRcast STU3 (filled in by issue 21, part 4).
