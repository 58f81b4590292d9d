//! Per-source token buckets for unauthenticated requests: a flood of Binding requests or
//! auth challenges from one address must not turn the relay into an amplifier or eat its CPU.
//! The SIP edge keys the same buckets by source address and by partner domain.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Instant;

/// Sources tracked at once; beyond it new sources are refused until idle ones are swept, so
/// a spoofed-source flood cannot grow memory without bound.
const MAX_TRACKED_SOURCES: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct SourceRateLimiter<K = IpAddr> {
    limit: RateLimit,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq> SourceRateLimiter<K> {
    pub fn new(limit: RateLimit) -> Self {
        SourceRateLimiter {
            limit,
            buckets: HashMap::new(),
        }
    }

    /// Take one token for `source`; false when it has none left.
    pub fn allow(&mut self, source: K, now: Instant) -> bool {
        if !self.buckets.contains_key(&source) && self.buckets.len() >= MAX_TRACKED_SOURCES {
            self.sweep(now);
            if self.buckets.len() >= MAX_TRACKED_SOURCES {
                return false;
            }
        }
        let limit = self.limit;
        let bucket = self.buckets.entry(source).or_insert(Bucket {
            tokens: limit.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(limit.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forget sources whose bucket has refilled: they are indistinguishable from new ones.
    pub fn sweep(&mut self, now: Instant) {
        let limit = self.limit;
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens + elapsed * limit.per_second < limit.burst
        });
    }

    pub fn tracked_sources(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_at_the_configured_rate() {
        let t0 = Instant::now();
        let mut rl = SourceRateLimiter::<IpAddr>::new(RateLimit {
            per_second: 10.0,
            burst: 5.0,
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!((0..8).filter(|_| rl.allow(a, t0)).count(), 5);
        assert!(rl.allow(b, t0), "another source has its own bucket");
        assert!(!rl.allow(a, t0 + Duration::from_millis(50)));
        assert!(rl.allow(a, t0 + Duration::from_millis(160)));
        rl.sweep(t0 + Duration::from_secs(10));
        assert_eq!(rl.tracked_sources(), 0);
    }
}
