//! End-to-end tests of the `atlas` binary: the commands a user runs, on
//! generated data always and on the real Synthea data in `../shared` when
//! present (CI always has it; elsewhere the tests say it is missing).

mod changes;
mod concurrent;
mod crash;
mod deid;
mod e2e;
mod fhircast;
mod pull;
mod serve;
mod shared_data;
mod subscription;
mod tidy;
mod views;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn atlas(lake: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_atlas"));
    c.arg("--lake").arg(lake).arg("--quiet");
    c.env_remove("ATLAS_TEST_CRASH");
    c
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("atlas runs");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

pub fn stats_json(lake: &Path) -> serde_json::Value {
    let out = run_ok(atlas(lake).args(["stats", "--json"]));
    serde_json::from_slice(&out.stdout).expect("stats --json is JSON")
}

pub fn synth(dir: &Path, patients: usize, seed: u64) -> PathBuf {
    let out = dir.join(format!("synth-{patients}-{seed}"));
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_atlas"))
            .args([
                "--quiet",
                "synth",
                "--patients",
                &patients.to_string(),
                "--seed",
                &seed.to_string(),
                "--out",
            ])
            .arg(&out),
    );
    out
}

/// `../shared` seen from this crate, if present.
pub fn shared() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    p.is_dir().then(|| p.canonicalize().ok()).flatten()
}

/// Python with duckdb + duckdb-extension-delta, for the independent reader check.
pub fn python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("ATLAS_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    venv.exists().then_some(venv)
}
