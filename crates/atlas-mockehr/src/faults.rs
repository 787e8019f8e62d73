//! The fault timeline: per-endpoint call counters and the faults that fire
//! on each call. Deterministic: which faults fire depends only on how many
//! calls each endpoint has had since the timeline was (re)set.

use std::collections::HashMap;

use crate::config::{Endpoint, Fault, FaultKind};

#[derive(Default)]
pub(crate) struct FaultTimeline {
    faults: Vec<Fault>,
    calls: HashMap<Endpoint, u32>,
}

impl FaultTimeline {
    pub fn new(faults: Vec<Fault>) -> FaultTimeline {
        FaultTimeline {
            faults,
            calls: HashMap::new(),
        }
    }

    /// Counts one call of `endpoint` (and of `Any`) and returns the faults
    /// that fire on it, in timeline order.
    pub fn call(&mut self, endpoint: Option<Endpoint>) -> Vec<FaultKind> {
        let any = self.bump(Endpoint::Any);
        let own = endpoint.map(|e| self.bump(e));
        self.faults
            .iter()
            .filter(|f| {
                let n = if f.at == Endpoint::Any {
                    Some(any)
                } else if Some(f.at) == endpoint {
                    own
                } else {
                    None
                };
                n.is_some_and(|n| fires(f, n))
            })
            .map(|f| f.kind.clone())
            .collect()
    }

    fn bump(&mut self, e: Endpoint) -> u32 {
        let n = self.calls.entry(e).or_insert(0);
        *n += 1;
        *n
    }
}

/// True when `f` fires on call `n` (1-based) of its endpoint.
fn fires(f: &Fault, n: u32) -> bool {
    match f.nth {
        None => true,
        Some(k) => n >= k && n - k < f.times.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nth_and_times() {
        let mut t = FaultTimeline::new(vec![
            Fault {
                at: Endpoint::File,
                nth: Some(2),
                times: 2,
                kind: FaultKind::Truncate { bytes: 3 },
            },
            Fault::every(Endpoint::Token, FaultKind::ExpireToken),
        ]);
        let fired: Vec<usize> = (0..5).map(|_| t.call(Some(Endpoint::File)).len()).collect();
        assert_eq!(fired, vec![0, 1, 1, 0, 0]);
        assert_eq!(t.call(Some(Endpoint::Token)).len(), 1);
        assert_eq!(t.call(None).len(), 0);
    }

    #[test]
    fn toml_syntax() {
        let config = crate::MockConfig::from_toml(
            r#"
            manifest = "stu4"
            [[faults]]
            at = "file"
            nth = 2
            kind = "status"
            code = 503
            retry_after = "soon"
            [[faults]]
            at = "kickoff"
            kind = "tiny_files"
            [[faults]]
            kind = "reset_after"
            bytes = 100
            "#,
        )
        .unwrap();
        assert_eq!(
            config.faults,
            vec![
                Fault {
                    at: Endpoint::File,
                    nth: Some(2),
                    times: 1,
                    kind: FaultKind::Status {
                        code: 503,
                        retry_after: Some("soon".into())
                    },
                },
                Fault::every(Endpoint::Kickoff, FaultKind::TinyFiles),
                Fault::every(Endpoint::Any, FaultKind::ResetAfter { bytes: 100 }),
            ]
        );
        let back = toml::to_string(&config).unwrap();
        assert_eq!(crate::MockConfig::from_toml(&back).unwrap(), config);
    }
}
