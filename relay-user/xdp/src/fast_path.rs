//! Drives the XDP program's maps from the state machine's fast-path events: a channel the
//! core says is usable is written to the kernel with its expiry and the next hop of each
//! direction, and removed when the core withdraws it. The next hops come from the next-hop
//! cache (`crate::next_hop`), fed by netlink (`crate::netlink`); when one changes, every
//! binding that uses it is rewritten. The userspace path stays complete underneath: whatever
//! the kernel does not forward (a full map, an unresolved neighbour, no BPF at all) reaches
//! the agent as before.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use relay_common::{ChannelCounters, PIN_LAYOUT_VERSION};
use serde::Deserialize;

use tracing::{debug, info, warn};

use crate::netlink::{Announcement, Announcements, Netlink};
use crate::next_hop::{Input, NextHopCache, NextHopStats, Output, RouteKey};
use crate::{
    Attached, ChannelBinding, Limit, MapSizes, NextHop, TotalDirection, XdpError, XdpProgram,
};
use rampart_turn::allocation::{FastPathChannel, FastPathEvent, RelayedBytes};
use rampart_turn::{FiveTuple, Transport};

/// How the XDP fast path is attached.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No fast path: every packet is relayed in userspace.
    Off,
    /// Native (driver) mode where the interface supports it, generic mode otherwise, and
    /// userspace only when BPF is unavailable (not root, old kernel), said once in the log.
    Auto,
    /// Native mode or refuse to start.
    Native,
    /// Generic (SKB) mode or refuse to start.
    Generic,
}

/// The fast path's settings, when it is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    pub interfaces: Vec<String>,
    pub max_channels: u32,
    /// bpffs directory where maps and links are pinned (a versioned subdirectory of it).
    pub pin_path: PathBuf,
    /// Resolve every bound channel's next hops over netlink and keep them in the bindings
    /// (the program then does no FIB lookup per packet); off: every frame takes
    /// `bpf_fib_lookup`.
    pub cache_next_hops: bool,
    /// A total bandwidth limit is configured: the program polices each CPU's share of it
    /// ([`FastPath::total_demand`], [`FastPath::set_total_shares`]).
    pub police_total: bool,
}

/// A bound channel: the allocation's 5-tuple and the channel number.
type ChannelKey = (FiveTuple, u16);

/// Counters of the fast path's bookkeeping (what the kernel forwarded is in its own maps).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FastPathStats {
    pub channels_installed: u64,
    pub channels_removed: u64,
    /// Channels left to userspace because the kernel maps were full.
    pub map_full: u64,
    /// Channels of limited allocations left to userspace because every bandwidth budget of
    /// the program was taken.
    pub budgets_full: u64,
    pub map_errors: u64,
    /// Channels a previous agent left in the pinned maps, forwarded until their recorded
    /// expiry and then removed.
    pub channels_adopted: u64,
    /// Entries left behind expired, or half-written, and removed at start-up.
    pub stale_removed: u64,
    /// Bindings rewritten because a next hop they carry changed.
    pub next_hop_rewrites: u64,
    pub next_hops: NextHopStats,
}

pub struct FastPath {
    program: XdpProgram,
    max_channels: usize,
    bound: HashMap<ChannelKey, ChannelBinding>,
    /// Bound channels this agent's state machine does not know (adopted at start-up).
    adopted: HashSet<ChannelKey>,
    /// Counter slots no binding holds.
    free_counters: Vec<u32>,
    /// The budget slot and generation of each limited allocation with channels in the
    /// kernel, and how many of its channels use it: an allocation's channels share one
    /// budget, as they share one limit in userspace.
    budgets: HashMap<FiveTuple, (u32, u32, usize)>,
    /// Budget slots no allocation holds.
    free_budgets: Vec<u32>,
    /// The generation the next allocation given a slot gets (never 0, a slot's initial one).
    next_generation: u32,
    next_hops: NextHopCache,
    /// `None` when no rtnetlink socket could be opened: nothing is cached then, and every
    /// frame takes the program's FIB lookup.
    netlink: Option<Netlink>,
    /// Handed to the server's announcement reader once.
    announcements: Option<Announcements>,
    /// Which bindings use each route.
    route_users: HashMap<RouteKey, HashSet<ChannelKey>>,
    full_reported: bool,
    stats: FastPathStats,
    /// Each CPU's offered bytes on the total, per direction, as last read.
    total_offered: [Vec<u64>; 2],
}

impl FastPath {
    /// Load the program and attach it to every configured interface. In `auto` mode a
    /// failure is reported once, clearly, and the agent relays in userspace (`Ok(None)`); in
    /// `native` or `generic` mode it is an error.
    pub fn start(settings: &Settings) -> Result<Option<Self>, XdpError> {
        match Self::try_start(settings) {
            Ok(fast_path) => Ok(Some(fast_path)),
            Err(error) if settings.mode == Mode::Auto => {
                warn!(
                    error = %error_chain(&error),
                    "XDP fast path unavailable: relaying every packet in userspace"
                );
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    fn try_start(settings: &Settings) -> Result<Self, XdpError> {
        let pins = settings.pin_path.join(PIN_LAYOUT_VERSION);
        let mut program = XdpProgram::load_pinned(
            MapSizes {
                channels: settings.max_channels,
                ..MapSizes::default()
            },
            &pins,
            settings.police_total,
        )?;
        let mut egress = Vec::new();
        for interface in &settings.interfaces {
            let mode = match settings.mode {
                Mode::Generic => crate::XdpMode::Skb,
                _ => crate::XdpMode::Driver,
            };
            let attached = match program.attach_pinned(interface, mode, &pins) {
                Err(error) if settings.mode == Mode::Auto => {
                    debug!(interface, error = %error_chain(&error), "native XDP refused, trying generic");
                    program
                        .attach_pinned(interface, crate::XdpMode::Skb, &pins)
                        .map(|a| (a, "generic"))
                }
                other => other.map(|a| {
                    (
                        a,
                        if mode == crate::XdpMode::Skb {
                            "generic"
                        } else {
                            "native"
                        },
                    )
                }),
            }?;
            egress.push(program.add_egress_interface(interface)?);
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
        // Subscribe first, then read: no change falls between the two.
        let (netlink, announcements) = if settings.cache_next_hops {
            match Announcements::open().and_then(|a| Ok((Netlink::open()?, a))) {
                Ok((netlink, announcements)) => (Some(netlink), Some(announcements)),
                Err(error) => {
                    warn!(%error, "no rtnetlink socket: next hops are not cached, every frame the kernel forwards takes a FIB lookup");
                    (None, None)
                }
            }
        } else {
            info!(
                "xdp.cache_next_hops = false: every frame the kernel forwards takes a FIB lookup"
            );
            (None, None)
        };
        let mut fast_path = FastPath {
            program,
            max_channels: settings.max_channels as usize,
            bound: HashMap::new(),
            adopted: HashSet::new(),
            free_counters: (0..settings.max_channels).rev().collect(),
            budgets: HashMap::new(),
            free_budgets: (0..settings.max_channels.min(crate::BUDGET_SLOTS))
                .rev()
                .collect(),
            next_generation: 1,
            next_hops: NextHopCache::new(egress),
            netlink,
            announcements,
            route_users: HashMap::new(),
            full_reported: false,
            stats: FastPathStats::default(),
            total_offered: [Vec::new(), Vec::new()],
        };
        fast_path.read_kernel_state();
        fast_path.reconcile()?;
        fast_path.drive();
        // Adopted bindings carry a previous agent's next hops: this cache's replace them.
        let adopted: Vec<ChannelKey> = fast_path.adopted.iter().copied().collect();
        for channel in adopted {
            fast_path.rewrite(channel);
        }
        Ok(fast_path)
    }

    /// The announcement socket, for the thread that reads it ([`FastPath::announced`]).
    pub fn take_announcements(&mut self) -> Option<Announcements> {
        self.announcements.take()
    }

    /// Applies what the kernel announced: the cache follows, and the bindings whose next hop
    /// changed are rewritten.
    pub fn announced(&mut self, batch: Vec<Announcement>) {
        let mut routes_changed = false;
        let mut rules_changed = false;
        for announcement in batch {
            match announcement {
                Announcement::Link { ifindex, link } => {
                    self.next_hops.handle_input(Input::Link { ifindex, link })
                }
                Announcement::Neighbour { ifindex, ip, mac } => self
                    .next_hops
                    .handle_input(Input::Neighbour { ifindex, ip, mac }),
                // One lookup round for a burst of route changes.
                Announcement::RoutesChanged => routes_changed = true,
                Announcement::RulesChanged => rules_changed = true,
                Announcement::Lost => {
                    warn!(
                        "netlink announcements were lost: re-reading links, neighbours, rules and routes"
                    );
                    self.next_hops.clear_links_and_neighbours();
                    self.read_kernel_state();
                    self.next_hops.handle_input(Input::Resynced);
                }
            }
        }
        if rules_changed {
            self.read_policy_rules();
        }
        if routes_changed {
            self.next_hops.handle_input(Input::RoutesChanged);
        }
        self.drive();
    }

    /// Feeds the cache every link and neighbour, and whether policy rules exist.
    fn read_kernel_state(&mut self) {
        let Some(netlink) = &mut self.netlink else {
            return;
        };
        if let Err(error) = netlink.read_links_and_neighbours(&mut self.next_hops) {
            warn!(%error, "reading the interfaces and the neighbour table over netlink failed");
        }
        self.read_policy_rules();
    }

    fn read_policy_rules(&mut self) {
        let Some(netlink) = &mut self.netlink else {
            return;
        };
        match netlink.has_policy_rules() {
            Ok(present) => {
                if present {
                    info!(
                        "policy-routing rules present: next hops are not cached, the XDP program does a full FIB lookup per frame"
                    );
                }
                self.next_hops.handle_input(Input::PolicyRules(present));
            }
            Err(error) => warn!(%error, "reading the policy-routing rules over netlink failed"),
        }
    }

    /// Carries out what the cache asks for until it asks for nothing more.
    fn drive(&mut self) {
        while let Some(output) = self.next_hops.poll_output() {
            match output {
                Output::LookUpRoute(key) => {
                    let route = match &mut self.netlink {
                        Some(netlink) => netlink.route(key).unwrap_or_else(|error| {
                            warn!(src = %key.src, dst = %key.dst, %error, "route lookup over netlink failed");
                            None
                        }),
                        None => None,
                    };
                    self.next_hops.handle_input(Input::Route { key, route });
                }
                Output::Changed(key) => self.rewrite_users_of(key),
                Output::FibFlags(flags) => {
                    if let Err(error) = self.program.set_fib_flags(flags) {
                        self.stats.map_errors += 1;
                        warn!(error = %error_chain(&error), "setting the XDP program's FIB lookup flags failed");
                    }
                }
            }
        }
    }

    /// Rewrites every binding that uses `key` with the cache's next hops.
    fn rewrite_users_of(&mut self, key: RouteKey) {
        let users: Vec<ChannelKey> = self
            .route_users
            .get(&key)
            .map(|users| users.iter().copied().collect())
            .unwrap_or_default();
        for channel in users {
            self.rewrite(channel);
        }
    }

    /// Rewrites one binding if the cache's next hops for it differ from what it carries.
    fn rewrite(&mut self, channel: ChannelKey) {
        let Some(binding) = self.bound.get_mut(&channel) else {
            return;
        };
        let (to_peer, to_client) = route_keys(binding);
        let updated = ChannelBinding {
            to_peer: self.next_hops.next_hop(to_peer),
            to_client: self.next_hops.next_hop(to_client),
            ..*binding
        };
        if updated == *binding {
            return;
        }
        match self.program.bind_channel(&updated) {
            Ok(()) => {
                *binding = updated;
                self.stats.next_hop_rewrites += 1;
                debug!(client = %updated.client, channel = updated.channel, to_peer = ?updated.to_peer, to_client = ?updated.to_client, "channel's next hops rewritten");
            }
            Err(error) => {
                self.stats.map_errors += 1;
                warn!(client = %updated.client, channel = updated.channel, error = %error_chain(&error), "rewriting a channel's next hops failed");
            }
        }
    }

    /// Starts keeping `binding`'s two routes: the next hops it can carry now.
    fn use_routes(&mut self, channel: ChannelKey, binding: &ChannelBinding) -> (NextHop, NextHop) {
        let (to_peer, to_client) = route_keys(binding);
        for key in [to_peer, to_client] {
            self.route_users.entry(key).or_default().insert(channel);
        }
        (
            self.next_hops.acquire(to_peer),
            self.next_hops.acquire(to_client),
        )
    }

    /// Forgets a binding: its routes and its counter slot.
    fn forget(&mut self, channel: ChannelKey) -> Option<ChannelBinding> {
        let binding = self.bound.remove(&channel)?;
        self.adopted.remove(&channel);
        let (to_peer, to_client) = route_keys(&binding);
        for key in [to_peer, to_client] {
            self.next_hops.release(key);
            if let Some(users) = self.route_users.get_mut(&key) {
                users.remove(&channel);
                if users.is_empty() {
                    self.route_users.remove(&key);
                }
            }
        }
        if (binding.counter_id as usize) < self.max_channels {
            self.free_counters.push(binding.counter_id);
        }
        if binding.limit.is_limited() {
            self.release_budget(&channel.0);
        }
        Some(binding)
    }

    /// The budget slot and generation of `five_tuple`'s allocation for one more of its
    /// channels: its own if it has one, else a free slot with a new generation (which the
    /// program empties on first use). None when every slot is taken.
    fn take_budget(&mut self, five_tuple: FiveTuple) -> Option<(u32, u32)> {
        if let Some((slot, generation, users)) = self.budgets.get_mut(&five_tuple) {
            *users += 1;
            return Some((*slot, *generation));
        }
        let Some(slot) = self.free_budgets.pop() else {
            self.stats.budgets_full += 1;
            warn!(client = %five_tuple.client, slots = crate::BUDGET_SLOTS, "every bandwidth budget of the XDP program is taken: this limited allocation's channels are relayed in userspace");
            return None;
        };
        let generation = self.next_generation;
        self.next_generation = self.next_generation.checked_add(1).unwrap_or(1);
        self.budgets.insert(five_tuple, (slot, generation, 1));
        Some((slot, generation))
    }

    /// One channel of `five_tuple`'s allocation less uses its budget.
    fn release_budget(&mut self, five_tuple: &FiveTuple) {
        if let Some((slot, _, users)) = self.budgets.get_mut(five_tuple) {
            *users -= 1;
            if *users == 0 {
                self.free_budgets.push(*slot);
                self.budgets.remove(five_tuple);
            }
        }
    }

    /// Bring the pinned maps a previous agent left in line with this one: its state machine
    /// starts empty, so expired channels are removed now, live ones keep forwarding (media
    /// does not stop for a restart) and are removed at their recorded expiry, and
    /// half-written entries are removed.
    fn reconcile(&mut self) -> Result<(), XdpError> {
        let now_ns = crate::monotonic_now_ns();
        for binding in self.program.channel_bindings()? {
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
            self.free_counters
                .retain(|&slot| slot != binding.counter_id);
            if binding.limit.is_limited() {
                self.free_budgets.retain(|&slot| slot != binding.budget_id);
                self.budgets
                    .entry(key.0)
                    .or_insert((binding.budget_id, binding.budget_generation, 0))
                    .2 += 1;
                self.next_generation = self
                    .next_generation
                    .max(binding.budget_generation.saturating_add(1));
            }
            self.bound.insert(key, binding);
            self.adopted.insert(key);
            self.use_routes(key, &binding);
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
        let now_ns = crate::monotonic_now_ns();
        let expired: Vec<_> = self
            .adopted
            .iter()
            .filter(|key| self.bound.get(key).is_none_or(|b| b.expires_ns <= now_ns))
            .copied()
            .collect();
        for key in expired {
            if let Some(binding) = self.forget(key) {
                self.unbind(&binding);
            }
        }
    }

    pub fn stats(&self) -> FastPathStats {
        FastPathStats {
            next_hops: self.next_hops.stats(),
            ..self.stats
        }
    }

    pub fn program(&self) -> &XdpProgram {
        &self.program
    }

    /// The bytes each CPU was offered in `direction` since the last call: its demand on the
    /// total limit (empty if the program's shares cannot be read).
    pub fn total_demand(&mut self, direction: TotalDirection) -> Vec<u64> {
        let shares = match self.program.total_shares(direction) {
            Ok(shares) => shares,
            Err(error) => {
                self.stats.map_errors += 1;
                debug!(error = %error_chain(&error), "reading the total limit's shares failed");
                return Vec::new();
            }
        };
        let last = &mut self.total_offered[direction as usize];
        last.resize(shares.len(), 0);
        shares
            .iter()
            .zip(last.iter_mut())
            .map(|(share, last)| {
                let offered = share.offered_bytes.wrapping_sub(*last);
                *last = share.offered_bytes;
                offered
            })
            .collect()
    }

    /// Gives each CPU its share of the total limit in `direction`.
    pub fn set_total_shares(&mut self, direction: TotalDirection, limits: &[Limit]) {
        if let Err(error) = self.program.set_total_shares(direction, limits) {
            self.stats.map_errors += 1;
            warn!(error = %error_chain(&error), "setting the total limit's shares in the kernel failed");
        }
    }

    /// Applies the core's changes; returns what the kernel had done with the data of each
    /// channel it withdrew, for the allocation's totals.
    pub fn apply(
        &mut self,
        events: Vec<FastPathEvent>,
        now: Instant,
    ) -> Vec<(FiveTuple, KernelTraffic)> {
        let mut withdrawn = Vec::new();
        for event in events {
            match event {
                FastPathEvent::Up(channel) => {
                    if let Some(counters) = self.install(&channel, now) {
                        withdrawn.push((channel.five_tuple, KernelTraffic::from(counters)));
                    }
                }
                FastPathEvent::Down(channel) => {
                    if let Some(counters) = self.remove(&channel) {
                        withdrawn.push((channel.five_tuple, KernelTraffic::from(counters)));
                    }
                }
            }
        }
        withdrawn
    }

    /// What the kernel has done so far with the data of the channels it forwards now, per
    /// allocation: every slot read in batches (a few system calls for all channels), or one
    /// lookup per channel where the kernel has no batched lookups (before 5.6).
    pub fn kernel_traffic(&self) -> HashMap<FiveTuple, KernelTraffic> {
        let slots = self
            .bound
            .values()
            .map(|b| b.counter_id + 1)
            .max()
            .unwrap_or(0);
        let batch = self
            .program
            .channel_counters_batch(slots)
            .unwrap_or_else(|error| {
                debug!(%error, "batched counter lookup unavailable: one lookup per channel");
                Vec::new()
            });
        let mut totals: HashMap<FiveTuple, KernelTraffic> = HashMap::new();
        for ((five_tuple, _), binding) in &self.bound {
            let counters = match batch.get(binding.counter_id as usize) {
                Some(counters) => Ok(*counters),
                None => self.program.channel_counters(binding.counter_id),
            };
            if let Ok(counters) = counters {
                totals
                    .entry(*five_tuple)
                    .or_default()
                    .add(KernelTraffic::from(counters));
            }
        }
        totals
    }

    /// Installs or refreshes a channel; its last counters if it had to be withdrawn instead
    /// (a channel that became limited when every budget is taken).
    fn install(&mut self, channel: &FastPathChannel, now: Instant) -> Option<ChannelCounters> {
        let key = (channel.five_tuple, channel.channel);
        // Instant and bpf_ktime_get_coarse_ns are both CLOCK_MONOTONIC.
        let remaining = channel.expires.saturating_duration_since(now);
        let mut binding = ChannelBinding {
            client: channel.five_tuple.client,
            server: channel.five_tuple.server,
            relay: channel.relay,
            peer: channel.peer,
            channel: channel.channel,
            counter_id: 0,
            expires_ns: crate::monotonic_now_ns()
                .saturating_add(u64::try_from(remaining.as_nanos()).unwrap_or(u64::MAX)),
            to_peer: NextHop::NONE,
            to_client: NextHop::NONE,
            limit: channel.bandwidth.map_or(Limit::NONE, |limit| {
                Limit::new(limit.bits_per_second, limit.burst_bytes)
            }),
            budget_id: 0,
            budget_generation: 0,
        };
        let previous = self.bound.get(&key).copied();
        // A limited binding holds its allocation's budget: kept across a refresh, taken when
        // it becomes limited, released (below, once the kernel has the new binding) when it
        // stops being.
        let took_budget = match previous {
            Some(previous) if previous.limit.is_limited() && binding.limit.is_limited() => {
                binding.budget_id = previous.budget_id;
                binding.budget_generation = previous.budget_generation;
                false
            }
            _ if binding.limit.is_limited() => match self.take_budget(channel.five_tuple) {
                Some((slot, generation)) => {
                    (binding.budget_id, binding.budget_generation) = (slot, generation);
                    true
                }
                // Unpoliced in the kernel it must not stay: userspace polices it.
                None => return previous.and_then(|_| self.remove(channel)),
            },
            _ => false,
        };
        let new = match previous {
            Some(existing) => {
                binding.counter_id = existing.counter_id;
                binding.to_peer = existing.to_peer;
                binding.to_client = existing.to_client;
                false
            }
            None => {
                let Some(slot) = self.free_counters.pop() else {
                    if took_budget {
                        self.release_budget(&channel.five_tuple);
                    }
                    self.map_full(channel);
                    return None;
                };
                binding.counter_id = slot;
                self.bound.insert(key, binding);
                (binding.to_peer, binding.to_client) = self.use_routes(key, &binding);
                true
            }
        };
        match self.program.bind_channel(&binding) {
            Ok(()) => {
                self.adopted.remove(&key);
                self.bound.insert(key, binding);
                if previous.is_some_and(|p| p.limit.is_limited()) && !binding.limit.is_limited() {
                    self.release_budget(&channel.five_tuple);
                }
                if new {
                    self.stats.channels_installed += 1;
                    debug!(client = %binding.client, channel = binding.channel, peer = %binding.peer, to_peer = ?binding.to_peer, to_client = ?binding.to_client, limit = ?binding.limit, "channel forwarded in the kernel");
                }
            }
            Err(error) => {
                if new {
                    // Releases the budget it took with the rest.
                    self.forget(key);
                } else if took_budget {
                    self.release_budget(&channel.five_tuple);
                }
                self.stats.map_errors += 1;
                warn!(client = %binding.client, channel = binding.channel, error = %error_chain(&error), "channel left to userspace: kernel map update failed");
            }
        }
        // Route lookups the new binding asked for; their answers rewrite it.
        self.drive();
        None
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
        let binding = self.forget((channel.five_tuple, channel.channel))?;
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

/// The routes of a binding's two directions: relay -> peer, and server -> client.
fn route_keys(binding: &ChannelBinding) -> (RouteKey, RouteKey) {
    let key = |src: SocketAddr, dst: SocketAddr| RouteKey {
        src: src.ip().to_canonical(),
        dst: dst.ip().to_canonical(),
    };
    (
        key(binding.relay, binding.peer),
        key(binding.server, binding.client),
    )
}

/// What the kernel did with the application data of an allocation's channels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelTraffic {
    pub relayed: RelayedBytes,
    /// Dropped over the allocation's bandwidth limit.
    pub over_limit: RelayedBytes,
}

impl KernelTraffic {
    fn add(&mut self, other: KernelTraffic) {
        self.relayed.from_client += other.relayed.from_client;
        self.relayed.to_client += other.relayed.to_client;
        self.over_limit.from_client += other.over_limit.from_client;
        self.over_limit.to_client += other.over_limit.to_client;
    }
}

impl From<ChannelCounters> for KernelTraffic {
    fn from(counters: ChannelCounters) -> Self {
        KernelTraffic {
            relayed: RelayedBytes {
                from_client: counters.to_peer_bytes,
                to_client: counters.to_client_bytes,
            },
            over_limit: RelayedBytes {
                from_client: counters.to_peer_over_limit_bytes,
                to_client: counters.to_client_over_limit_bytes,
            },
        }
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
