//! What the receiving side counts during one step of a run, and the figures a step reports.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::payload::Header;

/// Latencies are recorded in nanoseconds, from 1 µs to 10 s, at 3 significant digits.
const LATENCY_MAX_NS: u64 = 10_000_000_000;

/// One receiver's counts for the current step. Packets of another step (late stragglers of
/// the previous one) are not counted.
pub struct Received {
    pub step: u32,
    pub packets: u64,
    pub bytes: u64,
    pub reordered: u64,
    pub duplicates_or_late: u64,
    pub foreign: u64,
    /// Highest sequence number seen, per flow and direction (`flow * 2 + direction`).
    highest: Vec<Option<u64>>,
    pub latency: Histogram<u64>,
}

impl Received {
    pub fn new(flows: usize) -> Received {
        Received {
            step: 0,
            packets: 0,
            bytes: 0,
            reordered: 0,
            duplicates_or_late: 0,
            foreign: 0,
            highest: vec![None; flows * 2],
            latency: latency_histogram(),
        }
    }

    /// Starts counting `step` from zero.
    pub fn reset(&mut self, step: u32) {
        let flows = self.highest.len() / 2;
        *self = Received::new(flows);
        self.step = step;
    }

    /// Counts one arrival of `payload_len` media bytes at `now_ns`.
    pub fn record(&mut self, header: Option<Header>, payload_len: usize, now_ns: u64) {
        let Some(header) = header else {
            self.foreign += 1;
            return;
        };
        if header.step != self.step {
            self.duplicates_or_late += 1;
            return;
        }
        let Some(highest) = self
            .highest
            .get_mut(header.flow as usize * 2 + header.direction as usize)
        else {
            self.foreign += 1;
            return;
        };
        match *highest {
            Some(seen) if header.seq == seen => {
                self.duplicates_or_late += 1;
                return;
            }
            Some(seen) if header.seq < seen => self.reordered += 1,
            _ => *highest = Some(header.seq),
        }
        self.packets += 1;
        self.bytes += payload_len as u64;
        let latency = now_ns
            .saturating_sub(header.sent_ns)
            .clamp(1, LATENCY_MAX_NS);
        let _ = self.latency.record(latency);
    }

    /// Adds another receiver's counts of the same step.
    pub fn merge(&mut self, other: &Received) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.reordered += other.reordered;
        self.duplicates_or_late += other.duplicates_or_late;
        self.foreign += other.foreign;
        let _ = self.latency.add(&other.latency);
    }
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("valid histogram bounds")
}

/// CPU time spent during a step, in seconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CpuTime {
    /// The relay process (user + system, all its threads).
    pub relay_process: f64,
    /// Softirq time on all CPUs (the kernel's packet processing, XDP included; the load
    /// generator's own packets are in it too, alike for every system).
    pub softirq: f64,
    /// The load generator itself (user + system; with the injector, its injecting threads).
    pub generator: f64,
    /// With the injector, everything the system under test spent: the run time of the relay
    /// process's threads and of the edge veths' NAPI threads (where its XDP program runs).
    pub system_cpu: f64,
    /// Busy time of [`crate::isolation::SYSTEM_CPU`] (`/proc/stat`, tick-sampled): a cross-check
    /// of `system_cpu`.
    pub system_cpu_busy: f64,
    /// Busy time of [`crate::isolation::INSTRUMENT_CPU`]: the injectors and counters.
    pub instrument_cpu: f64,
    /// Run time of the relay's own XDP program (`run_time_ns`, with
    /// `kernel.bpf_stats_enabled`), part of `system_cpu`.
    pub relay_program: f64,
}

/// One step of a run: a target rate held for a while.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// Packets per second asked for (both directions together).
    pub target_pps: f64,
    /// Packets per second the generator managed to send.
    pub offered_pps: f64,
    pub delivered_pps: f64,
    /// Media payload delivered, in Gbit/s.
    pub delivered_gbps: f64,
    pub sent: u64,
    pub delivered: u64,
    /// Datagrams the generator could not hand to its own socket (buffer full).
    pub generator_drops: u64,
    /// Packets the instrument itself failed to deliver (its receivers' rings were full):
    /// never the system's loss.
    pub lost_to_instrument: u64,
    /// Packets the edge's receive rings refused (the edge did not keep up): part of `loss`,
    /// shown apart.
    pub refused_by_edge: u64,
    /// Fraction of sent packets the system did not deliver (`lost_to_instrument` left out).
    pub loss: f64,
    pub reordered: u64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub latency_p999_us: f64,
    pub cpu: CpuTime,
    /// (relay process + softirq) CPU time per delivered packet, in microseconds.
    pub cpu_per_packet_us: f64,
    /// The relay process's CPU time alone per delivered packet, in microseconds.
    pub relay_cpu_per_packet_us: f64,
    pub seconds: f64,
}

/// What a step's counters come to.
pub struct StepInput<'a> {
    pub target_pps: f64,
    pub sent: u64,
    pub generator_drops: u64,
    pub seconds: f64,
    pub received: &'a Received,
    pub cpu: CpuTime,
}

impl Step {
    pub fn from_counts(input: StepInput<'_>) -> Step {
        let StepInput {
            target_pps,
            sent,
            generator_drops,
            seconds,
            received,
            cpu,
        } = input;
        let seconds = seconds.max(1e-9);
        let delivered = received.packets.min(sent);
        let per_packet = |cpu_seconds: f64| {
            if delivered == 0 {
                0.0
            } else {
                cpu_seconds * 1e6 / delivered as f64
            }
        };
        let percentile = |q: f64| {
            if received.latency.is_empty() {
                0.0
            } else {
                received.latency.value_at_quantile(q) as f64 / 1000.0
            }
        };
        Step {
            target_pps,
            offered_pps: sent as f64 / seconds,
            delivered_pps: delivered as f64 / seconds,
            delivered_gbps: received.bytes as f64 * 8.0 / seconds / 1e9,
            sent,
            delivered,
            generator_drops,
            lost_to_instrument: 0,
            refused_by_edge: 0,
            loss: if sent == 0 {
                0.0
            } else {
                (sent - delivered) as f64 / sent as f64
            },
            reordered: received.reordered,
            latency_p50_us: percentile(0.5),
            latency_p99_us: percentile(0.99),
            latency_p999_us: percentile(0.999),
            cpu,
            cpu_per_packet_us: per_packet(cpu.relay_process + cpu.softirq),
            relay_cpu_per_packet_us: per_packet(cpu.relay_process),
            seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::Direction;

    fn header(flow: u32, direction: Direction, seq: u64, sent_ns: u64) -> Option<Header> {
        Some(Header {
            step: 1,
            flow,
            direction,
            seq,
            sent_ns,
        })
    }

    #[test]
    fn arrivals_are_counted_per_flow_and_direction() {
        let mut received = Received::new(2);
        received.reset(1);
        received.record(header(0, Direction::ToPeer, 0, 1_000), 160, 11_000);
        received.record(header(0, Direction::ToPeer, 2, 2_000), 160, 22_000);
        // Late: behind the highest seen in its flow and direction.
        received.record(header(0, Direction::ToPeer, 1, 3_000), 160, 33_000);
        // The other direction and flow have their own sequence.
        received.record(header(0, Direction::ToClient, 0, 0), 160, 40_000);
        received.record(header(1, Direction::ToPeer, 0, 0), 160, 50_000);
        // A duplicate, a straggler of another step, an unknown flow, a stranger.
        received.record(header(1, Direction::ToPeer, 0, 0), 160, 50_000);
        received.record(
            Some(Header {
                step: 0,
                ..header(0, Direction::ToPeer, 9, 0).unwrap()
            }),
            160,
            0,
        );
        received.record(header(7, Direction::ToPeer, 0, 0), 160, 0);
        received.record(None, 160, 0);

        assert_eq!(received.packets, 5);
        assert_eq!(received.bytes, 800);
        assert_eq!(received.reordered, 1);
        assert_eq!(received.duplicates_or_late, 2);
        assert_eq!(received.foreign, 2);
        assert_eq!(received.latency.len(), 5);
    }

    #[test]
    fn a_step_reports_rates_loss_latency_and_cpu_per_packet() {
        let mut received = Received::new(1);
        received.reset(1);
        for seq in 0..900u64 {
            // 10 µs for most, 1 ms for the slowest 1%.
            let latency = if seq % 100 == 0 { 1_000_000 } else { 10_000 };
            received.record(header(0, Direction::ToPeer, seq, 0), 100, latency);
        }
        let step = Step::from_counts(StepInput {
            target_pps: 1000.0,
            sent: 1000,
            generator_drops: 0,
            seconds: 1.0,
            received: &received,
            cpu: CpuTime {
                relay_process: 0.009,
                softirq: 0.018,
                generator: 0.5,
                ..CpuTime::default()
            },
        });
        assert_eq!((step.delivered, step.sent), (900, 1000));
        assert!((step.loss - 0.1).abs() < 1e-9);
        assert!((step.delivered_pps - 900.0).abs() < 1e-9);
        assert!((step.delivered_gbps - 900.0 * 100.0 * 8.0 / 1e9).abs() < 1e-12);
        assert!(
            (step.latency_p50_us - 10.0).abs() < 0.1,
            "{}",
            step.latency_p50_us
        );
        assert!(step.latency_p999_us > 900.0, "{}", step.latency_p999_us);
        assert!((step.cpu_per_packet_us - 30.0).abs() < 1e-6);
        assert!((step.relay_cpu_per_packet_us - 10.0).abs() < 1e-6);
    }
}
