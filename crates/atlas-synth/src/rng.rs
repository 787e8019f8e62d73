//! Per-entity random streams.
//!
//! Every patient, organization and practitioner gets its own ChaCha8 stream
//! keyed by `(seed, domain, index)`, so what is generated for entity `i` never
//! depends on how work is split across threads. Only exact IEEE operations
//! (+, −, ×, ÷) are used on floats — no `ln`/`exp`/`cos` from the platform's
//! libm — so the output is also the same on every platform.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Stream domains: one per kind of entity.
pub(crate) const DOMAIN_PATIENT: u64 = 1;
pub(crate) const DOMAIN_ORGANIZATION: u64 = 2;
pub(crate) const DOMAIN_PRACTITIONER: u64 = 3;

pub(crate) struct Stream(ChaCha8Rng);

impl Stream {
    /// The stream of entity `index` of `domain` under `seed`.
    pub(crate) fn new(seed: u64, domain: u64, index: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&domain.to_le_bytes());
        key[16..24].copy_from_slice(&index.to_le_bytes());
        key[24..].copy_from_slice(b"atlassyn");
        Stream(ChaCha8Rng::from_seed(key))
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        self.0.r#gen::<f64>()
    }

    /// Uniform in `[lo, hi)`.
    pub(crate) fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform integer in `[lo, hi)`; `lo` when the range is empty.
    pub(crate) fn int(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            lo
        } else {
            self.0.gen_range(lo..hi)
        }
    }

    /// Uniform index into a collection of `len` items (`len > 0`).
    pub(crate) fn index(&mut self, len: usize) -> usize {
        // u64 rather than usize so 32- and 64-bit targets draw the same numbers.
        self.0.gen_range(0..len.max(1) as u64) as usize
    }

    /// A uniformly chosen element (of a non-empty slice).
    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.index(items.len())]
    }

    /// An approximately normal draw (Irwin–Hall sum of four uniforms,
    /// so the tails are bounded at ±3.46 sd).
    pub(crate) fn normal(&mut self, mean: f64, sd: f64) -> f64 {
        let sum: f64 = (0..4).map(|_| self.unit()).sum();
        mean + sd * (sum - 2.0) * 1.732_050_807_568_877_2
    }

    /// A random (version 4) UUID, lower-case hex.
    pub(crate) fn uuid(&mut self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut v = self.0.r#gen::<u128>();
        v = (v & !(0xf << 76)) | (0x4 << 76);
        v = (v & !(0x3 << 62)) | (0x2 << 62);
        let mut out = String::with_capacity(36);
        for i in 0..32 {
            if matches!(i, 8 | 12 | 16 | 20) {
                out.push('-');
            }
            out.push(char::from(HEX[((v >> (124 - 4 * i)) & 0xf) as usize]));
        }
        out
    }

    /// `n` random decimal digits.
    pub(crate) fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'0' + self.0.gen_range(0..10u8)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_independent_and_repeatable() {
        let a = Stream::new(7, DOMAIN_PATIENT, 3).uuid();
        assert_eq!(a, Stream::new(7, DOMAIN_PATIENT, 3).uuid());
        assert_ne!(a, Stream::new(7, DOMAIN_PATIENT, 4).uuid());
        assert_ne!(a, Stream::new(8, DOMAIN_PATIENT, 3).uuid());
        assert_ne!(a, Stream::new(7, DOMAIN_PRACTITIONER, 3).uuid());
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(atlas_fhir::is_valid_id(&a));
    }

    #[test]
    fn normal_is_centred() {
        let mut s = Stream::new(1, 1, 1);
        let n = 20_000;
        let mean: f64 = (0..n).map(|_| s.normal(10.0, 2.0)).sum::<f64>() / f64::from(n);
        assert!((mean - 10.0).abs() < 0.1, "{mean}");
    }
}
