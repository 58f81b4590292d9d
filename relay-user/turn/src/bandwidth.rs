//! Bandwidth limits: application data (ChannelData and DATA payloads, a peer's UDP payload;
//! not headers) per allocation and direction, with a burst, as a GCRA: one deadline per
//! bucket, the theoretical arrival time of the next byte at the limit's rate. A datagram that
//! would take it further than the burst ahead of now is dropped (and counted), which cuts a
//! flow above the limit to it and lets one under it through whole.

use std::time::{Duration, Instant};

/// A rate in bits per second of application data, with a burst in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BandwidthLimit {
    pub bits_per_second: u64,
    pub burst_bytes: u64,
}

impl BandwidthLimit {
    /// How long `bytes` take at this rate.
    fn time_for(&self, bytes: u64) -> Duration {
        let nanos = u128::from(bytes) * 8 * 1_000_000_000 / u128::from(self.bits_per_second.max(1));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// One direction's bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// When the bytes admitted so far would have all gone out at the limit's rate; None before
    /// the first.
    due: Option<Instant>,
}

impl Bucket {
    /// Whether `bytes` may pass now under `limit`; if so they are charged.
    pub fn admit(&mut self, limit: &BandwidthLimit, bytes: u64, now: Instant) -> bool {
        let start = self.due.map_or(now, |due| due.max(now));
        let due = start + limit.time_for(bytes);
        if due.saturating_duration_since(now) > limit.time_for(limit.burst_bytes) {
            return false;
        }
        self.due = Some(due);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offer `rate_factor` times the limit for `seconds` in datagrams of `size`; the bytes
    /// admitted per second.
    fn admitted_rate(limit: BandwidthLimit, rate_factor: u64, size: u64, seconds: u64) -> f64 {
        let start = crate::test_origin();
        let mut bucket = Bucket::default();
        let offered_bytes_per_second = limit.bits_per_second / 8 * rate_factor;
        let gap = Duration::from_nanos(size * 1_000_000_000 / offered_bytes_per_second);
        let mut now = start;
        let mut admitted = 0;
        while now < start + Duration::from_secs(seconds) {
            if bucket.admit(&limit, size, now) {
                admitted += size;
            }
            now += gap;
        }
        admitted as f64 / seconds as f64
    }

    #[test]
    fn a_flow_ten_times_over_the_limit_is_cut_to_it() {
        // 2 Mbit/s with a 25 kB burst, offered 20 Mbit/s for 5 s (the burst is 1/10 of a
        // second's worth: 5 s is 200 bursts).
        let limit = BandwidthLimit {
            bits_per_second: 2_000_000,
            burst_bytes: 25_000,
        };
        let rate = admitted_rate(limit, 10, 1000, 5);
        let expected = 250_000.0;
        assert!(
            (rate - expected).abs() / expected < 0.10,
            "{rate} bytes/s admitted for a limit of {expected}"
        );
    }

    #[test]
    fn a_flow_under_the_limit_loses_nothing() {
        let limit = BandwidthLimit {
            bits_per_second: 2_000_000,
            burst_bytes: 25_000,
        };
        let start = crate::test_origin();
        let mut bucket = Bucket::default();
        // Half the limit, in 1200-byte datagrams, and a burst of the burst's size at once.
        let mut now = start;
        for _ in 0..20 {
            assert!(bucket.admit(&limit, 1250, now));
        }
        now += Duration::from_millis(100);
        for _ in 0..5000 {
            assert!(bucket.admit(&limit, 1200, now), "dropped under the limit");
            now += Duration::from_micros(9600);
        }
    }
}
