//! Drives the XDP program's maps from the state machine's fast-path events: a channel the
//! core says is usable is written to the kernel with its expiry, and removed when the core
//! withdraws it. The userspace path stays complete underneath: whatever the kernel does not
//! forward (a full map, an unresolved neighbour, no BPF at all) reaches the agent as before.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use relay_common::{ChannelCounters, PIN_LAYOUT_VERSION};

use tracing::{debug, info, warn};

use crate::config::{XdpMode, XdpSettings};
use crate::turn::allocation::{FastPathChannel, FastPathEvent, RelayedBytes};
use crate::turn::{FiveTuple, Transport};
use crate::xdp::{self, Attached, ChannelBinding, MapSizes, XdpError, XdpProgram};

/// Counters of the fast path's bookkeeping (what the kernel forwarded is in its own maps).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FastPathStats {
    pub channels_installed: u64,
    pub channels_removed: u64,
    /// Channels left to userspace because the kernel maps were full.
    pub map_full: u64,
    pub map_errors: u64,
    /// Channels a previous agent left in the pinned maps, forwarded until their recorded
    /// expiry and then removed.
    pub channels_adopted: u64,
    /// Entries left behind expired, or half-written, and removed at start-up.
    pub stale_removed: u64,
}

pub struct FastPath {
    program: XdpProgram,
    max_channels: usize,
    bound: HashMap<(FiveTuple, u16), ChannelBinding>,
    /// Bound channels this agent's state machine does not know (adopted at start-up).
    adopted: HashSet<(FiveTuple, u16)>,
    next_counter_id: u32,
    full_reported: bool,
    stats: FastPathStats,
}

impl FastPath {
    /// Load the program and attach it to every configured interface. In `auto` mode a
    /// failure is reported once, clearly, and the agent relays in userspace (`Ok(None)`); in
    /// `native` or `generic` mode it is an error.
    pub fn start(settings: &XdpSettings) -> Result<Option<Self>, XdpError> {
        match Self::try_start(settings) {
            Ok(fast_path) => Ok(Some(fast_path)),
            Err(error) if settings.mode == XdpMode::Auto => {
                warn!(
                    error = %error_chain(&error),
                    "XDP fast path unavailable: relaying every packet in userspace"
                );
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    fn try_start(settings: &XdpSettings) -> Result<Self, XdpError> {
        let pins = settings.pin_path.join(PIN_LAYOUT_VERSION);
        let mut program = XdpProgram::load_pinned(
            MapSizes {
                channels: settings.max_channels,
                ..MapSizes::default()
            },
            &pins,
        )?;
        for interface in &settings.interfaces {
            let mode = match settings.mode {
                XdpMode::Generic => xdp::XdpMode::Skb,
                _ => xdp::XdpMode::Driver,
            };
            let attached = match program.attach_pinned(interface, mode, &pins) {
                Err(error) if settings.mode == XdpMode::Auto => {
                    debug!(interface, error = %error_chain(&error), "native XDP refused, trying generic");
                    program
                        .attach_pinned(interface, xdp::XdpMode::Skb, &pins)
                        .map(|a| (a, "generic"))
                }
                other => other.map(|a| {
                    (
                        a,
                        if mode == xdp::XdpMode::Skb {
                            "generic"
                        } else {
                            "native"
                        },
                    )
                }),
            }?;
            program.add_egress_interface(interface)?;
            match attached {
                (Attached::New, mode) => {
                    info!(interface, mode, pins = %pins.display(), "XDP fast path attached")
                }
                (Attached::Adopted, _) => info!(
                    interface,
                    pins = %pins.display(),
                    "XDP fast path: took over the pinned link of a previous agent"
                ),
            }
            warn_if_not_forwarding(interface);
        }
        let mut fast_path = FastPath {
            program,
            max_channels: settings.max_channels as usize,
            bound: HashMap::new(),
            adopted: HashSet::new(),
            next_counter_id: 0,
            full_reported: false,
            stats: FastPathStats::default(),
        };
        fast_path.reconcile()?;
        Ok(fast_path)
    }

    /// Bring the pinned maps a previous agent left in line with this one: its state machine
    /// starts empty, so expired channels are removed now, live ones keep forwarding (media
    /// does not stop for a restart) and are removed at their recorded expiry, and
    /// half-written entries are removed.
    fn reconcile(&mut self) -> Result<(), XdpError> {
        let now_ns = xdp::monotonic_now_ns();
        for binding in self.program.channel_bindings()? {
            self.next_counter_id = self.next_counter_id.max(binding.counter_id);
            if binding.expires_ns <= now_ns {
                self.program.unbind_channel(&binding)?;
                self.stats.stale_removed += 1;
                continue;
            }
            let key = (
                FiveTuple {
                    transport: Transport::Udp,
                    client: binding.client,
                    server: binding.server,
                },
                binding.channel,
            );
            self.bound.insert(key, binding);
            self.adopted.insert(key);
            self.stats.channels_adopted += 1;
        }
        self.stats.stale_removed += self.program.remove_orphans()? as u64;
        if self.stats.channels_adopted + self.stats.stale_removed > 0 {
            info!(
                adopted = self.stats.channels_adopted,
                removed = self.stats.stale_removed,
                "XDP maps reconciled with a previous agent's: adopted channels forward until their recorded expiry"
            );
        }
        Ok(())
    }

    /// Remove adopted channels whose recorded expiry has passed (the kernel already stopped
    /// using them; this frees their entries).
    pub fn sweep(&mut self) {
        if self.adopted.is_empty() {
            return;
        }
        let now_ns = xdp::monotonic_now_ns();
        let expired: Vec<_> = self
            .adopted
            .iter()
            .filter(|key| self.bound.get(key).is_none_or(|b| b.expires_ns <= now_ns))
            .copied()
            .collect();
        for key in expired {
            self.adopted.remove(&key);
            if let Some(binding) = self.bound.remove(&key) {
                self.unbind(&binding);
            }
        }
    }

    pub fn stats(&self) -> FastPathStats {
        self.stats
    }

    pub fn program(&self) -> &XdpProgram {
        &self.program
    }

    /// Applies the core's changes; returns what the kernel had forwarded on each channel it
    /// withdrew, for the allocation's totals.
    pub fn apply(
        &mut self,
        events: Vec<FastPathEvent>,
        now: Instant,
    ) -> Vec<(FiveTuple, RelayedBytes)> {
        let mut withdrawn = Vec::new();
        for event in events {
            match event {
                FastPathEvent::Up(channel) => self.install(&channel, now),
                FastPathEvent::Down(channel) => {
                    if let Some(counters) = self.remove(&channel) {
                        withdrawn.push((channel.five_tuple, relayed_bytes(counters)));
                    }
                }
            }
        }
        withdrawn
    }

    /// What the kernel has forwarded so far on the channels it forwards now, per allocation
    /// (one map lookup per channel).
    pub fn forwarded_bytes(&self) -> HashMap<FiveTuple, RelayedBytes> {
        let mut totals: HashMap<FiveTuple, RelayedBytes> = HashMap::new();
        for ((five_tuple, _), binding) in &self.bound {
            if let Ok(counters) = self.program.channel_counters(binding.counter_id) {
                let bytes = relayed_bytes(counters);
                let total = totals.entry(*five_tuple).or_default();
                total.from_client += bytes.from_client;
                total.to_client += bytes.to_client;
            }
        }
        totals
    }

    fn install(&mut self, channel: &FastPathChannel, now: Instant) {
        let key = (channel.five_tuple, channel.channel);
        let counter_id = match self.bound.get(&key) {
            Some(existing) => existing.counter_id,
            None if self.bound.len() >= self.max_channels => {
                self.map_full(channel);
                return;
            }
            None => {
                self.next_counter_id = self.next_counter_id.wrapping_add(1);
                self.next_counter_id
            }
        };
        // Instant and bpf_ktime_get_ns are both CLOCK_MONOTONIC.
        let remaining = channel.expires.saturating_duration_since(now);
        let binding = ChannelBinding {
            client: channel.five_tuple.client,
            server: channel.five_tuple.server,
            relay: channel.relay,
            peer: channel.peer,
            channel: channel.channel,
            counter_id,
            expires_ns: xdp::monotonic_now_ns()
                .saturating_add(u64::try_from(remaining.as_nanos()).unwrap_or(u64::MAX)),
        };
        match self.program.bind_channel(&binding) {
            Ok(()) => {
                self.adopted.remove(&key);
                if self.bound.insert(key, binding).is_none() {
                    self.stats.channels_installed += 1;
                    debug!(client = %binding.client, channel = binding.channel, peer = %binding.peer, "channel forwarded in the kernel");
                }
            }
            Err(error) => {
                self.stats.map_errors += 1;
                warn!(client = %binding.client, channel = binding.channel, error = %error_chain(&error), "channel left to userspace: kernel map update failed");
            }
        }
    }

    fn map_full(&mut self, channel: &FastPathChannel) {
        self.stats.map_full += 1;
        if !self.full_reported {
            self.full_reported = true;
            warn!(
                max_channels = self.max_channels,
                client = %channel.five_tuple.client,
                "XDP channel maps full: further channels are relayed in userspace (raise xdp.max_channels)"
            );
        }
    }

    fn remove(&mut self, channel: &FastPathChannel) -> Option<ChannelCounters> {
        let binding = self.bound.remove(&(channel.five_tuple, channel.channel))?;
        self.unbind(&binding)
    }

    /// Removes a channel from the kernel; its last counters when they could be read.
    fn unbind(&mut self, binding: &ChannelBinding) -> Option<ChannelCounters> {
        if self.bound.len() < self.max_channels {
            self.full_reported = false;
        }
        match self.program.unbind_channel(binding) {
            Ok(counters) => {
                self.stats.channels_removed += 1;
                debug!(client = %binding.client, channel = binding.channel, ?counters, "channel removed from the kernel");
                Some(counters)
            }
            Err(error) => {
                self.stats.map_errors += 1;
                warn!(client = %binding.client, channel = binding.channel, error = %error_chain(&error), "removing a channel from the kernel failed");
                None
            }
        }
    }
}

fn relayed_bytes(counters: ChannelCounters) -> RelayedBytes {
    RelayedBytes {
        from_client: counters.to_peer_bytes,
        to_client: counters.to_client_bytes,
    }
}

/// The kernel's FIB lookup (which the program uses to route rewritten frames) refuses on an
/// interface that does not forward; everything then goes to userspace, slowly but correctly.
fn warn_if_not_forwarding(interface: &str) {
    for family in ["ipv4", "ipv6"] {
        let path = format!("/proc/sys/net/{family}/conf/{interface}/forwarding");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
            warn!(
                interface,
                "{family} forwarding is off on {interface}: the XDP fast path cannot route {family} frames \
                 arriving there and leaves them to userspace. Enable it (sysctl -w \
                 net.{family}.conf.{interface}.forwarding=1) and keep the host from routing itself \
                 with a firewall forward policy of drop"
            );
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
