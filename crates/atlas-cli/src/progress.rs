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
