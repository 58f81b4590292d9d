//! The side-by-side run: the same workload against each system, each in a fresh copy of the
//! XDP tests' namespace topology, stepping the rate up to each one's saturation point, then
//! allocation churn and memory per allocation.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rampart_tests::topology::{EdgeTopology, PEER4, SenderChecksums};

use crate::cpu::{self, ProgramStats, Snapshot};
use crate::injection::Instrument;
use crate::isolation;
use crate::report::{Ceiling, LOSS_THRESHOLD, Limit, Report, SystemResult, UnderReports};
use crate::signalling::{self, Held};
use crate::stats::{Step, StepInput};
use crate::systems::{Running, System};
use crate::traffic::{self, Clock, Flows, Receivers, Target, Workload};

/// The peer side's socket.
const PEER_PORT: u16 = 40_000;
/// Packets still in flight when a step's sending stops.
const DRAIN: Duration = Duration::from_millis(300);

/// Where the media comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Generator {
    /// Injected in the kernel (`BPF_PROG_RUN` live frames) and counted there: millions of
    /// packets per second from one core ([`crate::injection`]).
    Injector,
    /// Sent and received on sockets, a system call per packet ([`crate::traffic`]).
    Sockets,
}

impl Generator {
    pub fn parse(name: &str) -> Option<Generator> {
        match name {
            "injector" => Some(Generator::Injector),
            "sockets" => Some(Generator::Sockets),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Generator::Injector => "injector",
            Generator::Sockets => "sockets",
        }
    }
}

/// How big and how long a run is.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: &'static str,
    pub generator: Generator,
    pub flows: usize,
    pub workload: Workload,
    /// Target rates (packets per second, both directions together), ascending.
    pub rates: Vec<f64>,
    pub step: Duration,
    pub churn_workers: usize,
    pub churn: Duration,
    /// Allocation counts at which the relay's memory is read.
    pub memory: Vec<usize>,
    pub memory_workers: usize,
}

impl Profile {
    /// `tiny` (CI: proves it works end to end), `quick` (under 5 minutes), `full`.
    pub fn named(name: &str) -> Option<Profile> {
        let audio = Workload {
            size: 160,
            burst: 1,
        };
        Some(match name {
            "tiny" => Profile {
                name: "tiny",
                generator: Generator::Injector,
                flows: 4,
                workload: audio,
                rates: vec![200.0, 400.0],
                step: Duration::from_secs(1),
                churn_workers: 2,
                churn: Duration::from_secs(1),
                memory: vec![100],
                memory_workers: 4,
            },
            "quick" => Profile {
                name: "quick",
                generator: Generator::Injector,
                flows: 200,
                workload: audio,
                // Doubling: bisection finds the saturation point between two of them.
                rates: vec![
                    10e3, 20e3, 40e3, 80e3, 160e3, 320e3, 640e3, 1280e3, 2560e3, 5120e3,
                ],
                step: Duration::from_secs(2),
                churn_workers: 8,
                churn: Duration::from_secs(3),
                memory: vec![2_000, 10_000],
                memory_workers: 8,
            },
            "full" => Profile {
                name: "full",
                generator: Generator::Injector,
                flows: 1000,
                workload: audio,
                rates: vec![
                    10e3, 20e3, 40e3, 80e3, 160e3, 320e3, 640e3, 1280e3, 2560e3, 5120e3, 10240e3,
                ],
                step: Duration::from_secs(5),
                churn_workers: 16,
                churn: Duration::from_secs(10),
                memory: vec![10_000, 50_000],
                memory_workers: 16,
            },
            _ => return None,
        })
    }
}

/// Runs `profile` against each of `systems` and reports. Needs root (namespaces, XDP).
pub fn run(profile: &Profile, systems: &[System]) -> Result<Report> {
    raise_fd_limit();
    let started = Instant::now();
    // The relay's XDP program's own run time, beside the CPU it ran on.
    let _program_stats = ProgramStats::enable();
    let instrument = match profile.generator {
        Generator::Injector => {
            eprintln!("loadtest: ==> the instrument's ceiling (reflector on the edge)");
            let (steps, ceiling_pps, limited_by) =
                instrument_ceiling(profile).context("measuring the instrument's ceiling")?;
            Some(Ceiling {
                ceiling_pps,
                is_lower_bound: limited_by != Limit::SystemLoss,
                limited_by,
                burst: crate::xdp::BATCH,
                steps,
            })
        }
        Generator::Sockets => None,
    };
    let mut results = Vec::new();
    for &system in systems {
        eprintln!("loadtest: ==> {}", system.name());
        let result = run_system(profile, system)
            .with_context(|| format!("load test of {}", system.name()))?;
        results.push(result);
    }
    Ok(Report::new(
        profile.generator,
        instrument,
        profile.name,
        profile.flows,
        profile.workload.size,
        profile.workload.burst,
        results,
        started.elapsed().as_secs_f64(),
    ))
}

fn run_system(profile: &Profile, system: System) -> Result<SystemResult> {
    // Complete checksums, as in frames from a wire: the client and the peer stand for hosts
    // across a network (a frame with a checksum left for offload goes to userspace, where
    // the kernel completes it; see SenderChecksums).
    let Some(mut topology) = EdgeTopology::create("loadtest", SenderChecksums::Complete)? else {
        bail!("the load test builds network namespaces and needs root");
    };
    // Tens of thousands of client sockets on one address.
    topology
        .client
        .sysctl("net.ipv4.ip_local_port_range=1024 65535")?;
    let mut running = Running::start(system, &topology)?;
    let target = Target {
        server: running.server,
        secret: running.secret.clone(),
        client_ip: topology.client_ip(false),
        client_netns: Some(topology.client.name().to_owned()),
        peer: SocketAddr::new(IpAddr::V4(PEER4), PEER_PORT),
        peer_netns: Some(topology.peer.name().to_owned()),
    };
    // The flows' sockets stay open until the end: a later client on one of their ports would
    // meet their allocation (437).
    let mut flows = Flows::set_up(&target, profile.flows)
        .map_err(|e| e.context(format!("relay log:\n{}", tail(&running.log()))))?;
    let checksum_errors_before = isolation::edge_udp_checksum_errors(&topology)?;
    let (steps, limited_by) = match profile.generator {
        Generator::Sockets => rate_steps(profile, system, &flows, &running),
        Generator::Injector => injected_steps(profile, system, &mut topology, &mut flows, &running),
    }
    .map_err(|e| e.context(format!("relay log:\n{}", tail(&running.log()))))?;
    let edge_udp_checksum_errors =
        isolation::edge_udp_checksum_errors(&topology)? - checksum_errors_before;
    if edge_udp_checksum_errors > 0 {
        bail!(
            "the edge dropped {edge_udp_checksum_errors} datagrams for a bad UDP checksum: the \
             generator's checksums are wrong, which would favour the XDP path (it does not \
             verify them)"
        );
    }
    let (saturation_pps, saturation_is_lower_bound) = saturation(&steps);

    let churn = signalling::churn(&target, profile.churn_workers, profile.churn)?;
    eprintln!(
        "loadtest: {}: {:.0} allocations created and deleted per second ({} failed{})",
        system.name(),
        churn.cycles_per_second,
        churn.failures,
        first(&churn.first_failure)
    );

    let before = (cpu::resident_bytes(running.pid)?, cpu::slab_bytes()?);
    let mut held = Held::new();
    let mut memory = Vec::new();
    for &wanted in &profile.memory {
        // One descriptor per held allocation here (and one in the relay): the machine's
        // RLIMIT_NOFILE bounds how many can be measured.
        let count = wanted.min(descriptor_budget(profile.flows));
        if count < wanted {
            eprintln!(
                "loadtest: {}: {wanted} allocations asked for, {count} measured: this machine \
                 allows {} open files per process",
                system.name(),
                open_files_limit()
            );
        }
        held.grow_to(&target, count, profile.memory_workers)?;
        let measured = held.measure(running.pid, before, count)?;
        eprintln!(
            "loadtest: {}: {} allocations held: {:.0} bytes each ({} failed{})",
            system.name(),
            measured.allocations,
            measured.bytes_per_allocation,
            measured.failures,
            first(&measured.first_failure)
        );
        memory.push(measured);
    }
    // With the allocations still held: does the control link's reporting disturb relaying?
    let under_reports = match (system, profile.generator) {
        (System::RampartUserspace, Generator::Injector) => Some(
            latency_under_reports(profile, &mut topology, &mut flows, &mut running, held.len())
                .map_err(|e| e.context(format!("relay log:\n{}", tail(&running.log()))))?,
        ),
        _ => None,
    };
    drop(held);
    drop(flows);
    Ok(SystemResult {
        under_reports,
        system,
        steps,
        saturation_pps,
        saturation_is_lower_bound,
        limited_by,
        edge_udp_checksum_errors,
        churn: Some(churn),
        memory,
    })
}

/// The fixed rate of the latency-under-reports measurement: below every relay's saturation
/// in the quick and full profiles, the common rate of their tables.
const UNDER_REPORTS_RATE: f64 = 20_000.0;
/// Reports every second (the default is 10 s): the worst case.
const UNDER_REPORTS_INTERVAL: u64 = 1;
/// Step ids of that measurement, clear of the stepping's.
const UNDER_REPORTS_STEPS: u32 = 1_000_000;

/// p99 latency at [`UNDER_REPORTS_RATE`] with `held` allocations held: twice with the control
/// link down (no reports), then once with the control service up and the agent reporting
/// every second (each report lists up to 5000 allocations and sums every loop's counters).
fn latency_under_reports(
    profile: &Profile,
    topology: &mut EdgeTopology,
    flows: &mut Flows,
    running: &mut Running,
    held: usize,
) -> Result<UnderReports> {
    flows.refresh()?;
    let pid = running.pid;
    let (mut instrument, system_cpu) = instrument_on(profile, topology, flows, running)?;
    let mut p99 = |id: u32| -> Result<f64> {
        let step = injected_step(
            &mut instrument,
            topology,
            (Some(pid), &system_cpu),
            profile,
            UNDER_REPORTS_STEPS + id,
            UNDER_REPORTS_RATE,
        )?;
        Ok(step.latency_p99_us)
    };
    let without = [p99(0)?, p99(1)?];
    running.start_control(topology, UNDER_REPORTS_INTERVAL)?;
    // The link has reported a few times before the step starts.
    std::thread::sleep(Duration::from_secs(3 * UNDER_REPORTS_INTERVAL));
    let with = p99(2)?;
    drop(system_cpu);
    isolation::unpin_process(pid)?;
    let result = UnderReports {
        rate_pps: UNDER_REPORTS_RATE,
        allocations_held: held,
        report_interval_s: UNDER_REPORTS_INTERVAL,
        p99_without_reports_us: without,
        p99_with_reports_us: with,
    };
    eprintln!(
        "loadtest: {}: p99 at {:.0} pps with {held} allocations held: {:.0} and {:.0} µs \
         without reports, {:.0} µs reporting every {} s",
        running.system.name(),
        UNDER_REPORTS_RATE,
        without[0],
        without[1],
        with,
        UNDER_REPORTS_INTERVAL
    );
    Ok(result)
}

/// How close bisection brings the saturation point: the last clean and the first lossy rate
/// within 5% of each other.
const BISECT_WITHIN: f64 = 1.05;
/// At most this many bisection probes (each lossy one is run twice).
const MAX_PROBES: usize = 8;

/// Steps the rate up the profile's ladder until the system's loss passes the threshold twice
/// or the instrument runs out, then bisects between the last clean and the first lossy rate
/// ([`next_probe`]); `measure(step id, rate)` runs one step. Returns the steps and what ended
/// them.
fn step_up(
    profile: &Profile,
    system: &str,
    mut measure: impl FnMut(u32, f64) -> Result<Step>,
) -> Result<(Vec<Step>, Limit)> {
    let mut steps = Vec::new();
    // Every run gets an id of its own (the stamps carry it), the warm-up's too, so that a
    // straggler of one run is never counted in the next.
    let mut runs = 0u32;
    let mut run = |steps: &mut Vec<Step>, rate: f64| -> Result<Verdict> {
        runs += 1;
        let step = measure(runs, rate)?;
        eprintln!(
            "loadtest: {system}: {:>8.0} pps asked, {:>8.0} offered, {:>8.0} delivered, loss \
             {:.3}% (+{} refused by the edge's rings, {} lost to the instrument), p50/p99 \
             {:.0}/{:.0} µs, CPU {:.2} µs/pkt (relay process {:.2}), generator CPU {:.2} s",
            rate,
            step.offered_pps,
            step.delivered_pps,
            step.loss * 100.0,
            step.refused_by_edge,
            step.lost_to_instrument,
            step.latency_p50_us,
            step.latency_p99_us,
            step.cpu_per_packet_us,
            step.relay_cpu_per_packet_us,
            step.cpu.generator,
        );
        let verdict = Verdict::of(&step, rate);
        steps.push(step);
        Ok(verdict)
    };
    // Warm-up at the lowest rate, not recorded: the first step after set-up carries its
    // transients (caches, the relay's own start-up work).
    if let Some(&lowest) = profile.rates.first() {
        run(&mut Vec::new(), lowest)?;
    }
    // Loss is not monotonic on these machines: a lossy step counts once repeated.
    let mut confirmed = |steps: &mut Vec<Step>, rate: f64| -> Result<Verdict> {
        match run(steps, rate)? {
            Verdict::Lossy => run(steps, rate),
            verdict => Ok(verdict),
        }
    };
    let mut limit = Limit::RateLadder;
    let mut lossy = 0;
    let (mut low, mut high) = (None::<f64>, None::<f64>);
    for &rate in &profile.rates {
        match confirmed(&mut steps, rate)? {
            Verdict::Clean => low = Some(rate),
            Verdict::Lossy => {
                high.get_or_insert(rate);
                lossy += 1;
                if lossy == 2 {
                    break;
                }
            }
            Verdict::Ran(out) => {
                eprintln!("loadtest: {system}: {}: stopping here", out.describe());
                limit = out;
                break;
            }
        }
    }
    // Bisect between the highest clean rate and the lowest lossy one above it.
    let high = high.filter(|h| low.is_some_and(|l| *h > l));
    if let (Some(mut low), Some(mut high)) = (low, high) {
        limit = Limit::SystemLoss;
        for _ in 0..MAX_PROBES {
            let Some(rate) = next_probe(low, high) else {
                break;
            };
            match confirmed(&mut steps, rate)? {
                Verdict::Clean => low = rate,
                Verdict::Lossy => high = rate,
                Verdict::Ran(_) => break,
            }
        }
    } else if lossy > 0 && limit == Limit::RateLadder {
        limit = Limit::SystemLoss;
    }
    Ok((steps, limit))
}

/// A step's outcome for the stepping.
enum Verdict {
    Clean,
    Lossy,
    /// The instrument ran out before the system did.
    Ran(Limit),
}

impl Verdict {
    fn of(step: &Step, rate: f64) -> Verdict {
        let sent = step.sent.max(1) as f64;
        if step.lost_to_instrument as f64 / sent >= LOSS_THRESHOLD {
            Verdict::Ran(Limit::InstrumentReceivers)
        } else if step.offered_pps < 0.9 * rate {
            if step.loss < LOSS_THRESHOLD {
                Verdict::Ran(Limit::GeneratorRate)
            } else {
                Verdict::Lossy
            }
        } else if step.loss < LOSS_THRESHOLD {
            Verdict::Clean
        } else {
            Verdict::Lossy
        }
    }
}

/// The next rate to try between the highest clean rate `low` and the lowest lossy one
/// `high`, or None once they are within [`BISECT_WITHIN`].
fn next_probe(low: f64, high: f64) -> Option<f64> {
    (high > low * BISECT_WITHIN).then(|| (low + high) / 2.0)
}

/// The saturation point: the highest rate offered with the system's loss under the
/// threshold, below the lowest rate that was lossy twice (a lucky clean run above a confirmed
/// lossy rate does not count); and whether it is only a lower bound (no step above it was
/// lost by the system).
fn saturation(steps: &[Step]) -> (Option<f64>, bool) {
    let lossy = |s: &&Step| s.loss >= LOSS_THRESHOLD;
    let confirmed_lossy = steps
        .iter()
        .filter(lossy)
        .filter(|s| {
            steps
                .iter()
                .filter(lossy)
                .filter(|o| o.target_pps == s.target_pps)
                .count()
                >= 2
        })
        .map(|s| s.target_pps)
        .min_by(f64::total_cmp);
    let best = steps
        .iter()
        .filter(|s| s.loss < LOSS_THRESHOLD && s.delivered > 0)
        .filter(|s| confirmed_lossy.is_none_or(|limit| s.target_pps < limit))
        .max_by(|a, b| a.offered_pps.total_cmp(&b.offered_pps));
    let Some(best) = best else {
        return (None, false);
    };
    let lost_above = steps
        .iter()
        .any(|s| s.loss >= LOSS_THRESHOLD && s.target_pps > best.target_pps);
    (Some(best.offered_pps), !lost_above)
}

/// [`step_up`] with the socket generator.
fn rate_steps(
    profile: &Profile,
    system: System,
    flows: &Flows,
    running: &Running,
) -> Result<(Vec<Step>, Limit)> {
    flows.tune_for_media();
    let clock = Clock::start();
    let receivers = Receivers::start(flows, clock)?;
    step_up(profile, system.name(), |step_id, rate| {
        receivers.reset(step_id);
        let before = Snapshot::take(running.pid)?;
        let sent = traffic::send(flows, profile.workload, rate, profile.step, step_id, clock)?;
        std::thread::sleep(DRAIN);
        let cpu = Snapshot::take(running.pid)?.since(&before);
        let received = receivers.total();
        Ok(Step::from_counts(StepInput {
            target_pps: rate,
            sent: sent.sent,
            generator_drops: sent.generator_drops,
            seconds: sent.seconds,
            received: &received,
            cpu,
        }))
    })
}

/// Permissions last 300 s (RFC 8656 §9): the flows' are refreshed at least this often.
const REFRESH_EVERY: Duration = Duration::from_secs(120);

/// [`step_up`] with the kernel-speed generator: the instrument on the client's and the
/// peer's veths, the CPUs split between it and the system.
fn injected_steps(
    profile: &Profile,
    system: System,
    topology: &mut EdgeTopology,
    flows: &mut Flows,
    running: &Running,
) -> Result<(Vec<Step>, Limit)> {
    let (mut instrument, system_cpu) = instrument_on(profile, topology, flows, running)?;
    let mut refreshed = Instant::now();
    let result = step_up(profile, system.name(), |step_id, rate| {
        if refreshed.elapsed() > REFRESH_EVERY {
            flows.refresh()?;
            refreshed = Instant::now();
        }
        let system = (Some(running.pid), &system_cpu);
        injected_step(&mut instrument, topology, system, profile, step_id, rate)
    });
    drop(system_cpu);
    // Signalling (churn, memory) is measured with the relay free to use every CPU.
    isolation::unpin_process(running.pid)?;
    result
}

/// The instrument on the flows, and the CPUs split between it and the system.
fn instrument_on(
    profile: &Profile,
    topology: &mut EdgeTopology,
    flows: &Flows,
    running: &Running,
) -> Result<(Instrument, isolation::SystemCpu)> {
    let instrument = Instrument::attach(
        topology,
        &flows.addresses()?,
        running.server,
        flows.peer_addr(),
        profile.workload.size,
    )?;
    let system_cpu = isolation::split_cpus(topology, Some(running.pid))?;
    Ok((instrument, system_cpu))
}

/// One injected step, its CPU measured around it: the system's threads are the relay
/// process's (None: no relay) and the edge veths' NAPI threads.
fn injected_step(
    instrument: &mut Instrument,
    topology: &EdgeTopology,
    (relay, system_cpu): (Option<u32>, &isolation::SystemCpu),
    profile: &Profile,
    step_id: u32,
    rate: f64,
) -> Result<Step> {
    let before = Snapshot::take_system(relay, Some(system_cpu))?;
    let injected = instrument.step(topology, step_id, rate, profile.step)?;
    let cpu = Snapshot::take_system(relay, Some(system_cpu))?.since(&before);
    if injected.inconsistent > 0 {
        bail!(
            "{} flows counted more packets than were sent: the instrument is broken",
            injected.inconsistent
        );
    }
    Ok(injected.into_step(rate, instrument.payload(), cpu))
}

/// The instrument's own ceiling: the same injectors, counters and veths with the trivial
/// reflector on the edge in place of a relay (flows need no signalling: the reflector
/// bounces whatever is stamped). Its saturation point is the most this machine can move.
pub fn instrument_ceiling(profile: &Profile) -> Result<(Vec<Step>, Option<f64>, Limit)> {
    let Some(mut topology) = EdgeTopology::create("loadtest", SenderChecksums::Complete)? else {
        bail!("the load test builds network namespaces and needs root");
    };
    let server = SocketAddr::new(topology.edge_external_ip(false), 3478);
    let addresses: Vec<(SocketAddr, SocketAddr)> = (0..profile.flows)
        .map(|flow| {
            let port = 1024 + flow as u16;
            (
                SocketAddr::new(topology.client_ip(false), port),
                SocketAddr::new(topology.edge_internal_ip(false), port),
            )
        })
        .collect();
    let peer = SocketAddr::new(IpAddr::V4(PEER4), PEER_PORT);
    let mut instrument = Instrument::attach(
        &mut topology,
        &addresses,
        server,
        peer,
        profile.workload.size,
    )?;
    let mut reflector = crate::xdp::Reflector::load()?;
    rampart_tests::netns::run_in(topology.edge.name(), || {
        reflector.attach_pair(
            rampart_tests::topology::EDGE_EXT_IF,
            rampart_tests::topology::EDGE_INT_IF,
        )
    })?;
    let system_cpu = isolation::split_cpus(&topology, None)?;
    let (steps, limit) = step_up(profile, "instrument ceiling", |step_id, rate| {
        injected_step(
            &mut instrument,
            &topology,
            (None, &system_cpu),
            profile,
            step_id,
            rate,
        )
    })?;
    let (ceiling, _) = saturation(&steps);
    Ok((steps, ceiling, limit))
}

fn open_files_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// Allocations this process can hold open besides `flows` and its other descriptors.
fn descriptor_budget(flows: usize) -> usize {
    usize::try_from(open_files_limit())
        .unwrap_or(usize::MAX)
        .saturating_sub(flows + 1000)
}

/// Clients and relays hold a socket per allocation.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let wanted = hard.max(1_048_576);
        if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_err() {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn first(failure: &Option<String>) -> String {
    failure
        .as_ref()
        .map(|f| format!("; first: {f}"))
        .unwrap_or_default()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(target_pps: f64, loss: f64) -> Step {
        let mut step = Step::from_counts(StepInput {
            target_pps,
            sent: 1000,
            generator_drops: 0,
            seconds: 1.0,
            received: &crate::stats::Received::new(0),
            cpu: crate::stats::CpuTime::default(),
        });
        step.offered_pps = target_pps;
        step.delivered = 1000;
        step.loss = loss;
        step
    }

    #[test]
    fn saturation_ignores_a_lucky_run_above_a_confirmed_lossy_rate() {
        let steps = [
            step(100.0, 0.0),
            step(200.0, 0.0),
            step(400.0, 0.01),
            step(400.0, 0.02),
            // Lossy once, then clean: counts as clean.
            step(300.0, 0.01),
            step(300.0, 0.0),
            // Above the confirmed lossy 400: not the saturation point.
            step(800.0, 0.0),
        ];
        assert_eq!(saturation(&steps), (Some(300.0), false));
        // Nothing lost above the best clean rate: only a lower bound.
        assert_eq!(saturation(&steps[..2]), (Some(200.0), true));
        assert_eq!(saturation(&[step(100.0, 0.5)]), (None, false));
    }

    #[test]
    fn bisection_stops_within_five_percent() {
        let (mut low, mut high) = (80_000.0, 160_000.0);
        let mut probes = 0;
        while let Some(rate) = next_probe(low, high) {
            assert!(rate > low && rate < high);
            // A system that saturates at 100 000.
            if rate <= 100_000.0 {
                low = rate;
            } else {
                high = rate;
            }
            probes += 1;
        }
        assert!(high <= low * BISECT_WITHIN);
        assert!((95_000.0..=100_000.0).contains(&low), "{low}");
        assert!(probes <= MAX_PROBES, "{probes}");
    }
}
