//! Opening the lake named by `--lake`, and ending a command that held the
//! lake's writer lease (taken with `progress::take_lease`).

use anyhow::{Context, Result};
use atlas_lake::{Lake, WriterLease};

/// Opens the lake at `location` (a folder or an object-store URL, with
/// credentials from the environment).
pub fn open_lake(location: &str) -> Result<Lake> {
    Lake::open(location, atlas_lake::lake::storage_options_from_env())
        .with_context(|| format!("opening the lake at {location}"))
}

/// Releases `lease` after a command ran under it, whatever its `result`: a
/// failed command must not leave the lease for the next writer to wait out.
/// The command's own error comes first; a failed release is reported only
/// when the command succeeded.
pub async fn release<T>(lease: WriterLease, result: Result<T>) -> Result<T> {
    let released = lease.release().await;
    let value = result?;
    released.context("releasing the lake's writer lease")?;
    Ok(value)
}
