//! CPU time and memory from /proc: the relay process's (all threads), the kernel's softirq
//! time over all CPUs, and this process's own.

use anyhow::{Context as _, Result, bail};

/// USER_HZ: the unit of /proc's CPU times (100 on every Linux architecture we run on).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// user + system time of a process, all its threads, in seconds (`/proc/<pid>/stat`).
pub fn process_seconds(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_process_stat(&text)
}

fn parse_process_stat(text: &str) -> Result<f64> {
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no ')' in /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let tick = |index: usize| -> Result<f64> {
        Ok(fields
            .get(index)
            .context("/proc/<pid>/stat too short")?
            .parse::<u64>()
            .context("/proc/<pid>/stat: not a number")? as f64)
    };
    Ok((tick(11)? + tick(12)?) / TICKS_PER_SECOND)
}

/// Softirq time of all CPUs together, in seconds (`/proc/stat`, line `cpu`, 7th value).
pub fn softirq_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_softirq(&text)
}

fn parse_softirq(text: &str) -> Result<f64> {
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        bail!("no `cpu` line in /proc/stat");
    };
    let value = line
        .split_whitespace()
        .nth(7)
        .context("/proc/stat `cpu` line too short")?
        .parse::<u64>()
        .context("/proc/stat: not a number")?;
    Ok(value as f64 / TICKS_PER_SECOND)
}

/// This process's user + system time, in seconds.
pub fn own_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|usage| {
            let seconds =
                |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1_000_000.0;
            seconds(usage.user_time()) + seconds(usage.system_time())
        })
        .unwrap_or(0.0)
}

/// Resident memory of a process in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn resident_bytes(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_resident(&text)
}

fn parse_resident(text: &str) -> Result<u64> {
    kib_field(text, "VmRSS:")
}

/// The kernel's slab memory in bytes (`Slab` of `/proc/meminfo`, machine-wide): where socket
/// structures and their buffers' bookkeeping live.
pub fn slab_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    kib_field(&text, "Slab:")
}

/// A `Name:   123 kB` line's value, in bytes.
fn kib_field(text: &str, name: &str) -> Result<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .with_context(|| format!("no {name} line"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("{name} without a value"))?
        .parse()
        .with_context(|| format!("{name} not a number"))?;
    Ok(kib * 1024)
}

/// A CPU reading of the relay, the kernel and the generator at one moment.
#[derive(Clone)]
pub struct Snapshot {
    relay: f64,
    softirq: f64,
    own: f64,
    cpus: Vec<f64>,
    relay_program: f64,
    system: f64,
    /// The keep-awake spinner's run time on the system's CPU.
    spinner: f64,
}

/// The name (as the kernel keeps it, 16 bytes at most) of the relay's XDP program.
const RELAY_PROGRAM: &str = "rampart_xdp";

impl Snapshot {
    pub fn take(relay_pid: u32) -> Result<Snapshot> {
        Self::take_system(Some(relay_pid), None)
    }

    /// With the system's threads: the relay's (None: no relay) and the edge veths' NAPI, and
    /// the keep-awake spinner's time.
    pub fn take_system(
        relay: Option<u32>,
        system: Option<&crate::isolation::SystemCpu>,
    ) -> Result<Snapshot> {
        let (napi, spinner): (&[u32], f64) = match system {
            Some(system) => (
                &system.napi,
                crate::isolation::threads_run_seconds(&[system.spinner_tid()])?,
            ),
            None => (&[], 0.0),
        };
        let relay_run = match relay {
            Some(pid) => crate::isolation::process_run_seconds(pid)?,
            None => 0.0,
        };
        Ok(Snapshot {
            relay: match relay {
                Some(pid) => process_seconds(pid)?,
                None => 0.0,
            },
            softirq: softirq_seconds()?,
            own: own_seconds(),
            cpus: crate::isolation::cpu_busy_seconds()?,
            relay_program: program_seconds(RELAY_PROGRAM),
            system: relay_run + crate::isolation::threads_run_seconds(napi)?,
            spinner,
        })
    }

    /// CPU time spent since `earlier`.
    pub fn since(&self, earlier: &Snapshot) -> crate::stats::CpuTime {
        let cpu = |index: usize| {
            let now = self.cpus.get(index).copied().unwrap_or(0.0);
            let then = earlier.cpus.get(index).copied().unwrap_or(0.0);
            (now - then).max(0.0)
        };
        crate::stats::CpuTime {
            relay_process: (self.relay - earlier.relay).max(0.0),
            softirq: (self.softirq - earlier.softirq).max(0.0),
            generator: (self.own - earlier.own).max(0.0),
            system_cpu: (self.system - earlier.system).max(0.0),
            system_cpu_busy: (cpu(crate::isolation::SYSTEM_CPU) - (self.spinner - earlier.spinner))
                .max(0.0),
            instrument_cpu: cpu(crate::isolation::INSTRUMENT_CPU),
            relay_program: (self.relay_program - earlier.relay_program).max(0.0),
        }
    }
}

/// Keeps the kernel's per-program run-time statistics on while it lives
/// (`kernel.bpf_stats_enabled`); without it `run_time_ns` stays 0.
pub struct ProgramStats(#[allow(dead_code)] Option<std::os::fd::OwnedFd>);

impl ProgramStats {
    pub fn enable() -> ProgramStats {
        ProgramStats(aya::sys::enable_stats(aya::sys::Stats::RunTime).ok())
    }
}

/// Total run time in seconds of the loaded programs named `name`.
fn program_seconds(name: &str) -> f64 {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| info.name_as_str() == Some(name))
        .map(|info| info.run_time().as_secs_f64())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "4242 (turn server) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 0 0 20 0 4 0 \
                    100 1000000 500 18446744073709551615";
        assert!((parse_process_stat(stat).unwrap() - 3.25).abs() < 1e-9);
        let proc_stat = "cpu  100 0 50 9000 10 0 42 0 0 0\ncpu0 50 0 25 4500 5 0 21 0 0 0\n";
        assert!((parse_softirq(proc_stat).unwrap() - 0.42).abs() < 1e-9);
        let status = "Name:\trampart\nVmPeak:\t  20000 kB\nVmRSS:\t   12345 kB\n";
        assert_eq!(parse_resident(status).unwrap(), 12345 * 1024);
        assert!(parse_process_stat("garbage").is_err());
        assert!(parse_softirq("intr 1 2 3").is_err());
    }

    #[test]
    fn this_process_can_be_read() {
        let pid = std::process::id();
        assert!(process_seconds(pid).unwrap() >= 0.0);
        assert!(resident_bytes(pid).unwrap() > 0);
        assert!(softirq_seconds().unwrap() >= 0.0);
    }
}
