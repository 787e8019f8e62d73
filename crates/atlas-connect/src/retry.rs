//! When to try again: `Retry-After` (seconds or HTTP-date) clamped to sane
//! bounds, and exponential backoff with full jitter otherwise.
//!
//! A server's `Retry-After` is honoured but never trusted blindly: a huge
//! value would park the pull for days and a negative or garbage one is no
//! instruction at all, so values are clamped to `[min_wait, max_wait]` and
//! unreadable ones fall back to the backoff.

use std::time::{Duration, SystemTime};

use rand::Rng;

/// Retry limits of one kind of request.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all (the first one included).
    pub max_attempts: u32,
    /// First backoff step; doubled per attempt.
    pub base: Duration,
    /// Longest wait between two attempts, whatever the server says.
    pub max_wait: Duration,
    /// Shortest wait a server's `Retry-After` may ask for.
    pub min_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_millis(500),
            max_wait: Duration::from_secs(120),
            min_wait: Duration::from_millis(100),
        }
    }
}

/// Reads a `Retry-After` value: delay-seconds (a non-negative integer) or
/// an HTTP-date (a date in the past means "now"). Negative numbers,
/// fractions and garbage give `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Saturate: "99999999999999999999" is "very long", not an error.
        let secs = v.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs.min(u64::MAX / 2)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

impl RetryPolicy {
    /// The backoff before attempt `attempt + 1` (0-based `attempt` just
    /// failed): uniform in `[0, min(max_wait, base * 2^attempt)]` ("full
    /// jitter"), so many clients do not retry in step.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max_wait);
        let ms = cap.as_millis().max(1) as u64;
        Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
    }

    /// How long to wait after a refusal carrying `retry_after` (the raw
    /// header, if any): the server's value clamped to bounds, or the backoff.
    pub fn wait(&self, retry_after: Option<&str>, attempt: u32) -> Duration {
        match retry_after.and_then(|v| parse_retry_after(v, SystemTime::now())) {
            Some(d) => d.clamp(self.min_wait, self.max_wait),
            None => self.backoff(attempt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in ["-5", "soon", "", "1.5", "12s"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
        assert!(parse_retry_after("99999999999999999999999", now).is_some());
    }

    #[test]
    fn waits_are_clamped() {
        let p = RetryPolicy {
            max_wait: Duration::from_secs(10),
            min_wait: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        assert_eq!(p.wait(Some("999999"), 0), Duration::from_secs(10));
        assert_eq!(p.wait(Some("0"), 0), Duration::from_secs(1));
        let b = p.wait(Some("garbage"), 3);
        assert!(b <= Duration::from_secs(4), "{b:?}");
        assert!(p.backoff(30) <= Duration::from_secs(10));
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            max_wait: Duration::from_secs(60),
            ..RetryPolicy::default()
        };
        for attempt in 0..6 {
            let cap = 100u64 << attempt;
            let waits: Vec<u64> = (0..50)
                .map(|_| p.backoff(attempt).as_millis() as u64)
                .collect();
            assert!(
                waits.iter().all(|&w| w >= cap / 2 && w <= cap),
                "attempt {attempt}: {waits:?}"
            );
            let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
            assert!(distinct.len() > 5, "jittered: {distinct:?}");
        }
    }
}
