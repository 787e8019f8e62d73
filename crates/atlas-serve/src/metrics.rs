//! Prometheus metrics, kept in process: requests and latency per route and
//! status, errors by kind. Rendered in the text exposition format at
//! `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::AppState;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// The access seam's counters (slice reads), shared with `Access`.
    pub seam: std::sync::Arc<atlas_access::Counters>,
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    errors: BTreeMap<&'static str, u64>,
    rows: BTreeMap<String, u64>,
    link_queries: u64,
}

impl Metrics {
    /// Records one request.
    pub fn observe(&self, route: &str, status: u16, elapsed: Duration) {
        let Ok(mut m) = self.inner.lock() else {
            return;
        };
        *m.requests.entry((route.to_owned(), status)).or_default() += 1;
        let h = m.latency.entry(route.to_owned()).or_default();
        let secs = elapsed.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Records an error response by its name.
    pub fn error(&self, kind: &'static str) {
        if let Ok(mut m) = self.inner.lock() {
            *m.errors.entry(kind).or_default() += 1;
        }
    }

    /// Records rows (objects) served by a route. (The audit record's
    /// rows are counted by `Egress`, where they leave.)
    pub fn rows(&self, route: &str, n: u64) {
        if let Ok(mut m) = self.inner.lock() {
            *m.rows.entry(route.to_owned()).or_default() += n;
        }
    }

    /// One batched GraphQL link query (however many parents it served).
    pub fn link_query(&self) {
        if let Ok(mut m) = self.inner.lock() {
            m.link_queries += 1;
        }
    }

    /// The text exposition format (version 0.0.4).
    pub fn render_text(&self) -> String {
        use std::fmt::Write;
        let Ok(m) = self.inner.lock() else {
            return String::new();
        };
        let mut out = String::new();
        out.push_str("# HELP atlas_http_requests_total Requests served, by route and status.\n");
        out.push_str("# TYPE atlas_http_requests_total counter\n");
        for ((route, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "atlas_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP atlas_http_request_duration_seconds Request latency, by route.\n");
        out.push_str("# TYPE atlas_http_request_duration_seconds histogram\n");
        for (route, h) in &m.latency {
            let r = escape(route);
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "atlas_http_request_duration_seconds_bucket{{route=\"{r}\",le=\"{b}\"}} {c}"
                );
            }
            let _ = writeln!(
                out,
                "atlas_http_request_duration_seconds_bucket{{route=\"{r}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "atlas_http_request_duration_seconds_sum{{route=\"{r}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "atlas_http_request_duration_seconds_count{{route=\"{r}\"}} {}",
                h.count
            );
        }
        out.push_str("# HELP atlas_http_errors_total Error responses, by error name.\n");
        out.push_str("# TYPE atlas_http_errors_total counter\n");
        for (kind, n) in &m.errors {
            let _ = writeln!(out, "atlas_http_errors_total{{kind=\"{kind}\"}} {n}");
        }
        out.push_str(
            "# HELP atlas_graphql_link_queries_total Batched link queries run for GraphQL link fields.\n",
        );
        out.push_str("# TYPE atlas_graphql_link_queries_total counter\n");
        let _ = writeln!(out, "atlas_graphql_link_queries_total {}", m.link_queries);
        out.push_str(
            "# HELP atlas_slice_reads_total Object-set queries answered from one patient's slice of a view (no query plan).\n",
        );
        out.push_str("# TYPE atlas_slice_reads_total counter\n");
        let _ = writeln!(
            out,
            "atlas_slice_reads_total {}",
            self.seam
                .slice_reads
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        out.push_str("# HELP atlas_rows_served_total Objects or rows returned, by route.\n");
        out.push_str("# TYPE atlas_rows_served_total counter\n");
        for (route, n) in &m.rows {
            let _ = writeln!(
                out,
                "atlas_rows_served_total{{route=\"{}\"}} {n}",
                escape(route)
            );
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub(crate) async fn render(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render_text(),
    )
}
