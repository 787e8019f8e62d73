//! Progress bars (indicatif) fed by the counters the libraries expose, so the
//! libraries never draw anything themselves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use atlas_lake::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar that polls counters on its own thread until `finish`.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Ticker {
    fn spawn(bar: ProgressBar, mut tick: impl FnMut(&ProgressBar) + Send + 'static) -> Ticker {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                tick(&bar);
                // Woken early by `finish`, so a command never waits out a tick.
                std::thread::park_timeout(Duration::from_millis(100));
            }
            tick(&bar);
            bar.finish_and_clear();
        });
        Ticker {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

fn bar(len: u64, show: bool, template: &str) -> ProgressBar {
    let b = ProgressBar::with_draw_target(
        Some(len),
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(template) {
        b.set_style(style.progress_chars("=> "));
    }
    b
}

pub struct IngestBar;

impl IngestBar {
    /// Bytes read, bytes/s and lines/s of an ingest run.
    pub fn start(p: Arc<Progress>, show: bool) -> Ticker {
        let b = bar(
            0,
            show,
            "{spinner} {msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {prefix} eta {eta}",
        );
        let started = std::time::Instant::now();
        Ticker::spawn(b, move |b| {
            b.set_length(p.total_bytes.load(Ordering::Relaxed));
            b.set_position(p.bytes.load(Ordering::Relaxed));
            let lines = p.lines.load(Ordering::Relaxed);
            let rate = lines as f64 / started.elapsed().as_secs_f64().max(1e-3);
            b.set_prefix(format!("{lines} lines {rate:.0}/s"));
            b.set_message(match p.phase.load(Ordering::Relaxed) {
                0 => "landing",
                1 => "prescanning",
                2 => "ingesting",
                _ => "done",
            });
        })
    }
}

pub struct CountBar;

impl CountBar {
    pub fn start(done: Arc<AtomicU64>, total: u64, unit: &'static str, show: bool) -> Ticker {
        let b = bar(
            total,
            show,
            "{spinner} [{bar:30}] {pos}/{len} {msg} {per_sec} eta {eta}",
        );
        b.set_message(unit);
        Ticker::spawn(b, move |b| b.set_position(done.load(Ordering::Relaxed)))
    }
}

pub struct FlattenBar;

impl FlattenBar {
    /// Input bytes of `atlas views flatten`; a bar without a length (only
    /// the counts move) when `total` is 0, i.e. every input is gzip.
    pub fn start(done: Arc<AtomicU64>, total: u64, show: bool) -> Ticker {
        let b = bar(
            total,
            show,
            "flatten [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta})",
        );
        if total == 0 {
            b.unset_length();
        }
        Ticker::spawn(b, move |b| b.set_position(done.load(Ordering::Relaxed)))
    }
}

/// Takes the lake's writer lease for `command`. When another writer holds
/// it: fails at once naming the holder, or with `wait` waits, showing a
/// spinner line naming the holder (one line per holder when stderr is not
/// a terminal).
pub async fn take_lease(
    lake: &atlas_lake::Lake,
    wait: bool,
    show: bool,
) -> anyhow::Result<atlas_lake::WriterLease> {
    use std::sync::Mutex;
    let command: String = {
        let args: Vec<String> = std::env::args().collect();
        let mut c = args.join(" ");
        if c.len() > 300 {
            let mut end = 300;
            while !c.is_char_boundary(end) {
                end -= 1;
            }
            c.truncate(end);
            c.push('…');
        }
        c
    };
    let spinner = ProgressBar::with_draw_target(
        None,
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed} {msg}") {
        spinner.set_style(style);
    }
    let last_holder = Arc::new(Mutex::new(None::<u64>));
    let waited = Arc::new(AtomicBool::new(false));
    let (s, w, last) = (spinner.clone(), waited.clone(), last_holder.clone());
    let root = lake.root().to_string();
    let opts = atlas_lake::LeaseOptions {
        command,
        wait,
        on_wait: Some(Arc::new(move |h: &atlas_lake::LeaseHolder| {
            w.store(true, Ordering::Relaxed);
            let msg = format!("waiting for the writer lease of {root}, held by {h}");
            s.set_message(msg.clone());
            s.tick();
            if !show
                && let Ok(mut last) = last.lock()
                && *last != Some(h.generation)
            {
                *last = Some(h.generation);
                eprintln!("{msg}");
            }
        })),
        ..atlas_lake::LeaseOptions::default()
    };
    let started = std::time::Instant::now();
    let lease = atlas_lake::WriterLease::acquire(lake, &opts).await;
    spinner.finish_and_clear();
    let lease = lease?;
    if waited.load(Ordering::Relaxed) {
        eprintln!(
            "got the writer lease after waiting {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(lease)
}
