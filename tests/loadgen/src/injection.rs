//! The kernel-speed generator: after the flows are set up through the relay's signalling
//! (as for the socket generator), their media is injected with the [`xdp`](crate::xdp)
//! programs: ChannelData from the client host's veth, plain UDP from the peer host's, each
//! paced by a thread of its own, and counted by the counter on the receiving veths.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use loadgen_common::{FlowStats, InjectFlow, TO_CLIENT, TO_PEER, bucket_floor, per_direction};
use rampart_tests::netns;
use rampart_tests::topology::{
    CLIENT_IF, CLIENT_MAC, EDGE_EXT_MAC, EDGE_INT_MAC, EdgeTopology, PEER_IF, PEER_MAC,
};

use crate::isolation::{self, INSTRUMENT_CPU, Refused};
use crate::stats::{CpuTime, Step};
use crate::xdp::{Counters, Injector};

/// Packets still in flight when a step's sending stops.
const DRAIN: Duration = Duration::from_millis(300);
/// How often a step's end is signalled to an injecting thread until it has stopped (a signal
/// that arrives just before its call begins would be missed).
const STOP_EVERY: Duration = Duration::from_millis(10);

/// The injector for both sending hosts and the counters on both receiving veths.
pub struct Instrument {
    injector: Injector,
    counters: Counters,
    /// The injecting thread runs here (the frames are run as arriving on the client's veth).
    client_ns: String,
    flows: u32,
    payload: usize,
}

/// What one injected step sent and what arrived.
pub struct Injected {
    pub sent: u64,
    pub delivered: u64,
    pub reordered: u64,
    pub duplicates: u64,
    /// Flows whose counts do not add up (more arrived than was sent): should stay 0.
    pub inconsistent: u64,
    /// What the veths refused meanwhile.
    pub refused: Refused,
    /// One-way latency percentiles (p50, p99, p99.9) in µs.
    pub latency_us: [f64; 3],
    pub seconds: f64,
    /// CPU time of the injecting thread.
    pub injector_seconds: f64,
}

impl Instrument {
    /// Replaces the topology's receive programs on the client's and the peer's veths with the
    /// counter, and prepares an injector on each for the media of `payload` bytes of the
    /// flows at `addresses` (each flow's client address and relayed address).
    pub fn attach(
        topology: &mut EdgeTopology,
        addresses: &[(SocketAddr, SocketAddr)],
        server: SocketAddr,
        peer: SocketAddr,
        payload: usize,
    ) -> Result<Instrument> {
        let flows: Vec<[InjectFlow; 2]> = addresses
            .iter()
            .map(|&(client, relayed)| {
                Ok([
                    flow(client, server, mac(CLIENT_MAC), mac(EDGE_EXT_MAC))?,
                    flow(peer, relayed, mac(PEER_MAC), mac(EDGE_INT_MAC))?,
                ])
            })
            .collect::<Result<_>>()?;
        topology.detach_receivers();
        // The same for every system: with or without a relay's XDP program, the edge's veths
        // take the injected frames.
        topology.enable_edge_gro()?;
        let mut counters = Counters::load()?;
        let client_ns = topology.client.name().to_owned();
        let peer_ns = topology.peer.name().to_owned();
        netns::run_in(&client_ns, || counters.attach(CLIENT_IF))?;
        netns::run_in(&peer_ns, || counters.attach(PEER_IF))?;
        let mut injector = Injector::new(&flows, payload)?;
        netns::run_in(&client_ns, || -> Result<()> {
            injector.set_ingress(CLIENT_IF)?;
            injector.set_egress(TO_PEER, CLIENT_IF)
        })?;
        netns::run_in(&peer_ns, || injector.set_egress(TO_CLIENT, PEER_IF))?;
        Ok(Instrument {
            injector,
            counters,
            client_ns,
            flows: addresses.len() as u32,
            payload,
        })
    }

    /// Injects `rate` packets per second (both directions together, alternating) for
    /// `duration`, then waits for what is in flight and counts.
    pub fn step(
        &mut self,
        topology: &EdgeTopology,
        step: u32,
        rate: f64,
        duration: Duration,
    ) -> Result<Injected> {
        self.counters.start_step(step, self.flows)?;
        let refused_before = isolation::refused(topology)?;
        self.injector.start_step(step, Some(rate))?;
        let started = Instant::now();
        let (injector, client_ns) = (&self.injector, &self.client_ns);
        let injector_seconds = netns::run_in(client_ns, || inject_for(injector, duration))?;
        let seconds = started.elapsed().as_secs_f64();
        std::thread::sleep(DRAIN);
        let sent = per_direction(self.injector.stamped()?);
        let refused = isolation::refused(topology)?.since(&refused_before);
        let counted = self.counters.read(self.flows)?;
        let mut injected = Injected {
            sent: sent[0] + sent[1],
            delivered: 0,
            reordered: 0,
            duplicates: 0,
            inconsistent: 0,
            refused,
            latency_us: percentiles(&counted.latency),
            seconds,
            injector_seconds,
        };
        for flow in 0..u64::from(self.flows) {
            for direction in [TO_PEER, TO_CLIENT] {
                let stats: &FlowStats = &counted.flows[(flow * 2 + u64::from(direction)) as usize];
                let total = sent[usize::from(direction)];
                let flows = u64::from(self.flows);
                let flow_sent = total / flows + u64::from(flow < total % flows);
                if stats.lost(flow_sent).is_none() {
                    injected.inconsistent += 1;
                }
                injected.delivered += stats.delivered;
                injected.reordered += stats.reordered;
                injected.duplicates += stats.duplicates;
            }
        }
        Ok(injected)
    }

    pub fn payload(&self) -> usize {
        self.payload
    }
}

impl Injected {
    /// The step as the report shows it; `cpu` was measured around it. The system's CPU is
    /// the busy time of its own CPU.
    pub fn into_step(self, target_pps: f64, payload: usize, cpu: CpuTime) -> Step {
        let seconds = self.seconds.max(1e-9);
        let delivered = self.delivered.min(self.sent);
        let lost_to_instrument = self.refused.by_receivers.min(self.sent - delivered);
        let per_packet = |cpu_seconds: f64| {
            if delivered == 0 {
                0.0
            } else {
                cpu_seconds * 1e6 / delivered as f64
            }
        };
        Step {
            target_pps,
            offered_pps: self.sent as f64 / seconds,
            delivered_pps: delivered as f64 / seconds,
            delivered_gbps: (delivered * payload as u64) as f64 * 8.0 / seconds / 1e9,
            sent: self.sent,
            delivered,
            generator_drops: 0,
            lost_to_instrument,
            refused_by_edge: self.refused.by_edge,
            loss: if self.sent == 0 {
                0.0
            } else {
                (self.sent - delivered - lost_to_instrument) as f64 / self.sent as f64
            },
            reordered: self.reordered,
            latency_p50_us: self.latency_us[0],
            latency_p99_us: self.latency_us[1],
            latency_p999_us: self.latency_us[2],
            cpu: CpuTime {
                generator: self.injector_seconds,
                ..cpu
            },
            cpu_per_packet_us: per_packet(cpu.system_cpu),
            relay_cpu_per_packet_us: per_packet(cpu.relay_process),
            seconds,
        }
    }
}

/// The injecting thread, as the step's controller sees it.
#[derive(Default)]
struct Side {
    /// Its `pthread_t`, once it is about to inject.
    thread: Mutex<Option<nix::libc::pthread_t>>,
    done: AtomicBool,
}

/// Runs `injector` for `duration` (its configured rate) on a thread of its own, pinned to the
/// instrument's CPU, in the calling thread's network namespace; returns that thread's CPU time.
pub fn inject_for(injector: &Injector, duration: Duration) -> Result<f64> {
    let side = Side::default();
    let result = std::thread::scope(|scope| {
        let thread = scope.spawn(|| inject(injector, &side));
        std::thread::sleep(duration);
        stop(&side);
        thread.join()
    });
    match result {
        Ok(seconds) => seconds,
        Err(_) => bail!("the injecting thread panicked"),
    }
}

/// Injects from the calling thread, pinned to the instrument's CPU, until [`stop`]; returns
/// the thread's CPU time.
fn inject(injector: &Injector, side: &Side) -> Result<f64> {
    isolation::pin_self(INSTRUMENT_CPU);
    isolation::yield_to_everything();
    install_stop_handler();
    let cpu_before = thread_cpu_seconds();
    // SAFETY: no preconditions.
    *lock(&side.thread) = Some(unsafe { nix::libc::pthread_self() });
    let result = injector.inject_until_signalled();
    side.done.store(true, Ordering::SeqCst);
    result?;
    Ok(thread_cpu_seconds() - cpu_before)
}

/// Ends the injection: signals the thread until it says it is done.
fn stop(side: &Side) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !side.done.load(Ordering::SeqCst) && Instant::now() < deadline {
        if let Some(thread) = *lock(&side.thread) {
            // SAFETY: the thread is alive until it sets `done`, and SIGUSR1 has a handler.
            unsafe { nix::libc::pthread_kill(thread, nix::libc::SIGUSR1) };
        }
        std::thread::sleep(STOP_EVERY);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A SIGUSR1 handler that does nothing, installed without SA_RESTART: the signal only ends
/// the `BPF_PROG_RUN` call in progress (EINTR).
fn install_stop_handler() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    extern "C" fn ignore(_: nix::libc::c_int) {}
    let action = SigAction::new(
        SigHandler::Handler(ignore),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler is async-signal-safe (it does nothing).
    let _ = unsafe { sigaction(Signal::SIGUSR1, &action) };
}

fn thread_cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(0.0, |usage| {
        let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        seconds(usage.user_time()) + seconds(usage.system_time())
    })
}

/// p50, p99 and p99.9 in µs of a latency histogram (the lower edge of the bucket).
fn percentiles(histogram: &[u64]) -> [f64; 3] {
    let total: u64 = histogram.iter().sum();
    [0.5, 0.99, 0.999].map(|q| {
        if total == 0 {
            return 0.0;
        }
        let rank = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (bucket, &count) in histogram.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return bucket_floor(bucket as u32) as f64 / 1000.0;
            }
        }
        0.0
    })
}

fn flow(
    src: SocketAddr,
    dst: SocketAddr,
    src_mac: Result<[u8; 6]>,
    dst_mac: Result<[u8; 6]>,
) -> Result<InjectFlow> {
    let (IpAddr::V4(src_ip), IpAddr::V4(dst_ip)) = (src.ip(), dst.ip()) else {
        bail!("the injector speaks IPv4 only: {src} -> {dst}");
    };
    Ok(InjectFlow {
        src_mac: src_mac?,
        dst_mac: dst_mac?,
        src_ip: src_ip.octets(),
        dst_ip: dst_ip.octets(),
        src_port: src.port(),
        dst_port: dst.port(),
        channel: crate::traffic::CHANNEL,
        _pad: [0; 2],
    })
}

fn mac(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|part| u8::from_str_radix(part, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC address {text}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC address {text}: not 6 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut histogram = vec![0u64; loadgen_common::LATENCY_BUCKETS as usize];
        histogram[loadgen_common::latency_bucket(10_000) as usize] = 990;
        histogram[loadgen_common::latency_bucket(2_000_000) as usize] = 10;
        let [p50, p99, p999] = percentiles(&histogram);
        assert!((9.0..=10.0).contains(&p50), "{p50}");
        assert!((9.0..=10.0).contains(&p99), "{p99}");
        assert!((1800.0..=2000.0).contains(&p999), "{p999}");
        assert_eq!(percentiles(&[0; 4]), [0.0; 3]);
        assert_eq!(mac("02:00:00:c9:01:02").unwrap(), [2, 0, 0, 0xc9, 1, 2]);
        assert!(mac("02:00").is_err());
    }
}
