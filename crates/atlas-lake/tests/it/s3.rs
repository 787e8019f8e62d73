//! The same ingest against S3, through a moto server on loopback.
//! Needs `moto_server` (PyPI `moto[server]`) on PATH or in ATLAS_MOTO_SERVER;
//! `.ci/run` installs it. Without it the test says so and fails in CI.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use atlas_lake::Lake;

use crate::{ingest, rows, write};

/// A moto server and a bucket on it, or `None` (said, and failing in CI)
/// when `moto_server` is missing.
fn moto_bucket(bucket: &str) -> Option<(Moto, u16)> {
    let Some((moto, port)) = start_moto() else {
        let msg = "MISSING: moto_server not found (pip install 'moto[server]'); the S3 lake test did not run";
        eprintln!("{msg}");
        assert!(std::env::var("CI").is_err(), "{msg}");
        return None;
    };
    let created = http(
        port,
        &format!("PUT /{bucket} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    )
    .unwrap();
    assert!(created.starts_with("HTTP/1.1 200"), "{created}");
    Some((moto, port))
}

/// Options for the moto server on `port`. Delta commits use S3's
/// conditional put (no unsafe rename), as on AWS.
fn s3_options(port: u16) -> HashMap<String, String> {
    [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ALLOW_HTTP", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The writer lease on S3: `PutMode::Create` is `If-None-Match: *`, which
/// moto 5.2.5 honours (412 on an existing key), as AWS does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writer_at_a_time_on_s3() {
    let Some((_moto, port)) = moto_bucket("leases") else {
        return;
    };
    let lake = Lake::open("s3://leases/atlas", s3_options(port)).unwrap();
    crate::lease::lease_checks(&lake).await;
}

/// Two ingests started together on one S3 lake: never two live rows for a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ingests_on_s3_never_duplicate_keys() {
    let Some((_moto, port)) = moto_bucket("shared") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    crate::lease::concurrent_ingests(dir.path(), move |round| {
        Lake::open(&format!("s3://shared/round-{round}"), s3_options(port)).unwrap()
    })
    .await;
}

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(port: u16, request: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request.as_bytes())?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn start_moto() -> Option<(Moto, u16)> {
    let bin = std::env::var("ATLAS_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
    let port = free_port();
    let child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let moto = Moto(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http(
            port,
            "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .is_ok()
        {
            return Some((moto, port));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_to_s3_through_moto() {
    let Some((_moto, port)) = start_moto() else {
        let msg = "MISSING: moto_server not found (pip install 'moto[server]'); the S3 lake test did not run";
        eprintln!("{msg}");
        assert!(std::env::var("CI").is_err(), "{msg}");
        return;
    };
    let created = http(
        port,
        "PUT /lake HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(created.starts_with("HTTP/1.1 200"), "{created}");
    let opts: HashMap<String, String> = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_S3_ALLOW_UNSAFE_RENAME", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let lake = Lake::open("s3://lake/atlas", opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "p.ndjson",
        "{\"resourceType\":\"Patient\",\"id\":\"s1\",\"extension\":[{\"valueDecimal\":16942.30}]}\n{\"resourceType\":\"Observation\",\"id\":\"s2\",\"subject\":{\"reference\":\"Patient/s1\"}}\nnot json\n",
    );
    let r = ingest(&lake, &[&f]).await;
    assert_eq!((r.outcomes.stored, r.outcomes.quarantined), (2, 1));
    assert!(
        r.raw_path.starts_with("s3://lake/atlas/raw/files/"),
        "{}",
        r.raw_path
    );
    let stored = rows(&lake, "SELECT resource FROM resources WHERE id = 's1'").await;
    assert_eq!(stored, vec!["{\"resourceType\":\"Patient\",\"id\":\"s1\",\"extension\":[{\"valueDecimal\":16942.30}]}".to_owned()]);
    let again = ingest(&lake, &[&f]).await;
    assert!(again.already_ingested);
    let s = atlas_lake::stats(&lake).await.unwrap();
    assert_eq!(s.resources["Patient"].live, 1);
    assert_eq!(s.quarantine["invalid_json"], 1);
}
