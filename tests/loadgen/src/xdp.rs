//! The load generator's XDP programs in the kernel (`loadgen-ebpf`, embedded by `build.rs`):
//! an [`Injector`] per sending host, run with `BPF_PROG_RUN` in live-frames mode, the
//! [`Counters`] on the receiving hosts' veths, and the [`Reflector`] that stands in for a relay
//! when the instrument measures its own ceiling.
//!
//! Interface names are looked up, and `BPF_PROG_RUN` finds its ingress interface, in the
//! calling thread's network namespace: callers run these inside the host's namespace.

use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use loadgen_common::{
    COUNT_CONFIG_MAP, COUNT_PROGRAM, CountConfig, FLOW_STATS_MAP, FlowStats, INJECT_CONFIG_MAP,
    INJECT_FLOWS_MAP, INJECT_PROGRAM, INJECT_STATE_MAP, InjectConfig, InjectFlow, InjectState,
    LATENCY_BUCKETS, LATENCY_MAP, MAX_FLOWS, REFLECT_PROGRAM, STAMP_LEN, TO_PEER,
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

/// One sending host's injector: its own copy of the object (its own configuration and
/// count), a frame template of the flows' size, and the interface the frames leave from.
pub struct Injector {
    ebpf: Ebpf,
    template: Vec<u8>,
    ifindex: u32,
    flows: u32,
}

impl Injector {
    /// An injector sending `direction` frames (ChannelData to the TURN server for
    /// [`TO_PEER`], plain UDP to the relay otherwise) of `payload_len` media bytes to `flows`
    /// in turn, out of `interface`.
    pub fn new(
        interface: &str,
        direction: u8,
        flows: &[InjectFlow],
        payload_len: usize,
    ) -> Result<Injector> {
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
        for (index, flow) in flows.iter().enumerate() {
            addressing.set(index as u32, flow, 0)?;
        }
        let channel_header = if direction == TO_PEER { 4 } else { 0 };
        // Ethernet, IPv4, UDP, the ChannelData header, the payload: all zero but the
        // payload's tail (a recognisable pattern), which the program never writes.
        let head = 14 + 20 + 8 + channel_header;
        let mut template = vec![0u8; head + payload_len];
        for (i, byte) in template[head + STAMP_LEN..].iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
        let tail_sum = ones_complement_sum(&template[head + STAMP_LEN..]);
        let mut config = array::<InjectConfig>(&mut ebpf, INJECT_CONFIG_MAP)?;
        config.set(
            0,
            InjectConfig {
                flows: flows.len() as u32,
                step: 0,
                direction: u32::from(direction),
                payload_len: payload_len as u32,
                tail_sum,
                _pad: 0,
            },
            0,
        )?;
        Ok(Injector {
            ebpf,
            template,
            ifindex: ifindex(interface)?,
            flows: flows.len() as u32,
        })
    }

    /// Starts `step`: frames carry it, and the count of stamped frames starts from 0.
    pub fn start_step(&mut self, step: u32) -> Result<()> {
        let mut config = array::<InjectConfig>(&mut self.ebpf, INJECT_CONFIG_MAP)?;
        let mut current = config.get(&0, 0)?;
        current.step = step;
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

    /// Sends `frames` frames now, in bursts of [`BATCH`], from the calling thread (which must
    /// be in the interface's network namespace).
    pub fn inject(&self, frames: u32) -> Result<()> {
        let program: &Xdp = self
            .ebpf
            .program(INJECT_PROGRAM)
            .context("no injector")?
            .try_into()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex; live mode wants data = data_meta = 0 and data_end = the length.
        let fields = [0, self.template.len() as u32, 0, self.ifindex, 0, 0];
        let ctx: Vec<u8> = fields.iter().flat_map(|f| f.to_ne_bytes()).collect();
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&self.template),
                ctx_in: Some(&ctx),
                repeat: frames.max(1),
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_RUN in live-frames mode")?;
        if result.return_value != 0 {
            bail!("the injector returned {}", result.return_value);
        }
        Ok(())
    }
}

/// RFC 1071 sum of `bytes` from an even offset, unfolded (fits: a frame is short).
fn ones_complement_sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
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

/// The trivial stand-in for a relay: bounces stamped frames back where they came from.
pub struct Reflector {
    ebpf: Ebpf,
}

impl Reflector {
    pub fn load() -> Result<Reflector> {
        Ok(Reflector {
            ebpf: load_program(REFLECT_PROGRAM)?,
        })
    }

    pub fn attach(&mut self, interface: &str) -> Result<()> {
        attach_program(&mut self.ebpf, REFLECT_PROGRAM, interface)
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
