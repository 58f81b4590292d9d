//! Keeping the instrument's CPU apart from the system's, and counting what the instrument
//! itself failed to deliver.
//!
//! `BPF_PROG_RUN` in live-frames mode sends from inside the injecting thread's system call,
//! and a veth serves what arrives on it in NAPI, which by default runs as softirq on whichever
//! CPU raised it: the edge's packet processing would land on the injector's CPU. So every
//! veth's NAPI runs as a kernel thread (`/sys/class/net/<if>/threaded`), and the CPUs are
//! split: [`INSTRUMENT_CPU`] runs the injectors and the receiving hosts' NAPI (the counters),
//! [`SYSTEM_CPU`] the edge's NAPI (where a relay's XDP program runs) and every thread of the
//! relay process. A system's CPU is then the run time of those threads (the scheduler's own
//! nanosecond count; [`SYSTEM_CPU`]'s busy time in `/proc/stat` is tick-sampled, and too
//! noisy on these VMs to compare systems by). The NAPI threads run in
//! `SCHED_FIFO` (see [`make_realtime`]) and the injector in `SCHED_IDLE`
//! ([`yield_to_everything`]).
//!
//! [`SYSTEM_CPU`] is also kept from halting, by a spinner in `SCHED_IDLE` pinned there
//! ([`SystemCpu`]): it runs only when nothing else wants the CPU. On these VMs a halted vCPU
//! took up to 50-75 ms to wake for a frame at 10 000 pps (the edge's rings overflowed; p99 of
//! the same order), which a NIC's CPU on a host kept out of deep idle does not do. Its run time
//! is taken out of the `/proc/stat` cross-check; the systems' own CPU (their threads' run
//! time) never included it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use rampart_tests::topology::{CLIENT_IF, EDGE_EXT_IF, EDGE_INT_IF, EdgeTopology, PEER_IF};

/// Injectors, counters and the generator's own threads.
pub const INSTRUMENT_CPU: usize = 0;
/// The edge: its veths' NAPI and the relay process.
pub const SYSTEM_CPU: usize = 1;

/// How long a veth's NAPI thread may take to appear after `threaded` is set.
const NAPI_THREAD_WAIT: Duration = Duration::from_secs(2);

/// Bounds the spinner's life, should its owner never stop it.
const SPINNER_LIMIT: Duration = Duration::from_secs(4 * 3600);

/// The system's CPU as the instrument holds it while a system is measured: the edge veths'
/// NAPI threads (with the relay's, the threads whose run time is the system's CPU) and the
/// spinner that keeps the CPU from halting (stopped when this is dropped).
pub struct SystemCpu {
    pub napi: Vec<u32>,
    spinner: Spinner,
}

impl SystemCpu {
    /// The spinner's thread id, for taking its time out of the CPU's busy time.
    pub fn spinner_tid(&self) -> u32 {
        self.spinner.tid
    }
}

struct Spinner {
    stop: Arc<AtomicBool>,
    tid: u32,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    fn start(cpu: usize) -> Result<Spinner> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("keep-awake".into())
            .spawn(move || {
                pin_self(cpu);
                yield_to_everything();
                let _ = tid_tx.send(nix::unistd::gettid().as_raw() as u32);
                let started = Instant::now();
                while !flag.load(Ordering::Relaxed) && started.elapsed() < SPINNER_LIMIT {
                    std::hint::spin_loop();
                }
            })
            .context("starting the keep-awake spinner")?;
        let tid = tid_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the keep-awake spinner did not start")?;
        Ok(Spinner {
            stop,
            tid,
            thread: Some(thread),
        })
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Makes the four veths' NAPI threaded and pins their threads, and every thread of the
/// relay process `relay` (None: no relay, the instrument's own ceiling), to their CPUs, and
/// keeps the system's CPU awake. Each veth must already run NAPI (an XDP program attached, or
/// GRO on).
pub fn split_cpus(topology: &EdgeTopology, relay: Option<u32>) -> Result<SystemCpu> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    ensure!(
        cpus > SYSTEM_CPU,
        "the injector needs two CPUs (one for the instrument, one for the system); this machine \
         has {cpus}"
    );
    let mut edge_napi = Vec::new();
    for (ns, dev, cpu) in [
        (topology.client.name(), CLIENT_IF, INSTRUMENT_CPU),
        (topology.peer.name(), PEER_IF, INSTRUMENT_CPU),
        (topology.edge.name(), EDGE_EXT_IF, SYSTEM_CPU),
        (topology.edge.name(), EDGE_INT_IF, SYSTEM_CPU),
    ] {
        ns_shell(ns, &format!("echo 1 > /sys/class/net/{dev}/threaded"))
            .with_context(|| format!("threaded NAPI on {dev}"))?;
        for pid in napi_threads(dev)? {
            pin(pid, cpu).with_context(|| format!("pinning {dev}'s NAPI thread {pid}"))?;
            make_realtime(pid).with_context(|| format!("{dev}'s NAPI thread {pid}"))?;
            if cpu == SYSTEM_CPU {
                edge_napi.push(pid);
            }
        }
    }
    if let Some(pid) = relay {
        pin_process(pid, SYSTEM_CPU)?;
    }
    Ok(SystemCpu {
        napi: edge_napi,
        spinner: Spinner::start(SYSTEM_CPU)?,
    })
}

/// Time on a CPU of every thread of `pid`, in seconds, as the scheduler keeps it
/// (`/proc/<pid>/task/<tid>/schedstat`, nanoseconds, not sampled by ticks).
pub fn process_run_seconds(pid: u32) -> Result<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing the threads of {pid}"))?
        .flatten()
    {
        // A thread that just exited has no schedstat any more: its time is lost, not an error.
        if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) {
            total += parse_schedstat(&text)?;
        }
    }
    Ok(total)
}

/// [`process_run_seconds`] of single threads.
pub fn threads_run_seconds(tids: &[u32]) -> Result<f64> {
    tids.iter()
        .map(|tid| {
            let text = std::fs::read_to_string(format!("/proc/{tid}/schedstat"))
                .with_context(|| format!("reading /proc/{tid}/schedstat"))?;
            parse_schedstat(&text)
        })
        .sum()
}

fn parse_schedstat(text: &str) -> Result<f64> {
    let ns: u64 = text
        .split_whitespace()
        .next()
        .context("empty schedstat")?
        .parse()
        .context("schedstat: not a number")?;
    Ok(ns as f64 / 1e9)
}

/// Pins every thread of `pid` to `cpu` (threads it starts later inherit it).
pub fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    set_process_affinity(pid, &set)
}

/// Lets every thread of `pid` run on every CPU again.
pub fn unpin_process(pid: u32) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = nix::sched::CpuSet::new();
    for cpu in 0..cpus {
        set.set(cpu)?;
    }
    set_process_affinity(pid, &set)
}

fn set_process_affinity(pid: u32, set: &nix::sched::CpuSet) -> Result<()> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing the threads of {pid}"))?;
    for task in tasks {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), set)
            .with_context(|| format!("setting the CPUs of thread {tid} of {pid}"))?;
    }
    Ok(())
}

/// Puts a veth's NAPI thread in `SCHED_FIFO`, as a NIC's softirq processing preempts whatever
/// runs on its CPU. Woken in the fair class, it would wait for the "lazy" reschedule a busy CPU
/// honours at the next tick (4 ms at HZ=250; seen as p99 latencies of 3-4 ms), and the 256
/// frames of the veth's ring overflow meanwhile from 64 000 packets per second on: on the
/// instrument's CPU behind the spinning injector, on the system's behind a busy relay.
fn make_realtime(pid: u32) -> Result<()> {
    let param = nix::libc::sched_param { sched_priority: 1 };
    // SAFETY: a valid parameter for SCHED_FIFO.
    let rc = unsafe { nix::libc::sched_setscheduler(pid as i32, nix::libc::SCHED_FIFO, &param) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setscheduler(SCHED_FIFO)");
    }
    Ok(())
}

/// Puts the calling thread in `SCHED_IDLE`: it runs only when nothing else on its CPU wants
/// to. The injector spins (its program drops the runs before the next frame is due), and the
/// receiving hosts' NAPI threads, which share its CPU, must never wait for it, or the
/// instrument would lose what it is there to count.
pub fn yield_to_everything() {
    let param = nix::libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid parameter for SCHED_IDLE; 0 is the calling thread.
    let _ = unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_IDLE, &param) };
}

/// Pins the calling thread.
pub fn pin_self(cpu: usize) {
    let _ = pin(0, cpu);
}

fn pin(tid: u32, cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid as i32), &set)?;
    Ok(())
}

/// The NAPI kernel threads of `dev` (named `napi/<dev>-<id>`).
fn napi_threads(dev: &str) -> Result<Vec<u32>> {
    let prefix = format!("napi/{dev}-");
    let deadline = Instant::now() + NAPI_THREAD_WAIT;
    loop {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim().starts_with(&prefix))
            {
                found.push(pid);
            }
        }
        if !found.is_empty() {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("no NAPI thread for {dev} (is NAPI on: XDP attached or GRO on?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ns_shell(ns: &str, script: &str) -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script])
        .output()
        .context("running ip netns exec")?;
    if !out.status.success() {
        bail!(
            "`{script}` in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Busy time of each CPU in seconds (`/proc/stat`: everything but idle and iowait).
pub fn cpu_busy_seconds() -> Result<Vec<f64>> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_cpu_busy(&text)
}

fn parse_cpu_busy(text: &str) -> Result<Vec<f64>> {
    let mut busy = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        if rest.starts_with(' ') {
            continue; // the all-CPU line
        }
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("/proc/stat: not a number")?;
        ensure!(fields.len() >= 8, "/proc/stat: a short cpu line");
        // user nice system idle iowait irq softirq steal
        let ticks = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7];
        busy.push(ticks as f64 / crate::cpu::TICKS_PER_SECOND);
    }
    ensure!(!busy.is_empty(), "no cpuN lines in /proc/stat");
    Ok(busy)
}

/// Frames the veths refused, by whose fault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Refused {
    /// The edge's receive rings were full when the injectors sent (the edge did not keep up:
    /// counted in the system's loss, shown apart).
    pub by_edge: u64,
    /// The receiving hosts' rings were full when the edge sent (the instrument did not keep
    /// up: never the system's loss).
    pub by_receivers: u64,
}

impl Refused {
    pub fn since(&self, earlier: &Refused) -> Refused {
        Refused {
            by_edge: self.by_edge.saturating_sub(earlier.by_edge),
            by_receivers: self.by_receivers.saturating_sub(earlier.by_receivers),
        }
    }
}

/// Reads the veths' refusal counters (`ethtool -S`: a veth reports its own failed
/// `ndo_xdp_xmit`s into its peer's ring as `tx_queue_N_xdp_xmit_errors`; `rx_queue_N_drops`
/// are frames its ring refused on the socket path).
pub fn refused(topology: &EdgeTopology) -> Result<Refused> {
    let stats = |ns: &str, dev: &str| -> Result<HashMap<String, u64>> {
        Ok(parse_ethtool(&ns_shell(ns, &format!("ethtool -S {dev}"))?))
    };
    let sum = |stats: &HashMap<String, u64>, suffix: &str| -> u64 {
        stats
            .iter()
            .filter(|(name, _)| name.ends_with(suffix))
            .map(|(_, v)| v)
            .sum()
    };
    let client = stats(topology.client.name(), CLIENT_IF)?;
    let peer = stats(topology.peer.name(), PEER_IF)?;
    let ext = stats(topology.edge.name(), EDGE_EXT_IF)?;
    let int = stats(topology.edge.name(), EDGE_INT_IF)?;
    Ok(Refused {
        by_edge: sum(&client, "_xdp_xmit_errors") + sum(&peer, "_xdp_xmit_errors"),
        // A relay's redirects (and the reflector's XDP_TX) into the receivers' rings.
        by_receivers: sum(&ext, "_xdp_xmit_errors")
            + sum(&int, "_xdp_xmit_errors")
            + sum(&ext, "_xdp_tx_errors")
            + sum(&int, "_xdp_tx_errors")
            + sum(&client, "rx_queue_0_drops")
            + sum(&peer, "rx_queue_0_drops"),
    })
}

fn parse_ethtool(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// UDP datagrams the edge's stack dropped for a bad checksum (`/proc/net/snmp`
/// `InCsumErrors`): injected checksums must be valid, or the relays that verify them (the
/// userspace path, coturn) would lose what the XDP path, which does not, forwards.
pub fn edge_udp_checksum_errors(topology: &EdgeTopology) -> Result<u64> {
    let snmp = ns_shell(topology.edge.name(), "cat /proc/net/snmp")?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no Udp lines in /proc/net/snmp");
    };
    let index = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .context("no InCsumErrors in /proc/net/snmp")?;
    values
        .split_whitespace()
        .nth(index)
        .context("/proc/net/snmp: short Udp line")?
        .parse()
        .context("/proc/net/snmp: not a number")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_and_ethtool_parse() {
        assert!((parse_schedstat("1500000000 20 30\n").unwrap() - 1.5).abs() < 1e-9);
        let stat = "cpu  10 0 10 500 5 0 2 0 0 0\ncpu0 5 0 5 250 5 0 1 0 0 0\n\
                    cpu1 100 1 50 250 0 3 40 6 0 0\nintr 1 2\n";
        let busy = parse_cpu_busy(stat).unwrap();
        assert_eq!(busy.len(), 2);
        assert!((busy[0] - 0.11).abs() < 1e-9);
        assert!((busy[1] - 2.0).abs() < 1e-9);
        let ethtool = "NIC statistics:\n     peer_ifindex: 2\n     rx_queue_0_drops: 7\n     \
                       tx_queue_0_xdp_xmit_errors: 12\n";
        let stats = parse_ethtool(ethtool);
        assert_eq!(stats["rx_queue_0_drops"], 7);
        assert_eq!(stats["tx_queue_0_xdp_xmit_errors"], 12);
    }
}
