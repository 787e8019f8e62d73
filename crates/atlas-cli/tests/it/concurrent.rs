//! Issue 18, part 5: two writers started together on one lake, as real
//! processes, on a local folder and on S3 (moto). A second writer fails at
//! once naming the holder, or with `--wait` waits for it; either way every
//! live key has exactly one row and every batch's counts reconcile.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{run_ok, synth};

fn atlas_at(lake: &str, env: &HashMap<String, String>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_atlas"));
    c.arg("--lake").arg(lake).arg("--quiet");
    c.env_remove("ATLAS_TEST_CRASH");
    c.envs(env);
    c
}

fn spawn(mut c: Command) -> Child {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().expect("atlas starts")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    )
}

/// Every live key once, the patients all there, every batch reconciled.
fn check_lake(lake: &str, env: &HashMap<String, String>, patients: i64) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let l = atlas_lake::Lake::open(lake, env.clone()).unwrap();
    let rows = rt
        .block_on(l.query_text(
            "SELECT resource_type, count(*), count(DISTINCT id) FROM resources WHERE NOT deleted GROUP BY 1",
        ))
        .unwrap();
    assert!(rows.len() > 3, "{rows:?}");
    for r in &rows {
        assert_eq!(r[1], r[2], "two live rows for one key: {r:?}");
        if r[0].as_deref() == Some("Patient") {
            assert_eq!(r[1].as_deref(), Some(patients.to_string().as_str()));
        }
    }
    let stats = rt.block_on(atlas_lake::stats(&l)).unwrap();
    for b in &stats.batches {
        assert_eq!(
            b.lines_read,
            b.stored + b.unchanged + b.older_than_stored + b.quarantined + b.skipped,
            "{b:?}"
        );
    }
}

fn two_writers(lake: &str, env: &HashMap<String, String>, small: &Path, big: &Path) {
    // Without --wait: one of them fails at once, naming the other.
    let ingest = |data: &Path, wait: bool| {
        let mut c = atlas_at(lake, env);
        if wait {
            c.arg("--wait");
        }
        c.args(["ingest", "--chunk-mb", "1"]).arg(data);
        c
    };
    let a = spawn(ingest(small, false));
    let b = spawn(ingest(big, false));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() || b.status.success(),
        "{}\n{}",
        text(&a),
        text(&b)
    );
    for (out, data) in [(&a, small), (&b, big)] {
        if !out.status.success() {
            let t = text(out);
            assert!(
                t.contains("is being written by") && t.contains("atlas") && t.contains("--wait"),
                "{t}"
            );
            run_ok(&mut ingest(data, true));
        }
    }
    check_lake(lake, env, 40);

    // With --wait: both (and a view refresh) run, one after the other.
    let c = spawn(ingest(big, true));
    let d = spawn(ingest(small, true));
    let mut r = atlas_at(lake, env);
    r.args(["--wait", "views", "refresh"]);
    let e = spawn(r);
    for out in [c, d, e].map(|p| p.wait_with_output().unwrap()) {
        assert!(out.status.success(), "{}", text(&out));
    }
    check_lake(lake, env, 40);
    let out = run_ok(atlas_at(lake, env).args(["--wait", "views", "refresh"]));
    assert!(out.status.success());
    let out = run_ok(atlas_at(lake, env).args([
        "sql",
        "--format",
        "csv",
        "SELECT count(*) AS n, count(DISTINCT id) AS d FROM patient",
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "n,d\n40,40");
}

#[test]
fn two_writers_on_a_local_lake() {
    let dir = tempfile::tempdir().unwrap();
    let small = synth(dir.path(), 30, 11);
    let big = synth(dir.path(), 40, 11);
    let lake = dir.path().join("lake");
    two_writers(lake.to_str().unwrap(), &HashMap::new(), &small, &big);
}

/// A writer that sees the lease held waits, and says by whom.
#[test]
fn a_waiting_writer_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 40, 3);
    let lake = dir.path().join("lake");
    let lake = lake.to_str().unwrap();
    let env = HashMap::new();
    // A holder record of another machine that expires in 3 seconds.
    let holder = dir
        .path()
        .join("lake/_locks/writer/00000000000000000001.json");
    std::fs::create_dir_all(holder.parent().unwrap()).unwrap();
    let expires = chrono::Utc::now() + chrono::Duration::seconds(3);
    std::fs::write(
        &holder,
        serde_json::json!({
            "generation": 1, "host": "ingest-node-7", "pid": 31337, "process_space": "x",
            "command": "atlas ingest /mnt/nightly", "started": "2026-12-01T01:00:00Z",
            "expires": expires.to_rfc3339(), "expires_micros": expires.timestamp_micros(),
            "released": false
        })
        .to_string(),
    )
    .unwrap();
    let out = atlas_at(lake, &env)
        .arg("ingest")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("atlas ingest /mnt/nightly") && t.contains("pid 31337 on ingest-node-7"),
        "{t}"
    );
    let started = Instant::now();
    let out = run_ok(atlas_at(lake, &env).args(["--wait", "ingest"]).arg(&data));
    let t = text(&out);
    assert!(
        t.contains("waiting for the writer lease") && t.contains("atlas ingest /mnt/nightly"),
        "{t}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1), "it waited");
    check_lake(lake, &env, 40);
}

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http(port: u16, request: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request.as_bytes())?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn moto_with_bucket(bucket: &str) -> Option<(Moto, u16)> {
    let bin = std::env::var("ATLAS_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let moto = Moto(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = http(
            port,
            &format!(
                "PUT /{bucket} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        ) {
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            return Some((moto, port));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn two_writers_on_an_s3_lake() {
    let Some((_moto, port)) = moto_with_bucket("atlas") else {
        let msg = "MISSING: moto_server not found (pip install 'moto[server]'); the S3 writer test did not run";
        eprintln!("{msg}");
        assert!(std::env::var("CI").is_err(), "{msg}");
        return;
    };
    let env: HashMap<String, String> = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ALLOW_HTTP", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let small = synth(dir.path(), 30, 11);
    let big = synth(dir.path(), 40, 11);
    two_writers("s3://atlas/lake", &env, &small, &big);
}
