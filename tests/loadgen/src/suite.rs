//! The side-by-side run: the same workload against each system, each in a fresh copy of the
//! XDP tests' namespace topology, stepping the rate up to each one's saturation point, then
//! allocation churn and memory per allocation.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rampart_tests::topology::{EdgeTopology, PEER4, SenderChecksums};

use crate::cpu::{self, Snapshot};
use crate::injection::Instrument;
use crate::report::{LOSS_THRESHOLD, Report, SystemResult};
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
                rates: vec![10e3, 20e3, 40e3, 80e3, 160e3, 320e3],
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
                    10e3, 20e3, 40e3, 60e3, 80e3, 120e3, 160e3, 240e3, 320e3, 480e3, 640e3, 960e3,
                    1280e3,
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
    let mut results = Vec::new();
    for &system in systems {
        eprintln!("loadtest: ==> {}", system.name());
        let result = run_system(profile, system)
            .with_context(|| format!("load test of {}", system.name()))?;
        results.push(result);
    }
    Ok(Report::new(
        profile.generator,
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
    let running = Running::start(system, &topology)?;
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
    let flows = Flows::set_up(&target, profile.flows)
        .map_err(|e| e.context(format!("relay log:\n{}", tail(&running.log()))))?;
    let (steps, generator_limited) = match profile.generator {
        Generator::Sockets => rate_steps(profile, system, &flows, &running),
        Generator::Injector => Instrument::attach(
            &mut topology,
            &flows,
            running.server,
            target.peer,
            profile.workload.size,
        )
        .and_then(|mut instrument| injected_steps(profile, system, &mut instrument, &running)),
    }
    .map_err(|e| e.context(format!("relay log:\n{}", tail(&running.log()))))?;
    let saturation_pps = steps
        .iter()
        .filter(|s| s.loss < LOSS_THRESHOLD && s.delivered > 0)
        .map(|s| s.offered_pps)
        .max_by(f64::total_cmp);

    let churn = signalling::churn(&target, profile.churn_workers, profile.churn)?;
    eprintln!(
        "loadtest: {}: {:.0} allocations created and deleted per second ({} failed{})",
        system.name(),
        churn.cycles_per_second,
        churn.failures,
        first(&churn.first_failure)
    );

    let before = cpu::resident_bytes(running.pid)?;
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
    drop(held);
    drop(flows);
    Ok(SystemResult {
        system,
        steps,
        saturation_pps,
        generator_limited,
        churn: Some(churn),
        memory,
    })
}

/// Steps the rate up until loss passes the threshold twice, or the generator cannot offer
/// the rate asked for; `measure(step id, rate)` runs one step. Also says whether the
/// generator ran out before the system lost anything.
fn step_up(
    profile: &Profile,
    system: System,
    mut measure: impl FnMut(u32, f64) -> Result<Step>,
) -> Result<(Vec<Step>, bool)> {
    let mut steps = Vec::new();
    let mut lossy = 0;
    let mut generator_limited = false;
    for (index, &rate) in profile.rates.iter().enumerate() {
        let step = measure(index as u32 + 1, rate)?;
        eprintln!(
            "loadtest: {}: {:>8.0} pps asked, {:>8.0} offered, {:>8.0} delivered, loss {:.3}%, \
             p50/p99 {:.0}/{:.0} µs, CPU {:.2} µs/pkt (relay {:.2}), generator CPU {:.2} s",
            system.name(),
            rate,
            step.offered_pps,
            step.delivered_pps,
            step.loss * 100.0,
            step.latency_p50_us,
            step.latency_p99_us,
            step.cpu_per_packet_us,
            step.relay_cpu_per_packet_us,
            step.cpu.generator,
        );
        let (offered, loss) = (step.offered_pps, step.loss);
        steps.push(step);
        if offered < 0.9 * rate {
            eprintln!(
                "loadtest: {}: the generator offered only {offered:.0} pps of {rate:.0}: stopping here",
                system.name()
            );
            generator_limited = loss < LOSS_THRESHOLD;
            break;
        }
        if loss >= LOSS_THRESHOLD {
            lossy += 1;
            if lossy == 2 {
                break;
            }
        }
    }
    Ok((steps, generator_limited))
}

/// [`step_up`] with the socket generator.
fn rate_steps(
    profile: &Profile,
    system: System,
    flows: &Flows,
    running: &Running,
) -> Result<(Vec<Step>, bool)> {
    let clock = Clock::start();
    let receivers = Receivers::start(flows, clock)?;
    step_up(profile, system, |step_id, rate| {
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

/// [`step_up`] with the kernel-speed generator.
fn injected_steps(
    profile: &Profile,
    system: System,
    instrument: &mut Instrument,
    running: &Running,
) -> Result<(Vec<Step>, bool)> {
    step_up(profile, system, |step_id, rate| {
        let before = Snapshot::take(running.pid)?;
        let injected = instrument.step(step_id, rate, profile.step)?;
        let cpu = Snapshot::take(running.pid)?.since(&before);
        if injected.inconsistent > 0 {
            bail!(
                "{} flows counted more packets than were sent: the instrument is broken",
                injected.inconsistent
            );
        }
        Ok(injected.into_step(rate, instrument.payload(), cpu))
    })
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
