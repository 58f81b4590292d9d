//! The load generator's XDP programs in the kernel (`loadgen-ebpf`, embedded by `build.rs`):
//! an [`Injector`] per sending host, run with `BPF_PROG_RUN` in live-frames mode, the
//! [`Counters`] on the receiving hosts' veths, and the [`Reflector`] that stands in for a relay
//! when the instrument measures its own ceiling.
//!
//! Interface names are looked up, and `BPF_PROG_RUN` finds its ingress interface, in the
//! calling thread's network namespace: callers run these inside the host's namespace.

use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{Array, DevMap, DevMapHash, MapData, PerCpuArray};
use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use loadgen_common::{
    COUNT_CONFIG_MAP, COUNT_PROGRAM, CountConfig, FLOW_STATS_MAP, FlowStats, INJECT_CONFIG_MAP,
    INJECT_EGRESS_MAP, INJECT_FLOWS_MAP, INJECT_PROGRAM, INJECT_STATE_MAP, InjectConfig,
    InjectFlow, InjectState, LATENCY_BUCKETS, LATENCY_MAP, MAX_FLOWS, REFLECT_EGRESS_MAP,
    REFLECT_PROGRAM, STAMP_LEN,
};

/// The object built by `build.rs`; empty when built with `AYA_BUILD_SKIP=1`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loadgen-xdp"));

/// Frames the kernel runs and sends per batch before it flushes them to the wire
/// (`batch_size`; the kernel's default and largest useful value is 64): the injector's burst.
pub const BATCH: u32 = 64;

fn load() -> Result<Ebpf> {
    ensure!(
        !OBJECT.is_empty(),
        "rampart-loadgen was built with AYA_BUILD_SKIP=1, without its XDP programs"
    );
    EbpfLoader::new()
        .load(OBJECT)
        .context("loading the load generator's XDP object (needs root)")
}

/// A fresh copy of the object with the program `name` loaded (through the verifier).
fn load_program(name: &str) -> Result<Ebpf> {
    let mut ebpf = load()?;
    xdp(&mut ebpf, name)?
        .load()
        .with_context(|| format!("{name} did not pass the verifier"))?;
    Ok(ebpf)
}

/// Attaches `name` to `interface` in native mode (in the calling thread's namespace); the
/// link lives as long as `ebpf`.
fn attach_program(ebpf: &mut Ebpf, name: &str, interface: &str) -> Result<()> {
    xdp(ebpf, name)?
        .attach(interface, XdpMode::Driver)
        .with_context(|| format!("attaching {name} to {interface}"))?;
    Ok(())
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name} in the object"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))?;
    Ok(program)
}

fn array<'a, T: aya::Pod>(ebpf: &'a mut Ebpf, name: &str) -> Result<Array<&'a mut MapData, T>> {
    Array::try_from(
        ebpf.map_mut(name)
            .with_context(|| format!("no map {name} in the object"))?,
    )
    .with_context(|| format!("map {name}"))
}

/// The injector for both sending hosts: one copy of the object, a frame template of the
/// flows' size, the interface the frames are run as arriving on, and the two it sends out of.
pub struct Injector {
    ebpf: Ebpf,
    template: Vec<u8>,
    ingress: u32,
    flows: u32,
}

impl Injector {
    /// An injector for `flows`, each a ChannelData flow from a client to the TURN server and
    /// a plain UDP flow from the peer to the relay ([`Injector::set_egress`] says out of which
    /// interfaces), carrying `payload_len` media bytes.
    pub fn new(flows: &[[InjectFlow; 2]], payload_len: usize) -> Result<Injector> {
        ensure!(!flows.is_empty(), "no flows to inject");
        ensure!(
            flows.len() <= MAX_FLOWS as usize,
            "at most {MAX_FLOWS} flows can be injected"
        );
        ensure!(
            (STAMP_LEN..=1400).contains(&payload_len),
            "payload of {payload_len} bytes: between {STAMP_LEN} and 1400"
        );
        let mut ebpf = load_program(INJECT_PROGRAM)?;
        let mut addressing = array::<InjectFlow>(&mut ebpf, INJECT_FLOWS_MAP)?;
        for (index, pair) in flows.iter().enumerate() {
            for (direction, flow) in pair.iter().enumerate() {
                addressing.set((index * 2 + direction) as u32, flow, 0)?;
            }
        }
        // Ethernet, IPv4, UDP, the ChannelData header, the payload: all zero.
        let template = vec![0u8; 14 + 20 + 8 + 4 + payload_len];
        let mut config = array::<InjectConfig>(&mut ebpf, INJECT_CONFIG_MAP)?;
        config.set(
            0,
            InjectConfig {
                flows: flows.len() as u32,
                step: 0,
                payload_len: payload_len as u32,
                burst: BATCH,
                interval_ns: 0,
            },
            0,
        )?;
        Ok(Injector {
            ebpf,
            template,
            ingress: 0,
            flows: flows.len() as u32,
        })
    }

    /// Frames of `direction` leave out of `interface` (a name in the calling thread's
    /// namespace, which may differ from the injecting thread's).
    pub fn set_egress(&mut self, direction: u8, interface: &str) -> Result<()> {
        let ifindex = ifindex(interface)?;
        let mut egress = DevMap::try_from(
            self.ebpf
                .map_mut(INJECT_EGRESS_MAP)
                .context("no injector devmap")?,
        )?;
        egress
            .set(u32::from(direction), ifindex, None, 0)
            .with_context(|| format!("adding {interface} to the injector's devmap"))?;
        Ok(())
    }

    /// The frames are run as arriving on `interface` (in the namespace of the thread that
    /// will inject).
    pub fn set_ingress(&mut self, interface: &str) -> Result<()> {
        self.ingress = ifindex(interface)?;
        Ok(())
    }

    /// Starts `step`: frames carry it, go out at `rate` per second (None: one per run), and
    /// the count of stamped frames starts from 0.
    pub fn start_step(&mut self, step: u32, rate: Option<f64>) -> Result<()> {
        let mut config = array::<InjectConfig>(&mut self.ebpf, INJECT_CONFIG_MAP)?;
        let mut current = config.get(&0, 0)?;
        current.step = step;
        current.interval_ns = rate
            .filter(|r| *r > 0.0)
            .map_or(0, |r| ((1e9 / r) as u64).max(1));
        config.set(0, current, 0)?;
        array::<InjectState>(&mut self.ebpf, INJECT_STATE_MAP)?.set(
            0,
            InjectState::default(),
            0,
        )?;
        Ok(())
    }

    /// Frames stamped (and handed to the interface) since the step started.
    pub fn stamped(&mut self) -> Result<u64> {
        Ok(array::<InjectState>(&mut self.ebpf, INJECT_STATE_MAP)?
            .get(&0, 0)?
            .stamped)
    }

    pub fn flows(&self) -> u32 {
        self.flows
    }

    /// Runs the injector `runs` times now, from the calling thread (which must be in the
    /// interface's network namespace): without a rate, a frame per run, in bursts of
    /// [`BATCH`].
    pub fn inject(&self, runs: u32) -> Result<()> {
        match self.run(runs.max(1)) {
            Ok(()) => Ok(()),
            Err(e) => Err(e).context("BPF_PROG_RUN in live-frames mode"),
        }
    }

    /// Runs the injector until the calling thread gets a signal (the kernel checks between
    /// batches and ends the call with EINTR): with a rate, one long call for a whole step.
    pub fn inject_until_signalled(&self) -> Result<()> {
        match self.run(u32::MAX) {
            Ok(()) => Ok(()),
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(nix::libc::EINTR) =>
            {
                Ok(())
            }
            Err(e) => Err(e).context("BPF_PROG_RUN in live-frames mode"),
        }
    }

    fn run(&self, repeat: u32) -> Result<(), aya::programs::ProgramError> {
        let program: &Xdp = self
            .ebpf
            .program(INJECT_PROGRAM)
            .ok_or(aya::programs::ProgramError::NotLoaded)?
            .try_into()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex; live mode wants data = data_meta = 0 and data_end = the length.
        let fields = [0, self.template.len() as u32, 0, self.ingress, 0, 0];
        let ctx: Vec<u8> = fields.iter().flat_map(|f| f.to_ne_bytes()).collect();
        program
            .test_run(TestRunOptions {
                data_in: Some(&self.template),
                ctx_in: Some(&ctx),
                repeat,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..TestRunOptions::default()
            })
            .map(|_| ())
    }
}

/// The counting program, attached to every receiving interface, with the counts of one step.
pub struct Counters {
    ebpf: Ebpf,
}

/// What the counters saw of one step.
pub struct Counted {
    /// Per flow and direction (`flow * 2 + direction`).
    pub flows: Vec<FlowStats>,
    /// Latency histogram: frames per [`loadgen_common::latency_bucket`].
    pub latency: Vec<u64>,
}

impl Counters {
    pub fn load() -> Result<Counters> {
        Ok(Counters {
            ebpf: load_program(COUNT_PROGRAM)?,
        })
    }

    /// Attaches to `interface` in native mode (in the calling thread's namespace). The link
    /// lives as long as this value.
    pub fn attach(&mut self, interface: &str) -> Result<()> {
        attach_program(&mut self.ebpf, COUNT_PROGRAM, interface)
    }

    /// Counts `step` from zero, for `flows` flows per direction.
    pub fn start_step(&mut self, step: u32, flows: u32) -> Result<()> {
        // Stop counting first, so no frame of the old step lands in the zeroed counts.
        array::<CountConfig>(&mut self.ebpf, COUNT_CONFIG_MAP)?.set(
            0,
            CountConfig { step: 0, flows: 0 },
            0,
        )?;
        let mut stats = array::<FlowStats>(&mut self.ebpf, FLOW_STATS_MAP)?;
        for index in 0..flows * 2 {
            stats.set(index, FlowStats::default(), 0)?;
        }
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let mut latency = PerCpuArray::<_, u64>::try_from(
            self.ebpf.map_mut(LATENCY_MAP).context("no latency map")?,
        )?;
        for bucket in 0..LATENCY_BUCKETS {
            latency.set(
                bucket,
                aya::maps::PerCpuValues::try_from(vec![0u64; cpus])?,
                0,
            )?;
        }
        array::<CountConfig>(&mut self.ebpf, COUNT_CONFIG_MAP)?.set(
            0,
            CountConfig { step, flows },
            0,
        )?;
        Ok(())
    }

    pub fn read(&mut self, flows: u32) -> Result<Counted> {
        let stats = array::<FlowStats>(&mut self.ebpf, FLOW_STATS_MAP)?;
        let flows = (0..flows * 2)
            .map(|index| stats.get(&index, 0))
            .collect::<Result<Vec<_>, _>>()?;
        let latency_map =
            PerCpuArray::<_, u64>::try_from(self.ebpf.map(LATENCY_MAP).context("no latency map")?)?;
        let latency = (0..LATENCY_BUCKETS)
            .map(|bucket| latency_map.get(&bucket, 0).map(|v| v.iter().sum()))
            .collect::<Result<Vec<u64>, _>>()?;
        Ok(Counted { flows, latency })
    }
}

/// The trivial stand-in for a relay: sends stamped frames from each of two interfaces on out of
/// the other.
pub struct Reflector {
    ebpf: Ebpf,
}

impl Reflector {
    pub fn load() -> Result<Reflector> {
        Ok(Reflector {
            ebpf: load_program(REFLECT_PROGRAM)?,
        })
    }

    /// Attaches to `a` and `b` (in the calling thread's namespace), each sending on out of
    /// the other.
    pub fn attach_pair(&mut self, a: &str, b: &str) -> Result<()> {
        let (a_index, b_index) = (ifindex(a)?, ifindex(b)?);
        let mut egress = DevMapHash::try_from(
            self.ebpf
                .map_mut(REFLECT_EGRESS_MAP)
                .context("no reflector devmap")?,
        )?;
        egress.insert(a_index, b_index, None, 0)?;
        egress.insert(b_index, a_index, None, 0)?;
        attach_program(&mut self.ebpf, REFLECT_PROGRAM, a)?;
        attach_program(&mut self.ebpf, REFLECT_PROGRAM, b)
    }
}

fn ifindex(interface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(interface)?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { nix::libc::if_nametoindex(name.as_ptr()) } {
        0 => bail!("no interface {interface} in this network namespace"),
        index => Ok(index),
    }
}

/// Whether a failure (its whole chain, as text) is the kernel refusing the injector's
/// `BPF_PROG_RUN` in live-frames mode (EPERM): some kernels do, for root too (seen on a 6.18
/// Firecracker guest whose root lacks CAP_SYS_RESOURCE), and then no load can be injected.
pub fn injector_refused(failure: &str) -> bool {
    failure.contains("live-frames mode") && failure.contains("Operation not permitted")
}
