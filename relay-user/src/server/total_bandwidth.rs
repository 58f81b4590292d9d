//! The agent's total bandwidth limit (`[limits] bandwidth_total`), split among the paths that
//! carry data: each CPU the XDP program runs on polices a share of its own (a per-CPU value,
//! no shared counter at millions of packets per second), and the userspace relay loops lease
//! from one pool holding the rest. Every tenth of a second the shares are split again by what
//! each was offered in the last one (`rampart_turn::bandwidth::split_total`), so the total is
//! whole wherever the traffic is; a shift of traffic between CPUs is followed within one
//! period.

use std::sync::Arc;
use std::time::Duration;

use rampart_turn::SharedState;
use rampart_turn::bandwidth::{BandwidthLimit, Direction, split_total};
use rampart_xdp::{Limit, TotalDirection};
use tracing::info;

use super::{Shared, lock};

/// How often the shares are split again.
const PERIOD: Duration = Duration::from_millis(100);

/// Keeps the total's shares in line with the traffic for as long as the agent runs.
pub(super) async fn share(shared: Arc<Shared>, relay: Arc<SharedState>, total: BandwidthLimit) {
    let pool = relay.total_bandwidth();
    let whole = Limit::new(total.bits_per_second, total.burst_bytes);
    if lock(&shared.fast_path).is_none() {
        info!(
            ?total,
            "total bandwidth limit: all of it to the userspace relay"
        );
        for direction in [Direction::FromClient, Direction::ToClient] {
            pool.set_share(direction, whole);
        }
        return;
    }
    info!(
        ?total,
        period = ?PERIOD,
        "total bandwidth limit: split between the kernel's CPUs and the userspace relay by demand"
    );
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tick.tick().await;
        for (direction, kernel_direction) in [
            (Direction::FromClient, TotalDirection::ToPeer),
            (Direction::ToClient, TotalDirection::ToClient),
        ] {
            let mut guard = lock(&shared.fast_path);
            let Some(fast_path) = guard.as_mut() else {
                return;
            };
            // Bytes per period in bits per second: the unit of the total.
            let per_second = |bytes: u64| bytes * 8 * 1000 / PERIOD.as_millis() as u64;
            let mut demands: Vec<u64> = fast_path
                .total_demand(kernel_direction)
                .into_iter()
                .map(per_second)
                .collect();
            demands.push(per_second(pool.take_offered(direction)));
            let limits: Vec<Limit> = split_total(total.bits_per_second, &demands)
                .into_iter()
                .map(|bits_per_second| share_of(total, bits_per_second))
                .collect();
            let (userspace, kernel) = limits.split_last().expect("the userspace share");
            fast_path.set_total_shares(kernel_direction, kernel);
            pool.set_share(direction, *userspace);
        }
    }
}

/// `bits_per_second` of `total`, with the same part of its burst, but at least one full
/// datagram's (or a small share would never pass one, nor lease anything).
fn share_of(total: BandwidthLimit, bits_per_second: u64) -> Limit {
    let burst = u128::from(total.burst_bytes) * u128::from(bits_per_second)
        / u128::from(total.bits_per_second.max(1));
    let burst = u64::try_from(burst)
        .unwrap_or(u64::MAX)
        .max(BandwidthLimit::MIN_BURST_BYTES);
    Limit::new(bits_per_second, burst)
}
