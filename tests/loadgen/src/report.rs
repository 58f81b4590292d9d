//! A run's results: per system, the steps, the saturation point, churn and memory; the
//! side-by-side table for people, JSON for machines, and an SVG plot.

use std::fmt::Write as _;

use serde::Serialize;

use crate::signalling::{Churn, Memory};
use crate::stats::Step;
use crate::suite::Generator;
use crate::systems::System;

/// Loss below this at a step counts as "delivered" (the saturation criterion).
pub const LOSS_THRESHOLD: f64 = 0.001;

/// What ended a system's rate steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// The system lost more than 0.1% (a measured saturation point).
    SystemLoss,
    /// The generator could not send the rate asked for.
    GeneratorRate,
    /// The instrument's receivers could not take what the system delivered.
    InstrumentReceivers,
    /// The profile's highest rate was delivered.
    RateLadder,
}

impl Limit {
    pub fn describe(self) -> &'static str {
        match self {
            Limit::SystemLoss => "the system's loss passed 0.1% (measured)",
            Limit::GeneratorRate => "the generator could not offer more (a lower bound)",
            Limit::InstrumentReceivers => {
                "the instrument's receivers could not take more (a lower bound)"
            }
            Limit::RateLadder => "the profile's highest rate was delivered (a lower bound)",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SystemResult {
    pub system: System,
    pub steps: Vec<Step>,
    /// The highest offered rate delivered with loss < 0.1%.
    pub saturation_pps: Option<f64>,
    /// No rate above the saturation point was lost by the system: the instrument ran out
    /// first (see `limited_by`), and the system's saturation lies higher.
    pub saturation_is_lower_bound: bool,
    /// What ended the stepping: the system's loss, or a part of the instrument that ran out.
    pub limited_by: Limit,
    /// UDP datagrams the edge dropped for a bad checksum during the media steps (must be 0).
    pub edge_udp_checksum_errors: u64,
    pub churn: Option<Churn>,
    pub memory: Vec<Memory>,
    /// rampart-userspace only: p99 latency with and without the control link reporting.
    pub under_reports: Option<UnderReports>,
}

/// p99 latency at a fixed rate with many allocations held: two runs without reports (their
/// spread is the noise), one with the agent reporting to the control service.
#[derive(Clone, Debug, Serialize)]
pub struct UnderReports {
    pub rate_pps: f64,
    pub allocations_held: usize,
    pub report_interval_s: u64,
    pub p99_without_reports_us: [f64; 2],
    pub p99_with_reports_us: f64,
}

impl UnderReports {
    /// The goal: with reports, p99 stays within the spread of the two runs without (or
    /// below it).
    pub fn within_spread(&self) -> bool {
        let [a, b] = self.p99_without_reports_us;
        self.p99_with_reports_us <= a.max(b)
    }
}

/// The userspace relay's resident memory per allocation may not exceed this (issue goal).
pub const MAX_BYTES_PER_ALLOCATION: f64 = 4096.0;

impl SystemResult {
    /// The step at the saturation point.
    pub fn saturation_step(&self) -> Option<&Step> {
        let saturation = self.saturation_pps?;
        self.steps.iter().find(|s| s.offered_pps == saturation)
    }

    fn step_at(&self, target_pps: f64) -> Option<&Step> {
        self.steps.iter().find(|s| s.target_pps == target_pps)
    }
}

/// The injector's own ceiling: its saturation with the trivial reflector in place of a
/// relay, on the same veths and CPUs.
#[derive(Clone, Debug, Serialize)]
pub struct Ceiling {
    pub ceiling_pps: Option<f64>,
    /// The reflector lost nothing up to the highest rate tried (the injector or the profile's
    /// ladder ran out first).
    pub is_lower_bound: bool,
    pub limited_by: Limit,
    /// Frames per `BPF_PROG_RUN` batch: the injector's burst, the same for every system.
    pub burst: u32,
    pub steps: Vec<Step>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    /// Where the media came from: "injector" or "sockets".
    pub generator: Generator,
    /// With the injector: the most this machine can move.
    pub instrument: Option<Ceiling>,
    pub profile: String,
    pub flows: usize,
    pub packet_size: usize,
    pub burst: usize,
    pub systems: Vec<SystemResult>,
    /// The highest target rate every system delivered with loss < 0.1%: where CPU per packet
    /// and latency are compared.
    pub common_rate_pps: Option<f64>,
    pub ratios: Vec<Ratio>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub what: String,
    pub value: f64,
    /// The goal of the load-test issue it is reported against, when it has one.
    pub goal: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_owned())
            .unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
        }
    }
}

impl Report {
    #[allow(clippy::too_many_arguments)] // one report, built once
    pub fn new(
        generator: Generator,
        instrument: Option<Ceiling>,
        profile: &str,
        flows: usize,
        packet_size: usize,
        burst: usize,
        systems: Vec<SystemResult>,
        seconds: f64,
    ) -> Report {
        let common_rate_pps = common_rate(&systems);
        let mut report = Report {
            machine: Machine::describe(),
            generator,
            instrument,
            profile: profile.to_owned(),
            flows,
            packet_size,
            burst,
            systems,
            common_rate_pps,
            ratios: Vec::new(),
            seconds,
        };
        report.ratios = report.compute_ratios();
        report
    }

    fn system(&self, system: System) -> Option<&SystemResult> {
        self.systems.iter().find(|s| s.system == system)
    }

    fn compute_ratios(&self) -> Vec<Ratio> {
        let mut ratios = Vec::new();
        let xdp = self.system(System::RampartXdp);
        let userspace = self.system(System::RampartUserspace);
        let epoll = self.system(System::RampartUserspaceEpoll);
        let coturn = self.system(System::Coturn);
        let saturation = |s: Option<&SystemResult>| s.and_then(|s| s.saturation_pps);
        let mut push = |what: &str, a: Option<f64>, b: Option<f64>, goal: Option<f64>| {
            if let (Some(a), Some(b)) = (a, b)
                && b > 0.0
            {
                ratios.push(Ratio {
                    what: what.to_owned(),
                    value: a / b,
                    goal,
                });
            }
        };
        push(
            "saturation rate: rampart-xdp / rampart-userspace",
            saturation(xdp),
            saturation(userspace),
            Some(5.0),
        );
        push(
            "saturation rate: rampart-xdp / coturn",
            saturation(xdp),
            saturation(coturn),
            Some(5.0),
        );
        push(
            "saturation rate: rampart-userspace / coturn",
            saturation(userspace),
            saturation(coturn),
            Some(2.0),
        );
        push(
            "saturation rate: rampart-userspace (sk_lookup gathering) / rampart-userspace-epoll",
            saturation(userspace),
            saturation(epoll),
            None,
        );
        if let Some(ceiling) = self.instrument.as_ref().and_then(|c| c.ceiling_pps) {
            push(
                "saturation rate: rampart-xdp / the instrument's ceiling",
                saturation(xdp),
                Some(ceiling),
                Some(0.5),
            );
        }
        if let Some(rate) = self.common_rate_pps {
            let cpu = |s: Option<&SystemResult>| {
                s.and_then(|s| s.step_at(rate)).map(|s| s.cpu_per_packet_us)
            };
            let p99 = |s: Option<&SystemResult>| {
                s.and_then(|s| s.step_at(rate)).map(|s| s.latency_p99_us)
            };
            push(
                "CPU per delivered packet: coturn / rampart-xdp (at the common rate)",
                cpu(coturn),
                cpu(xdp),
                Some(5.0),
            );
            let relay_cpu = |s: Option<&SystemResult>| {
                s.and_then(|s| s.step_at(rate))
                    .map(|s| s.relay_cpu_per_packet_us)
            };
            push(
                "relay process CPU per delivered packet: coturn / rampart-userspace (at the common rate)",
                relay_cpu(coturn),
                relay_cpu(userspace),
                Some(3.0),
            );
            push(
                "relay process CPU per delivered packet: rampart-userspace-epoll / rampart-userspace (sk_lookup gathering; at the common rate)",
                relay_cpu(epoll),
                relay_cpu(userspace),
                None,
            );
            push(
                "CPU per delivered packet: rampart-userspace / rampart-xdp (at the common rate)",
                cpu(userspace),
                cpu(xdp),
                None,
            );
            push(
                "p99 latency: coturn / rampart-xdp (at the common rate; >= 1 means no worse)",
                p99(coturn),
                p99(xdp),
                Some(1.0),
            );
        }
        let churn = |s: Option<&SystemResult>| {
            s.and_then(|s| s.churn.as_ref())
                .map(|c| c.cycles_per_second)
        };
        push(
            "allocation churn: rampart-userspace / coturn",
            churn(userspace),
            churn(coturn),
            Some(1.0),
        );
        push(
            "allocation churn: rampart-xdp / coturn",
            churn(xdp),
            churn(coturn),
            Some(1.0),
        );
        ratios
    }

    /// The headline numbers, for docs/benchmarks/loadtest.json: per system its saturation
    /// point (and whether it is only a lower bound), CPU per packet (the system's, and its
    /// process's alone) and p99 latency at the common rate, memory per allocation.
    pub fn summary(&self) -> serde_json::Value {
        let mut systems = serde_json::Map::new();
        for result in &self.systems {
            let at_common = self.common_rate_pps.and_then(|r| result.step_at(r));
            systems.insert(
                result.system.name().to_owned(),
                serde_json::json!({
                    "saturation_pps": result.saturation_pps,
                    "saturation_is_lower_bound": result.saturation_is_lower_bound,
                    "limited_by": result.limited_by,
                    "cpu_us_per_packet_at_common_rate": at_common.map(|s| s.cpu_per_packet_us),
                    "relay_cpu_us_per_packet_at_common_rate":
                        at_common.map(|s| s.relay_cpu_per_packet_us),
                    "p99_us_at_common_rate": at_common.map(|s| s.latency_p99_us),
                    "bytes_per_allocation": result.memory.last().map(|m| m.bytes_per_allocation),
                    "slab_bytes_per_allocation":
                        result.memory.last().map(|m| m.slab_bytes_per_allocation),
                    "allocations_measured": result.memory.last().map(|m| m.allocations),
                    "under_reports": result.under_reports,
                    "churn_per_second": result.churn.as_ref().map(|c| c.cycles_per_second),
                }),
            );
        }
        serde_json::json!({
            "generator": self.generator,
            "instrument_ceiling_pps": self.instrument.as_ref().and_then(|c| c.ceiling_pps),
            "instrument_ceiling_is_lower_bound": self.instrument.as_ref().map(|c| c.is_lower_bound),
            "burst": self.instrument.as_ref().map_or(self.burst as u32, |c| c.burst),
            "common_rate_pps": self.common_rate_pps,
            "profile": self.profile,
            "flows": self.flows,
            "packet_size": self.packet_size,
            "machine": self.machine,
            "systems": systems,
            "ratios": self.ratios,
        })
    }

    /// The side-by-side table (Markdown, so it goes into docs/benchmarks.md as it is).
    pub fn table(&self) -> String {
        let mut t = String::new();
        let memory_points: Vec<usize> = self
            .systems
            .iter()
            .flat_map(|s| s.memory.iter().map(|m| m.requested))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let common = self
            .common_rate_pps
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.0} pps"));
        let cpu = match self.generator {
            Generator::Injector => "the system's CPU",
            Generator::Sockets => "relay + softirq",
        };
        let _ = write!(
            t,
            "| system | saturation (pps, loss < 0.1%) | Gbit/s there | p50 / p99 / p99.9 there (µs) \
             | CPU µs/pkt at {common} ({cpu}) | relay process µs/pkt there | p99 there (µs) \
             | alloc+delete /s |"
        );
        for point in &memory_points {
            let _ = write!(t, " bytes/allocation at {point} |");
        }
        let _ = write!(t, "\n|---|---|---|---|---|---|---|---|");
        for _ in &memory_points {
            let _ = write!(t, "---|");
        }
        t.push('\n');
        for result in &self.systems {
            let saturation = result.saturation_step();
            let at_common = self.common_rate_pps.and_then(|r| result.step_at(r));
            let dash = || "-".to_owned();
            let _ = write!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                result.system.name(),
                saturation.map_or_else(dash, |s| format!(
                    "{}{:.0}",
                    if result.saturation_is_lower_bound {
                        ">= "
                    } else {
                        ""
                    },
                    s.offered_pps
                )),
                saturation.map_or_else(dash, |s| format!("{:.3}", s.delivered_gbps)),
                saturation.map_or_else(dash, |s| format!(
                    "{:.0} / {:.0} / {:.0}",
                    s.latency_p50_us, s.latency_p99_us, s.latency_p999_us
                )),
                at_common.map_or_else(dash, |s| format!("{:.2}", s.cpu_per_packet_us)),
                at_common.map_or_else(dash, |s| format!("{:.2}", s.relay_cpu_per_packet_us)),
                at_common.map_or_else(dash, |s| format!("{:.0}", s.latency_p99_us)),
                result
                    .churn
                    .as_ref()
                    .map_or_else(dash, |c| format!("{:.0}", c.cycles_per_second)),
            );
            for point in &memory_points {
                let cell = result
                    .memory
                    .iter()
                    .find(|m| m.requested == *point)
                    .map_or_else(dash, |m| {
                        let made = if m.allocations == m.requested {
                            String::new()
                        } else {
                            format!(" ({} made)", m.allocations)
                        };
                        format!(
                            "{:.0} (+{:.0} slab){made}",
                            m.bytes_per_allocation, m.slab_bytes_per_allocation
                        )
                    });
                let _ = write!(t, " {cell} |");
            }
            t.push('\n');
        }
        t.push('\n');
        if let Some(ceiling) = &self.instrument {
            let _ = writeln!(
                t,
                "- the instrument's ceiling (reflector on the edge, bursts of {}): {}{} pps; {}",
                ceiling.burst,
                if ceiling.is_lower_bound { ">= " } else { "" },
                ceiling
                    .ceiling_pps
                    .map_or_else(|| "-".to_owned(), |c| format!("{c:.0}")),
                ceiling.limited_by.describe()
            );
        }
        for result in &self.systems {
            let _ = writeln!(
                t,
                "- {}: {}",
                result.system.name(),
                result.limited_by.describe()
            );
        }
        let verdict = |met: bool| if met { "met" } else { "NOT met" };
        if let Some(memory) = self
            .system(System::RampartUserspace)
            .and_then(|s| s.memory.last())
        {
            let _ = writeln!(
                t,
                "- rampart-userspace resident memory per allocation at {} held: {:.0} bytes \
                 (goal <= {MAX_BYTES_PER_ALLOCATION}: {}); the kernel's slab grew {:.0} bytes \
                 per allocation (machine-wide: the generator's client socket included)",
                memory.allocations,
                memory.bytes_per_allocation,
                verdict(memory.bytes_per_allocation <= MAX_BYTES_PER_ALLOCATION),
                memory.slab_bytes_per_allocation
            );
        }
        if let Some(under) = self
            .system(System::RampartUserspace)
            .and_then(|s| s.under_reports.as_ref())
        {
            let [a, b] = under.p99_without_reports_us;
            let _ = writeln!(
                t,
                "- rampart-userspace p99 at {:.0} pps with {} allocations held: {a:.0} and \
                 {b:.0} µs without reports, {:.0} µs reporting every {} s (goal: within the \
                 spread of the two: {})",
                under.rate_pps,
                under.allocations_held,
                under.p99_with_reports_us,
                under.report_interval_s,
                verdict(under.within_spread())
            );
        }
        if !self.ratios.is_empty() {
            for ratio in &self.ratios {
                let goal = match ratio.goal {
                    Some(goal) if ratio.value >= goal => format!(" (goal >= {goal}: met)"),
                    Some(goal) => format!(" (goal >= {goal}: NOT met)"),
                    None => String::new(),
                };
                let _ = writeln!(t, "- {}: {:.2}x{goal}", ratio.what, ratio.value);
            }
        }
        t
    }

    /// Delivered vs offered rate, and CPU per delivered packet vs offered rate, per system.
    pub fn svg(&self) -> String {
        const W: f64 = 1000.0;
        const H: f64 = 420.0;
        const PANEL: f64 = 400.0;
        const LEFT: f64 = 70.0;
        const TOP: f64 = 40.0;
        const PLOT_H: f64 = 300.0;
        let colours = ["#d62728", "#1f77b4", "#2ca02c"];
        let offered: Vec<f64> = self
            .systems
            .iter()
            .flat_map(|s| s.steps.iter().map(|p| p.offered_pps))
            .filter(|v| *v > 0.0)
            .collect();
        let (lo, hi) = bounds(&offered);
        let cpu: Vec<f64> = self
            .systems
            .iter()
            .flat_map(|s| s.steps.iter().map(|p| p.cpu_per_packet_us))
            .filter(|v| *v > 0.0)
            .collect();
        let (cpu_lo, cpu_hi) = bounds(&cpu);
        let x = |panel: usize, v: f64| {
            LEFT + panel as f64 * (PANEL + 100.0) + log_pos(v, lo, hi) * PANEL
        };
        let y = |v: f64, lo: f64, hi: f64| TOP + PLOT_H - log_pos(v, lo, hi) * PLOT_H;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
             font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
        );
        for (panel, title, axis_lo, axis_hi) in [
            (0, "delivered vs offered (packets/s, log-log)", lo, hi),
            (
                1,
                "CPU µs per delivered packet vs offered (log-log)",
                cpu_lo,
                cpu_hi,
            ),
        ] {
            let x0 = LEFT + panel as f64 * (PANEL + 100.0);
            let _ = writeln!(
                s,
                "<text x=\"{x0}\" y=\"20\" font-weight=\"bold\">{title}</text>\n\
                 <rect x=\"{x0}\" y=\"{TOP}\" width=\"{PANEL}\" height=\"{PLOT_H}\" fill=\"none\" stroke=\"#888\"/>\n\
                 <text x=\"{x0}\" y=\"{}\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
                TOP + PLOT_H + 16.0,
                short(lo),
                x0 + PANEL,
                TOP + PLOT_H + 16.0,
                short(hi),
                x0 - 4.0,
                TOP + PLOT_H,
                short(axis_lo),
                x0 - 4.0,
                TOP + 10.0,
                short(axis_hi),
            );
        }
        // The ideal: everything offered delivered.
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#ccc\" stroke-dasharray=\"4\"/>",
            x(0, lo),
            y(lo, lo, hi),
            x(0, hi),
            y(hi, lo, hi)
        );
        for (index, result) in self.systems.iter().enumerate() {
            let colour = colours[index % colours.len()];
            let points = |value: &dyn Fn(&Step) -> f64, panel: usize, vlo: f64, vhi: f64| {
                result
                    .steps
                    .iter()
                    .filter(|p| p.offered_pps > 0.0 && value(p) > 0.0)
                    .map(|p| {
                        format!(
                            "{:.1},{:.1}",
                            x(panel, p.offered_pps),
                            y(value(p), vlo, vhi)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            for (panel, line) in [
                (0, points(&|p| p.delivered_pps, 0, lo, hi)),
                (1, points(&|p| p.cpu_per_packet_us, 1, cpu_lo, cpu_hi)),
            ] {
                let _ = panel;
                let _ = writeln!(
                    s,
                    "<polyline points=\"{line}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>"
                );
            }
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{}</text>",
                LEFT + index as f64 * 200.0,
                H - 20.0,
                result.system.name()
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// The highest target rate every system delivered with loss < 0.1%.
fn common_rate(systems: &[SystemResult]) -> Option<f64> {
    let first = systems.first()?;
    first
        .steps
        .iter()
        .map(|s| s.target_pps)
        .filter(|rate| {
            systems.iter().all(|system| {
                system
                    .step_at(*rate)
                    .is_some_and(|s| s.loss < LOSS_THRESHOLD && s.delivered > 0)
            })
        })
        .max_by(f64::total_cmp)
}

fn bounds(values: &[f64]) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(0.0, f64::max);
    if !lo.is_finite() || hi <= 0.0 {
        return (1.0, 10.0);
    }
    (lo / 1.5, hi * 1.5)
}

fn log_pos(v: f64, lo: f64, hi: f64) -> f64 {
    ((v.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln()).max(1e-9)).clamp(0.0, 1.0)
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.2}")
    }
}
