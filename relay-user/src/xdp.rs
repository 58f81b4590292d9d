//! Loader for Rampart's XDP program (the `relay-ebpf` crate).
//!
//! `build.rs` builds the program for `bpfel-unknown-none` and the object is embedded in the
//! agent, so the agent binary is self-contained. [`XdpProgram::load`] hands it to the kernel
//! (which runs the verifier), [`XdpProgram::attach`] hooks it on an interface, and
//! [`XdpProgram::counter`] reads what it counted. Dropping the [`XdpProgram`] detaches it from
//! every interface and unloads it.
//!
//! Needs root, or `CAP_BPF` + `CAP_NET_ADMIN` (+ `CAP_PERFMON` for some helpers).

pub use aya::programs::XdpMode;
use aya::{
    Ebpf,
    maps::{MapError, PerCpuArray},
    programs::{ProgramError, Xdp, xdp::XdpLinkId},
};
pub use relay_common::{Counter, Stat};
use relay_common::{PROGRAM_NAME, STATS_MAP};

/// The object built by `build.rs`. Empty when the build was made with `AYA_BUILD_SKIP=1`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rampart-xdp"));

/// Why the XDP fast path could not be set up or read. Each variant says what to check.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error(
        "this agent was built with AYA_BUILD_SKIP=1, without the XDP program; \
         rebuild after `cargo xtask setup` to get the fast path"
    )]
    NotBuilt,
    #[error(
        "loading the XDP object into the kernel failed (it needs root, or CAP_BPF and CAP_NET_ADMIN)"
    )]
    Load(#[source] aya::EbpfError),
    #[error(
        "the XDP object has no program named {PROGRAM_NAME}; relay-ebpf and relay-common disagree"
    )]
    ProgramMissing,
    #[error("the XDP object has no map named {0}; relay-ebpf and relay-common disagree")]
    MapMissing(&'static str),
    #[error("{PROGRAM_NAME} did not pass the kernel verifier or could not be loaded")]
    Verify(#[source] ProgramError),
    #[error(
        "attaching XDP to interface {interface} in mode {mode:?} failed (does the interface exist \
         in this network namespace? does its driver support that mode? loopback, bridges and \
         most virtual devices only support Skb)"
    )]
    Attach {
        interface: String,
        mode: XdpMode,
        #[source]
        source: ProgramError,
    },
    #[error("XDP is not attached to interface {0}")]
    NotAttached(String),
    #[error("detaching XDP from interface {interface} failed")]
    Detach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("reading map {map} failed")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// The XDP program, loaded in the kernel, and the interfaces it is attached to.
pub struct XdpProgram {
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId)>,
}

impl std::fmt::Debug for XdpProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let interfaces: Vec<&str> = self.links.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("XdpProgram")
            .field("program", &PROGRAM_NAME)
            .field("attached_to", &interfaces)
            .finish()
    }
}

impl XdpProgram {
    /// Loads the embedded object: creates its maps and runs the program through the verifier.
    /// Nothing is attached yet.
    pub fn load() -> Result<Self, XdpError> {
        if OBJECT.is_empty() {
            return Err(XdpError::NotBuilt);
        }
        let mut ebpf = Ebpf::load(OBJECT).map_err(XdpError::Load)?;
        program(&mut ebpf)?.load().map_err(XdpError::Verify)?;
        Ok(Self {
            ebpf,
            links: Vec::new(),
        })
    }

    /// Attaches the program to `interface` (a name in the calling thread's network namespace).
    ///
    /// `XdpMode::Skb` (generic XDP) works on every device; `XdpMode::Driver` needs driver
    /// support (veth, most physical NICs) and is where the fast path is fast.
    /// Attaching to an interface the program is already attached to does nothing.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), XdpError> {
        if self.is_attached(interface) {
            return Ok(());
        }
        let link = program(&mut self.ebpf)?
            .attach(interface, mode)
            .map_err(|source| XdpError::Attach {
                interface: interface.to_owned(),
                mode,
                source,
            })?;
        self.links.push((interface.to_owned(), link));
        Ok(())
    }

    /// Detaches the program from `interface`; the program stays loaded and its counters keep
    /// their values.
    pub fn detach(&mut self, interface: &str) -> Result<(), XdpError> {
        let position = self
            .links
            .iter()
            .position(|(name, _)| name == interface)
            .ok_or_else(|| XdpError::NotAttached(interface.to_owned()))?;
        let (interface, link) = self.links.swap_remove(position);
        program(&mut self.ebpf)?
            .detach(link)
            .map_err(|source| XdpError::Detach { interface, source })
    }

    /// Whether [`XdpProgram::attach`] succeeded on `interface` and it was not detached since.
    pub fn is_attached(&self, interface: &str) -> bool {
        self.links.iter().any(|(name, _)| name == interface)
    }

    /// The count for `stat`, summed over all CPUs.
    pub fn counter(&self, stat: Stat) -> Result<Counter, XdpError> {
        let map = self
            .ebpf
            .map(STATS_MAP)
            .ok_or(XdpError::MapMissing(STATS_MAP))?;
        let stats = PerCpuArray::<_, Counter>::try_from(map).map_err(|source| XdpError::Map {
            map: STATS_MAP,
            source,
        })?;
        let per_cpu = stats
            .get(&stat.index(), 0)
            .map_err(|source| XdpError::Map {
                map: STATS_MAP,
                source,
            })?;
        Ok(per_cpu.iter().fold(Counter::default(), |sum, cpu| Counter {
            packets: sum.packets.wrapping_add(cpu.packets),
            bytes: sum.bytes.wrapping_add(cpu.bytes),
        }))
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or(XdpError::ProgramMissing)?
        .try_into()
        .map_err(|_: ProgramError| XdpError::ProgramMissing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_object_is_a_bpf_elf() {
        if OBJECT.is_empty() {
            eprintln!("SKIP: built with AYA_BUILD_SKIP=1, no XDP object embedded");
            return;
        }
        assert_eq!(&OBJECT[..4], b"\x7fELF", "not an ELF file");
        // e_machine (offset 18, little endian) = EM_BPF (247).
        assert_eq!(
            u16::from_le_bytes([OBJECT[18], OBJECT[19]]),
            247,
            "not a BPF object"
        );
    }
}
