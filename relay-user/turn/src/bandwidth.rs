//! Bandwidth limits: application data (ChannelData and DATA payloads, a peer's UDP payload;
//! not headers) per allocation and direction, with a burst, as a GCRA: one deadline per
//! bucket, the theoretical arrival time of the next byte at the limit's rate. A datagram that
//! would take it further than the burst ahead of now is dropped (and counted), which cuts a
//! flow above the limit to it and lets one under it through whole.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use relay_common::Limit;

/// A rate in bits per second of application data, with a burst in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BandwidthLimit {
    pub bits_per_second: u64,
    pub burst_bytes: u64,
}

impl BandwidthLimit {
    /// The slowest limit taken: 1 kbit/s (slower ones are configuration mistakes, and the
    /// kernel's fixed-point arithmetic stops there).
    pub const MIN_BITS_PER_SECOND: u64 = Limit::MIN_BITS_PER_SECOND;
    /// The smallest burst: one full-size datagram, or no datagram that size ever passes.
    pub const MIN_BURST_BYTES: u64 = 1500;

    /// `bits_per_second` with the default burst: a tenth of a second at the rate, at least
    /// [`BandwidthLimit::MIN_BURST_BYTES`].
    pub fn with_default_burst(bits_per_second: u64) -> Self {
        BandwidthLimit {
            bits_per_second,
            burst_bytes: (bits_per_second / 80).max(Self::MIN_BURST_BYTES),
        }
    }

    /// How long `bytes` take at this rate.
    fn time_for(&self, bytes: u64) -> Duration {
        let nanos = u128::from(bytes) * 8 * 1_000_000_000 / u128::from(self.bits_per_second.max(1));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// Which limit each allocation gets: its user's (the quota key: a static username, the user
/// part of a REST username), else the default. From the configuration, replaced by the
/// control plane's policy when it sets one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BandwidthPolicy {
    pub default: Option<BandwidthLimit>,
    /// None for a user: unlimited, whatever the default.
    pub users: HashMap<String, Option<BandwidthLimit>>,
}

impl BandwidthPolicy {
    pub fn limit_for(&self, user: &str) -> Option<BandwidthLimit> {
        self.users.get(user).copied().unwrap_or(self.default)
    }
}

/// The total limit of the agent, each direction: a GCRA shared by the relay loops, which take
/// its bytes in leases (one compare-and-swap per lease, not per datagram) and spend them
/// locally ([`TotalLease`]). Its rate is the userspace path's share of the total, which the
/// shell sets ([`TotalPool::set_share`]): all of it without the fast path, else what is left
/// of it after the kernel's shares, split by demand.
#[derive(Debug, Default)]
pub struct TotalPool {
    /// The first `now` the pool was given: arrival times count from it.
    epoch: std::sync::OnceLock<Instant>,
    directions: [PoolDirection; 2],
}

#[derive(Debug, Default)]
struct PoolDirection {
    /// The share's [`Limit`], in two words; `ns_per_byte_q16` 0: no limit.
    ns_per_byte_q16: AtomicU64,
    burst_ns: AtomicU64,
    /// The arrival time of [`Limit::admit`], in nanoseconds since the pool's epoch.
    tat_ns: AtomicU64,
    /// Bytes offered since the shell last asked: the userspace path's demand.
    offered: AtomicU64,
}

/// The two directions of relayed data, as the total limits them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    FromClient = 0,
    ToClient = 1,
}

impl TotalPool {
    /// The userspace path's share of the total in `direction` (a [`Limit::NONE`]: none).
    pub fn set_share(&self, direction: Direction, share: Limit) {
        let d = &self.directions[direction as usize];
        d.ns_per_byte_q16
            .store(share.ns_per_byte_q16, Ordering::Relaxed);
        d.burst_ns.store(share.burst_ns, Ordering::Relaxed);
    }

    fn share(&self, direction: Direction) -> Limit {
        let d = &self.directions[direction as usize];
        Limit {
            ns_per_byte_q16: d.ns_per_byte_q16.load(Ordering::Relaxed),
            burst_ns: d.burst_ns.load(Ordering::Relaxed),
        }
    }

    /// Whether the pool limits `direction` now.
    pub fn is_limited(&self, direction: Direction) -> bool {
        self.directions[direction as usize]
            .ns_per_byte_q16
            .load(Ordering::Relaxed)
            != 0
    }

    /// Takes a lease of `bytes` (at most 65535) at `now`, if the share allows; else how long
    /// until it would.
    fn take(&self, direction: Direction, bytes: u64, now: Instant) -> Result<(), Duration> {
        let share = self.share(direction);
        if !share.is_limited() {
            return Ok(());
        }
        let epoch = *self.epoch.get_or_init(|| now);
        let now =
            u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
        let tat = &self.directions[direction as usize].tat_ns;
        let mut current = tat.load(Ordering::Relaxed);
        loop {
            let Some(cost) = share.admit(current, now, bytes) else {
                let ahead = current.max(now) - now + share.cost(bytes);
                return Err(Duration::from_nanos(ahead - share.burst_ns));
            };
            match tat.compare_exchange_weak(
                current,
                current.max(now) + cost,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }

    /// How many bytes a loop leases at once: a millisecond's worth of the share, so that a
    /// loop asks the pool about once a millisecond at most, within one datagram and 64 KiB.
    fn lease_bytes(&self, direction: Direction) -> u64 {
        let ns_per_byte_q16 = self.directions[direction as usize]
            .ns_per_byte_q16
            .load(Ordering::Relaxed)
            .max(1);
        ((1_000_000u64 << 16) / ns_per_byte_q16).clamp(1500, 65535)
    }

    /// The bytes offered in `direction` since the last call: the userspace path's demand.
    pub fn take_offered(&self, direction: Direction) -> u64 {
        self.directions[direction as usize]
            .offered
            .swap(0, Ordering::Relaxed)
    }
}

/// One relay loop's use of the [`TotalPool`]: bytes leased and not yet spent, and bytes
/// offered not yet reported, each direction.
#[derive(Debug, Default)]
pub struct TotalLease {
    allowance: [u64; 2],
    offered: [u64; 2],
    /// After a refused lease, the pool is not asked again before it would grant one (a flood
    /// over the total costs one look at the shared pool per lease, not one per datagram).
    retry_at: [Option<Instant>; 2],
}

impl TotalLease {
    /// Whether `bytes` may pass under the total in `direction` now.
    pub fn admit(
        &mut self,
        pool: &TotalPool,
        direction: Direction,
        bytes: u64,
        now: Instant,
    ) -> bool {
        if !pool.is_limited(direction) {
            return true;
        }
        let d = direction as usize;
        self.offered[d] += bytes;
        if self.allowance[d] >= bytes {
            self.allowance[d] -= bytes;
            return true;
        }
        if self.retry_at[d].is_some_and(|at| now < at) {
            return false;
        }
        pool.directions[d]
            .offered
            .fetch_add(std::mem::take(&mut self.offered[d]), Ordering::Relaxed);
        let lease = (bytes - self.allowance[d])
            .max(pool.lease_bytes(direction))
            .min(65535);
        match pool.take(direction, lease, now) {
            Ok(()) => {
                self.allowance[d] = self.allowance[d] + lease - bytes;
                self.retry_at[d] = None;
                true
            }
            Err(wait) => {
                // At most a fraction of the shell's period: the demand kept here meanwhile is
                // what the next split is made by.
                self.retry_at[d] = Some(now + wait.min(MAX_RETRY_WAIT));
                false
            }
        }
    }
}

/// The longest a loop waits before asking the pool again, and so the longest its demand goes
/// unreported: half the shell's period of splitting the total.
const MAX_RETRY_WAIT: Duration = Duration::from_millis(50);

/// Splits a total rate among participants (the kernel's CPUs and the userspace path) by their
/// recent demand, in the same unit: max-min fair (no one gets more than it asks while another
/// gets less than an even part), and what nobody asks for is spread evenly, so the shares
/// always add up to the total and a participant whose demand grows has a part of it before
/// the next split.
pub fn split_total(total: u64, demands: &[u64]) -> Vec<u64> {
    let mut shares = vec![0u64; demands.len()];
    if demands.is_empty() {
        return shares;
    }
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|&i| demands[i]);
    let mut remaining = total;
    for (k, &i) in order.iter().enumerate() {
        let fair = remaining / (demands.len() - k) as u64;
        shares[i] = demands[i].min(fair);
        remaining -= shares[i];
    }
    let each = remaining / demands.len() as u64;
    for share in &mut shares {
        *share += each;
    }
    shares[0] += remaining - each * demands.len() as u64;
    shares
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
    fn a_total_is_split_by_demand_and_always_handed_out_whole() {
        assert_eq!(split_total(100, &[]), Vec::<u64>::new());
        // Two heavy and one idle: the heavy ones share the total, the idle one keeps a part.
        let shares = split_total(90, &[1000, 1000, 0]);
        assert_eq!(shares, [45, 45, 0]);
        // Demand under the fair part is met, the rest goes to the others, leftovers spread.
        assert_eq!(split_total(100, &[10, 500, 20]), [10, 70, 20]);
        assert_eq!(split_total(100, &[10, 20, 30]), [10 + 14, 20 + 13, 30 + 13]);
        for demands in [[0u64, 0, 0], [5, 0, 900], [7, 7, 7]] {
            assert_eq!(
                split_total(1_000_001, &demands).iter().sum::<u64>(),
                1_000_001
            );
        }
    }

    #[test]
    fn loops_leasing_from_one_pool_are_held_to_its_rate_together() {
        // 2 Mbit/s shared by two loops each offering ten times that for 5 s.
        let start = crate::test_origin();
        let pool = TotalPool::default();
        pool.set_share(Direction::FromClient, Limit::new(2_000_000, 25_000));
        let mut loops = [TotalLease::default(), TotalLease::default()];
        let mut admitted = 0u64;
        let mut now = start;
        while now < start + Duration::from_secs(5) {
            for lease in &mut loops {
                if lease.admit(&pool, Direction::FromClient, 1000, now) {
                    admitted += 1000;
                }
            }
            now += Duration::from_micros(400);
        }
        let expected = 250_000 * 5 + 25_000;
        assert!(
            admitted.abs_diff(expected) * 100 < expected * 2,
            "{admitted} admitted, {expected} expected"
        );
        assert!(pool.take_offered(Direction::FromClient) > 15 * expected);
        // The other direction has no limit.
        assert!(loops[0].admit(&pool, Direction::ToClient, 1000, now));
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
