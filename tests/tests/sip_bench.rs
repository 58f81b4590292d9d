//! The SIP benchmark of the Access Edge, side by side with Kamailio: the same sipp load
//! (INVITE/ACK/BYE calls, then REGISTERs) through each proxy in turn, on this machine, over
//! TLS on both legs, each proxy in front of a fresh sipp UAS as its one next hop:
//!
//! ```text
//! sipp UAC --TCP--> bridge ==TLS==> proxy ==TLS==> bridge --TCP--> sipp UAS
//! ```
//!
//! (Debian's sipp has no TLS: the bridges of `rampart_tests::sip` put it on the wire.) The
//! proxies are the agent `rampart` with `[sip]` (a stateless proxy, RFC 3261 16.11, with its
//! per-source limits raised out of the way), Kamailio stateless (`forward()`: what the edge
//! is) and Kamailio transaction stateful (tm's `t_relay()`, for reference), both on the tlsf
//! allocator, and Kamailio stateless as Debian ships it (default allocator `qm` with memory
//! debugging compiled in). All present the same certificate; the caller verifies it, sends
//! to the same domain, from the same source, over one TLS connection (by default).
//!
//! Ignored by default; `cargo xtask bench-sip` builds the agent in release and runs it:
//!
//! ```text
//! cargo build --release -p relay-user --bin rampart
//! cargo test --release -p rampart-tests --test sip_bench -- --ignored --nocapture
//! ```
//!
//! Parameters (environment): `RAMPART_SIP_BENCH_SECONDS` and `RAMPART_SIP_BENCH_RATE` (5 and
//! 20000: `rate * seconds` calls, offered at `rate` calls/s, well above what two vCPUs carry,
//! so the concurrency cap paces sipp and each run measures the proxy at saturation; a run
//! lasts as long as the proxy needs), `RAMPART_SIP_BENCH_CONCURRENT` (200 calls open at once
//! at most), `RAMPART_SIP_BENCH_SOCKET_PER_CALL` (false: one TLS connection for the run;
//! true: one per call, for low rates only, e.g. `RATE=300 SECONDS=5`: the caller's bridge
//! makes every handshake on one thread, and each call leaves two loopback ports in
//! TIME_WAIT, so the harness, not the proxy, gives out first), `RAMPART_SIP_BENCH_REGISTER` (true: then as many REGISTERs, the same
//! way), `RAMPART_SIP_BENCH_RUNS` (1 round over the proxies), `RAMPART_SIP_BENCH_PROXIES`
//! (default all of `edge,kamailio-stateless,kamailio-tm,kamailio-stateless-qm`),
//! `RAMPART_SIP_BENCH_OUT` (default `<target>/sip-bench`).
//!
//! Prints a Markdown table and writes it, with the raw numbers as JSON, to `report.md` and
//! `report.json` in the output directory. Asserts only that every proxy carried calls.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rampart_tests::access_edge::{Leaf, SipPki, Site};
use rampart_tests::control::temp_dir;
use rampart_tests::sip::{
    Kamailio, KamailioConfig, Load, Scenario, SippUac, SippUas, Throughput, measure_caller,
    process_tree_cpu_time,
};
use rampart_tests::{Proto, Rampart, RampartConfig};
use serde_json::json;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pem(leaf: &Leaf) -> (String, String) {
    (
        std::fs::read_to_string(&leaf.certificate).unwrap(),
        std::fs::read_to_string(&leaf.private_key).unwrap(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProxyKind {
    Edge,
    KamailioStateless,
    KamailioTm,
    /// Stateless, on Kamailio's default allocator (`qm`, with Debian's memory debugging).
    KamailioStatelessQm,
}

impl ProxyKind {
    const ALL: [ProxyKind; 4] = [
        ProxyKind::Edge,
        ProxyKind::KamailioStateless,
        ProxyKind::KamailioTm,
        ProxyKind::KamailioStatelessQm,
    ];

    fn key(self) -> &'static str {
        match self {
            ProxyKind::Edge => "edge",
            ProxyKind::KamailioStateless => "kamailio-stateless",
            ProxyKind::KamailioTm => "kamailio-tm",
            ProxyKind::KamailioStatelessQm => "kamailio-stateless-qm",
        }
    }

    fn label(self) -> &'static str {
        match self {
            ProxyKind::Edge => "Rampart Access Edge (stateless)",
            ProxyKind::KamailioStateless => "Kamailio, stateless (forward), tlsf",
            ProxyKind::KamailioTm => "Kamailio, tm (t_relay), tlsf",
            ProxyKind::KamailioStatelessQm => "Kamailio, stateless, default allocator (qm)",
        }
    }
}

/// A proxy under test, running in front of its UAS.
enum Proxy {
    Edge(Rampart),
    Kamailio(Kamailio),
}

impl Proxy {
    fn cpu_time(&self) -> Duration {
        match self {
            Proxy::Edge(edge) => process_tree_cpu_time(edge.pid()),
            Proxy::Kamailio(kamailio) => kamailio.cpu_time(),
        }
    }

    fn log_tail(&self) -> String {
        let log = match self {
            Proxy::Edge(edge) => edge.log(),
            Proxy::Kamailio(kamailio) => kamailio.log(),
        };
        let mut start = log.len().saturating_sub(4000);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        log[start..].to_owned()
    }
}

/// CPU time of this (the test's) process: its own threads, living and gone (the TLS
/// bridges, which do all its work while sipp runs), and its children that it has waited for
/// (a finished sipp caller). From /proc/self/stat; like the per-process times of
/// [`process_tree_cpu_time`], these come from the scheduler's precise run time.
fn own_cpu_times() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(4)
                .map(|v| v.parse::<u64>().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let ticks = |range: std::ops::Range<usize>| -> Duration {
        Duration::from_millis(fields.get(range).map_or(0, |f| f.iter().sum::<u64>()) * 10)
    };
    // utime stime cutime cstime
    (ticks(0..2), ticks(2..4))
}

/// (busy, total) jiffies of all CPUs from /proc/stat; idle and iowait are not busy. Tick
/// sampled: timer-driven work that starts on a tick and ends before the next one is missed,
/// so at low load this reads far too low (kept in the JSON, not in the table).
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// One sipp run through one proxy, with what it cost.
struct Measured {
    result: Throughput,
    proxy_cpu: Duration,
    bridges_cpu: Duration,
    /// The sipp caller (waited for at the end of the run) and the sipp UAS.
    sipp_cpu: Duration,
    /// Busy share of the whole machine (all CPUs) during the run, 0..1.
    machine_busy: f64,
    wall: Duration,
}

impl Measured {
    fn proxy_us_per_call(&self) -> f64 {
        self.proxy_cpu.as_secs_f64() * 1e6 / self.result.successful.max(1) as f64
    }

    fn bridges_us_per_call(&self) -> f64 {
        self.bridges_cpu.as_secs_f64() * 1e6 / self.result.successful.max(1) as f64
    }

    fn sipp_us_per_call(&self) -> f64 {
        self.sipp_cpu.as_secs_f64() * 1e6 / self.result.successful.max(1) as f64
    }

    /// The proxy's CPU over sipp's run, in cores (1.0 = one vCPU all the time).
    fn proxy_cores(&self) -> f64 {
        self.proxy_cpu.as_secs_f64() / self.result.elapsed.as_secs_f64().max(1e-6)
    }

    /// Proxy, bridges and sipp together over sipp's run, in cores: how much of the machine
    /// the benchmark used (2.0 = both vCPUs all the time).
    fn all_cores(&self) -> f64 {
        (self.proxy_cpu + self.bridges_cpu + self.sipp_cpu).as_secs_f64()
            / self.result.elapsed.as_secs_f64().max(1e-6)
    }

    fn to_json(&self) -> serde_json::Value {
        let r = &self.result;
        json!({
            "successful": r.successful,
            "failed": r.failed,
            "created": r.run.calls.created,
            "failures": r.run.calls.failures,
            "exit_code": r.run.exit_code,
            "elapsed_seconds": r.elapsed.as_secs_f64(),
            "wall_seconds": self.wall.as_secs_f64(),
            "calls_per_second": r.calls_per_second,
            "messages_per_second": r.messages_per_second,
            "messages_end_to_end": r.run.messages.end_to_end(),
            "trying": r.run.messages.trying,
            "retransmissions": r.run.messages.retransmissions,
            "timeouts": r.run.messages.timeouts,
            "unexpected": r.run.messages.unexpected,
            "proxy_cpu_seconds": self.proxy_cpu.as_secs_f64(),
            "proxy_cpu_us_per_call": self.proxy_us_per_call(),
            "proxy_cores": self.proxy_cores(),
            "bridges_cpu_seconds": self.bridges_cpu.as_secs_f64(),
            "bridges_cpu_us_per_call": self.bridges_us_per_call(),
            "sipp_cpu_seconds": self.sipp_cpu.as_secs_f64(),
            "sipp_cpu_us_per_call": self.sipp_us_per_call(),
            "all_cores": self.all_cores(),
            "machine_busy_tick_sampled": self.machine_busy,
        })
    }
}

fn measure(proxy: &Proxy, uas: &SippUas, caller: SippUac, load: &Load) -> Measured {
    let uas_cpu = || process_tree_cpu_time(uas.pid());
    let (cpu, (own, children), uas_before, machine) = (
        proxy.cpu_time(),
        own_cpu_times(),
        uas_cpu(),
        machine_jiffies(),
    );
    let started = Instant::now();
    let result = measure_caller(caller, load).expect("sipp ran");
    let wall = started.elapsed();
    let machine_after = machine_jiffies();
    let (own_after, children_after) = own_cpu_times();
    let busy = machine_after.0.saturating_sub(machine.0) as f64;
    let total = machine_after.1.saturating_sub(machine.1).max(1) as f64;
    Measured {
        proxy_cpu: proxy.cpu_time().saturating_sub(cpu),
        bridges_cpu: own_after.saturating_sub(own),
        sipp_cpu: children_after.saturating_sub(children) + uas_cpu().saturating_sub(uas_before),
        machine_busy: busy / total,
        wall,
        result,
    }
}

struct Row {
    proxy: ProxyKind,
    round: u32,
    calls: Measured,
    register: Option<Measured>,
    /// The edge's last `counters` line's `sip` object (what it dropped and refused).
    edge_counters: Option<serde_json::Value>,
}

/// The test enterprise: the public CA the caller trusts, the edge's `[sip]` section (its
/// external certificate is also Kamailio's), and the next hop's certificate.
struct Bench {
    _dir: tempfile::TempDir,
    public: SipPki,
    site: Site,
    uas_pem: (String, String),
    edge_pem: (String, String),
    load: Load,
    register: bool,
}

impl Bench {
    fn new(load: Load, register: bool) -> Bench {
        let dir = temp_dir().unwrap();
        let public = SipPki::new(dir.path(), "public").unwrap();
        let mut site = Site::new(dir.path(), "corp", "corp.example", &public).unwrap();
        // The per-source guard is for floods; one benchmark caller is a single source
        // sending thousands of requests a second.
        site.section.limits = vec![
            ("requests_per_second".into(), "10000000".into()),
            ("request_burst".into(), "10000000".into()),
            ("ban_after".into(), "4000000000".into()),
            ("connections_per_source".into(), "20000".into()),
            ("connections_total".into(), "20000".into()),
        ];
        let next_hop = "pool.corp.local";
        let uas_pem = pem(&site.pki.issue("sipp-uas", &[next_hop]).unwrap());
        let edge_pem = pem(&site.section.external_leaf);
        Bench {
            _dir: dir,
            public,
            site,
            uas_pem,
            edge_pem,
            load,
            register,
        }
    }

    fn caller(&self, scenario: Scenario, target: std::net::SocketAddr) -> SippUac {
        SippUac::new(scenario, target, &self.public.ca_der())
            .server_name(&self.site.section.external_host)
            .domain(&self.site.domain)
            .from_domain(&self.site.domain)
            .service("bob")
    }

    fn start(&mut self, kind: ProxyKind, uas: &SippUas) -> (Proxy, std::net::SocketAddr) {
        let (cert, key) = &self.edge_pem;
        match kind {
            ProxyKind::Edge => {
                self.site.section.next_hops = vec![("pool.corp.local".into(), uas.addr())];
                let edge = Rampart::start(
                    &RampartConfig::single(Proto::Udp, false)
                        .with_log("info")
                        .with_stats_interval(1)
                        .with_section(self.site.section.to_toml()),
                )
                .unwrap();
                (Proxy::Edge(edge), self.site.section.external)
            }
            ProxyKind::KamailioStateless
            | ProxyKind::KamailioTm
            | ProxyKind::KamailioStatelessQm => {
                let mut config = KamailioConfig::new(0, uas.addr(), cert, key);
                config.stateful = kind == ProxyKind::KamailioTm;
                // Debian's build runs its default allocator (qm) with debugging records: the
                // tuned rows run tlsf, as a busy production proxy would; one row keeps qm.
                if kind != ProxyKind::KamailioStatelessQm {
                    config.memory_manager = Some("tlsf".into());
                }
                // tm keeps every finished transaction for its wait timer (5 s): at tens of
                // thousands of messages a second 1 GB runs out ("not enough memory").
                config.shm_mb = 4096;
                let kamailio = Kamailio::start_with(&config).unwrap();
                let addr = kamailio.addr();
                (Proxy::Kamailio(kamailio), addr)
            }
        }
    }

    fn run(&mut self, kind: ProxyKind, round: u32) -> Row {
        let (cert, key) = self.uas_pem.clone();
        let uas = SippUas::builder(&cert, &key).start().unwrap();
        let (proxy, target) = self.start(kind, &uas);
        // One call first, not measured: the proxy's connection to the next hop is open before
        // the clock starts (the edge connects on the first request, Kamailio too).
        self.caller(Scenario::Invite, target)
            .calls(1)
            .run()
            .unwrap()
            .assert_all_succeeded(1);
        let calls = measure(
            &proxy,
            &uas,
            self.caller(Scenario::Invite, target),
            &self.load,
        );
        report_failures(kind, "INVITE", &calls, &proxy, &uas);
        let register = self.register.then(|| {
            let register = measure(
                &proxy,
                &uas,
                self.caller(Scenario::Register, target),
                &self.load,
            );
            report_failures(kind, "REGISTER", &register, &proxy, &uas);
            register
        });
        let edge_counters = match &proxy {
            Proxy::Edge(edge) => {
                // The counters line comes once a second: wait for one after the runs.
                std::thread::sleep(Duration::from_millis(1200));
                edge.counters().last().map(|c| c["sip"].clone())
            }
            Proxy::Kamailio(_) => None,
        };
        println!(
            "{} (round {round}): calls: {}; proxy CPU {:.0} us/call ({:.2} cores), bridges {:.0} us/call, sipp {:.0} us/call, all {:.2} cores",
            kind.label(),
            calls.result,
            calls.proxy_us_per_call(),
            calls.proxy_cores(),
            calls.bridges_us_per_call(),
            calls.sipp_us_per_call(),
            calls.all_cores()
        );
        if let Some(register) = &register {
            println!(
                "{} (round {round}): REGISTER: {} registrations, {:.0} messages/s, {} failed; proxy CPU {:.0} us/registration",
                kind.label(),
                register.result.successful,
                register.result.messages_per_second,
                register.result.failed,
                register.proxy_us_per_call()
            );
        }
        if let Some(counters) = &edge_counters {
            println!("edge counters after the runs: {counters}");
        }
        drop(proxy);
        drop(uas);
        Row {
            proxy: kind,
            round,
            calls,
            register,
            edge_counters,
        }
    }
}

fn report_failures(kind: ProxyKind, what: &str, measured: &Measured, proxy: &Proxy, uas: &SippUas) {
    let run = &measured.result.run;
    if measured.result.failed == 0 && run.exit_code == Some(0) {
        return;
    }
    println!(
        "--- {} {what}: {} failed (exit code {:?}, causes {:?}) ---\n{}\n--- proxy log (end) ---\n{}\n{}",
        kind.label(),
        measured.result.failed,
        run.exit_code,
        run.calls.failures,
        run.diagnostics,
        proxy.log_tail(),
        uas.diagnostics()
    );
}

fn out_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RAMPART_SIP_BENCH_OUT") {
        return PathBuf::from(dir);
    }
    // Test executables live in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.ancestors()
        .nth(3)
        .map(|target| target.join("sip-bench"))
        .expect("the test executable sits in a target directory")
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    read_trimmed("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default()
}

fn markdown(rows: &[Row], load: &Load) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Load: INVITE/ACK/BYE calls offered at {} calls/s for {} s ({} calls), at most {} open at once, {}; \
         then REGISTERs at the same rate and count.\n",
        load.rate,
        load.duration.as_secs(),
        (load.rate * load.duration.as_secs_f64()).ceil(),
        load.max_concurrent,
        if load.socket_per_call {
            "one TLS connection per call"
        } else {
            "one TLS connection for the run"
        }
    );
    let _ = writeln!(
        md,
        "| proxy | run | calls/s | messages/s | failed calls | proxy CPU µs/call | proxy CPU (cores) | bridges CPU µs/call | sipp CPU µs/call | all CPU (cores) | REGISTER messages/s | failed REGISTERs | proxy CPU µs/REGISTER |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let offered = (load.rate * load.duration.as_secs_f64()).ceil().max(1.0) as u64;
    let mut notes = Vec::new();
    // A run that sipp did not finish (its time limit, a fatal error) leaves calls unmade:
    // say so rather than show a clean "0 failed".
    let mut failed = |row: &Row, what: &str, m: &Measured| {
        let r = &m.result;
        let unmade = offered.saturating_sub(r.successful + r.failed);
        if r.run.exit_code != Some(0) || unmade > 0 {
            notes.push(format!(
                "- {} run {}, {what}: sipp exited with {:?}; {unmade} of {offered} not made.",
                row.proxy.label(),
                row.round,
                r.run.exit_code
            ));
            format!("{} (!)", r.failed)
        } else {
            r.failed.to_string()
        }
    };
    for row in rows {
        let c = &row.calls;
        let calls_failed = failed(row, "INVITE", c);
        let (reg_mps, reg_failed, reg_cpu) = match &row.register {
            Some(r) => (
                format!("{:.0}", r.result.messages_per_second),
                failed(row, "REGISTER", r),
                format!("{:.0}", r.proxy_us_per_call()),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {calls_failed} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {reg_mps} | {reg_failed} | {reg_cpu} |",
            row.proxy.label(),
            row.round,
            c.result.calls_per_second,
            c.result.messages_per_second,
            c.proxy_us_per_call(),
            c.proxy_cores(),
            c.bridges_us_per_call(),
            c.sipp_us_per_call(),
            c.all_cores(),
        );
    }
    if !notes.is_empty() {
        let _ = writeln!(md, "\n{}", notes.join("\n"));
    }
    md
}

#[test]
#[ignore = "a benchmark: `cargo xtask bench-sip` (see the module doc)"]
fn access_edge_vs_kamailio() {
    let load = Load {
        duration: Duration::from_secs(env_or("RAMPART_SIP_BENCH_SECONDS", 5)),
        rate: env_or("RAMPART_SIP_BENCH_RATE", 20000.0),
        max_concurrent: env_or("RAMPART_SIP_BENCH_CONCURRENT", 200),
        socket_per_call: env_or("RAMPART_SIP_BENCH_SOCKET_PER_CALL", false),
        ..Load::default()
    };
    let register = env_or("RAMPART_SIP_BENCH_REGISTER", true);
    let rounds: u32 = env_or("RAMPART_SIP_BENCH_RUNS", 1).max(1);
    let wanted = std::env::var("RAMPART_SIP_BENCH_PROXIES").unwrap_or_default();
    let proxies: Vec<ProxyKind> = ProxyKind::ALL
        .into_iter()
        .filter(|p| wanted.trim().is_empty() || wanted.split(',').any(|w| w.trim() == p.key()))
        .collect();
    assert!(
        !proxies.is_empty(),
        "RAMPART_SIP_BENCH_PROXIES names none of edge, kamailio-stateless, kamailio-tm, kamailio-stateless-qm"
    );
    // Anything else running on the machine skews every column but the proxy's own CPU.
    let load_before = read_trimmed("/proc/loadavg");
    println!(
        "SIP benchmark: {load:?}, REGISTER run: {register}, {rounds} round(s); load average before: {load_before}"
    );

    let mut bench = Bench::new(load.clone(), register);
    let mut rows = Vec::new();
    for round in 1..=rounds {
        for &kind in &proxies {
            rows.push(bench.run(kind, round));
        }
    }

    let md = markdown(&rows, &load);
    println!("\n{md}");
    let json = json!({
        "load": {
            "seconds": load.duration.as_secs_f64(),
            "rate": load.rate,
            "max_concurrent": load.max_concurrent,
            "socket_per_call": load.socket_per_call,
            "register": register,
        },
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model(),
        "kernel": read_trimmed("/proc/sys/kernel/osrelease"),
        "load_average_before": load_before,
        "results": rows.iter().map(|row| json!({
            "proxy": row.proxy.key(),
            "label": row.proxy.label(),
            "round": row.round,
            "calls": row.calls.to_json(),
            "register": row.register.as_ref().map(Measured::to_json),
            "edge_counters": row.edge_counters,
        })).collect::<Vec<_>>(),
    });
    let dir = out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("report.md"), &md).unwrap();
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("written to {}", dir.display());

    for row in &rows {
        assert!(
            row.calls.result.successful > 0,
            "no call went through {}",
            row.proxy.label()
        );
    }
}
