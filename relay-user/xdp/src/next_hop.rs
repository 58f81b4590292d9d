//! The next-hop cache: where the XDP program sends each direction of a bound channel, so that
//! it needs no FIB lookup per packet.
//!
//! A sans-IO state machine. It is fed what the kernel says (links, neighbours, the answers to
//! route lookups it asked for, changes announced on netlink) and yields, from one queue
//! ([`NextHopCache::poll_output`]), the route lookups it needs and the keys whose next hop
//! changed; [`NextHopCache::next_hop`] is then what the binding must carry. The shell
//! (`server::netlink`) does the netlink I/O; the fast path rewrites the bindings.
//!
//! A next hop is cached only when everything it stands for is known and valid: a unicast
//! route whose egress is an interface the program may send out of, that interface up with
//! carrier and with an Ethernet address, and the neighbour (the gateway, or the destination on
//! a connected network) in a valid state (RFC 4861 §7.3.2: REACHABLE, STALE, DELAY, PROBE, or
//! PERMANENT). Anything less withdraws it: the program then falls back to `bpf_fib_lookup`,
//! and when that misses too, to userspace, which makes the kernel resolve the neighbour
//! again; the announcement of that brings the next hop back.
//!
//! Routes are looked up as the kernel routes a datagram the relay sends itself (from the
//! relay's or the listener's address to the destination). That is the forwarding decision
//! `bpf_fib_lookup` makes unless policy-routing rules select on something else (the ingress
//! interface, a mark, the TOS): the kernel refuses an input-route lookup whose source is a
//! local address (a martian source), so the two cannot be asked the same question. Hence,
//! while the host has rules beyond the default ones, nothing is cached and every frame takes
//! the full FIB lookup.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;

use relay_common::NextHop;

/// A route lookup: a datagram from `src` (a local address of the edge) to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// The answer to a route lookup that leads out of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Egress interface.
    pub ifindex: u32,
    /// Whose link-layer address the frame needs: the gateway, or the destination itself.
    pub neighbour: IpAddr,
    /// The route's MTU metric, if it has one (else the interface's applies).
    pub mtu: Option<u32>,
}

/// An interface as the cache needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// `None` for interfaces without an Ethernet address (loopback, tunnels): never cached.
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// Administratively up and with carrier (IFF_UP and IFF_LOWER_UP).
    pub up: bool,
}

/// What the kernel said, as the shell parsed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// An interface appeared or changed (`Some`), or went away (`None`).
    Link { ifindex: u32, link: Option<Link> },
    /// A neighbour entry with a valid link-layer address (`Some`), or one deleted, FAILED or
    /// INCOMPLETE (`None`).
    Neighbour {
        ifindex: u32,
        ip: IpAddr,
        mac: Option<[u8; 6]>,
    },
    /// The answer to an [`Output::LookUpRoute`]: `None` when the destination is unreachable,
    /// local, or not routed out of an interface.
    Route { key: RouteKey, route: Option<Route> },
    /// A route was added or removed somewhere: every route may have moved.
    RoutesChanged,
    /// Whether the host has policy-routing rules beyond the default ones.
    PolicyRules(bool),
    /// Netlink announcements were lost (ENOBUFS): the shell re-reads links, neighbours and
    /// rules (it subscribed first, then dumps, so nothing falls between the two).
    Resynced,
}

/// What the cache asks the shell to do, or tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Look this route up and answer with [`Input::Route`].
    LookUpRoute(RouteKey),
    /// [`NextHopCache::next_hop`] of this key changed: rewrite the bindings that use it.
    Changed(RouteKey),
    /// The fallback lookup's flags changed ([`relay_common::Settings::fib_flags`]).
    FibFlags(u32),
}

/// Counters an operator reads on the agent's `counters` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NextHopStats {
    /// Route keys in use (bindings' directions, shared where they coincide).
    pub routes: u64,
    /// Of those, with a cached next hop.
    pub cached: u64,
    pub route_lookups: u64,
    /// Times a cached next hop was replaced or withdrawn.
    pub changes: u64,
    /// Netlink overflows recovered by re-reading everything.
    pub resyncs: u64,
}

#[derive(Debug, Default)]
pub struct NextHopCache {
    /// Interfaces the program may redirect to (and so cache next hops on).
    egress: HashSet<u32>,
    /// Route keys in use, with how many binding directions use each.
    users: HashMap<RouteKey, usize>,
    /// Answers to route lookups; a key in use and absent here is being looked up.
    routes: HashMap<RouteKey, Option<Route>>,
    links: HashMap<u32, Link>,
    neighbours: HashMap<(u32, IpAddr), [u8; 6]>,
    policy_rules: bool,
    /// What [`NextHopCache::next_hop`] said last for each key in use.
    published: HashMap<RouteKey, NextHop>,
    fib_flags: u32,
    outputs: VecDeque<Output>,
    stats: NextHopStats,
}

impl NextHopCache {
    /// A cache that may send frames out of the interfaces `egress`.
    pub fn new(egress: impl IntoIterator<Item = u32>) -> Self {
        Self {
            egress: egress.into_iter().collect(),
            // Until the rules are read, nothing is cached and the fallback takes every rule.
            policy_rules: true,
            ..Self::default()
        }
    }

    /// A binding direction starts using `key`: its next hop is looked up if nobody else uses
    /// it. Returns what the binding may carry now (often `NONE` until the answer comes).
    pub fn acquire(&mut self, key: RouteKey) -> NextHop {
        let users = self.users.entry(key).or_insert(0);
        *users += 1;
        if *users == 1 {
            self.outputs.push_back(Output::LookUpRoute(key));
            self.stats.route_lookups += 1;
            self.published.insert(key, NextHop::NONE);
        }
        self.next_hop(key)
    }

    /// A binding direction stops using `key`.
    pub fn release(&mut self, key: RouteKey) {
        let Some(users) = self.users.get_mut(&key) else {
            return;
        };
        *users -= 1;
        if *users == 0 {
            self.users.remove(&key);
            self.routes.remove(&key);
            self.published.remove(&key);
        }
    }

    /// The next hop a binding direction using `key` carries: `NONE` unless all is known.
    pub fn next_hop(&self, key: RouteKey) -> NextHop {
        if self.policy_rules {
            return NextHop::NONE;
        }
        let Some(Some(route)) = self.routes.get(&key) else {
            return NextHop::NONE;
        };
        if !self.egress.contains(&route.ifindex) {
            return NextHop::NONE;
        }
        let Some(link) = self.links.get(&route.ifindex) else {
            return NextHop::NONE;
        };
        let (Some(src_mac), true) = (link.mac, link.up) else {
            return NextHop::NONE;
        };
        let Some(&dst_mac) = self.neighbours.get(&(route.ifindex, route.neighbour)) else {
            return NextHop::NONE;
        };
        let mtu = route.mtu.filter(|&m| m > 0).unwrap_or(link.mtu);
        NextHop {
            ifindex: route.ifindex,
            // Larger than any IP packet the program writes: no limit.
            mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
            src_mac,
            dst_mac,
            _pad: [0; 2],
        }
    }

    pub fn handle_input(&mut self, input: Input) {
        match input {
            Input::Link { ifindex, link } => {
                match link {
                    Some(link) => self.links.insert(ifindex, link),
                    None => self.links.remove(&ifindex),
                };
                let link_up = link.is_some_and(|l| l.up);
                if link_up {
                    // An interface coming back may carry routes again that had none.
                    self.look_up_every_route_where(|route| route.is_none());
                }
                self.publish_where(|route| route.ifindex == ifindex);
            }
            Input::Neighbour { ifindex, ip, mac } => {
                match mac {
                    Some(mac) => self.neighbours.insert((ifindex, ip), mac),
                    None => self.neighbours.remove(&(ifindex, ip)),
                };
                self.publish_where(|route| route.ifindex == ifindex && route.neighbour == ip);
            }
            Input::Route { key, route } => {
                if !self.users.contains_key(&key) {
                    // Released while it was looked up.
                    return;
                }
                self.routes.insert(key, route);
                self.publish(key);
            }
            Input::RoutesChanged => self.look_up_every_route_where(|_| true),
            Input::PolicyRules(present) => {
                self.policy_rules = present;
                let flags = if present {
                    0
                } else {
                    relay_common::FIB_LOOKUP_DIRECT
                };
                if flags != self.fib_flags {
                    self.fib_flags = flags;
                    self.outputs.push_back(Output::FibFlags(flags));
                }
                self.publish_every();
            }
            Input::Resynced => {
                self.stats.resyncs += 1;
                self.look_up_every_route_where(|_| true);
            }
        }
    }

    /// Forget every link and neighbour before a resync's dump repopulates them (what is gone
    /// from the kernel must not stay cached).
    pub fn clear_links_and_neighbours(&mut self) {
        self.links.clear();
        self.neighbours.clear();
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The fallback lookup's flags as last decided.
    pub fn fib_flags(&self) -> u32 {
        self.fib_flags
    }

    pub fn stats(&self) -> NextHopStats {
        NextHopStats {
            routes: self.users.len() as u64,
            cached: self.published.values().filter(|n| n.is_cached()).count() as u64,
            ..self.stats
        }
    }

    /// Asks again for every route in use whose answer matches; until the answer comes, each
    /// keeps its next hop (the shell answers at once).
    fn look_up_every_route_where(&mut self, matches: impl Fn(Option<&Route>) -> bool) {
        let mut keys: Vec<RouteKey> = self
            .users
            .keys()
            .filter(|key| self.routes.get(key).is_none_or(|r| matches(r.as_ref())))
            .copied()
            .collect();
        keys.sort_unstable();
        for key in keys {
            self.outputs.push_back(Output::LookUpRoute(key));
            self.stats.route_lookups += 1;
        }
    }

    fn publish_where(&mut self, matches: impl Fn(&Route) -> bool) {
        let mut keys: Vec<RouteKey> = self
            .routes
            .iter()
            .filter(|(_, route)| route.as_ref().is_some_and(&matches))
            .map(|(key, _)| *key)
            .collect();
        keys.sort_unstable();
        for key in keys {
            self.publish(key);
        }
    }

    fn publish_every(&mut self) {
        let mut keys: Vec<RouteKey> = self.users.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            self.publish(key);
        }
    }

    /// Emits [`Output::Changed`] if `key`'s next hop is not what was published.
    fn publish(&mut self, key: RouteKey) {
        let now = self.next_hop(key);
        let Some(published) = self.published.get_mut(&key) else {
            return;
        };
        if *published != now {
            if published.is_cached() {
                self.stats.changes += 1;
            }
            *published = now;
            self.outputs.push_back(Output::Changed(key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXT: u32 = 2;
    const INT: u32 = 3;
    const MAC_EXT: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const MAC_INT: [u8; 6] = [2, 0, 0, 0, 0, 3];
    const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
    const GW_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key() -> RouteKey {
        RouteKey {
            src: ip("10.0.2.1"),
            dst: ip("10.0.2.2"),
        }
    }

    fn link(mac: [u8; 6]) -> Option<Link> {
        Some(Link {
            mac: Some(mac),
            mtu: 1500,
            up: true,
        })
    }

    fn direct(ifindex: u32, neighbour: &str) -> Option<Route> {
        Some(Route {
            ifindex,
            neighbour: ip(neighbour),
            mtu: None,
        })
    }

    fn drain(cache: &mut NextHopCache) -> Vec<Output> {
        std::iter::from_fn(|| cache.poll_output()).collect()
    }

    /// A cache with both interfaces, no policy rules, the peer's neighbour known, and `key()`
    /// acquired and answered directly on the internal interface.
    fn resolved() -> NextHopCache {
        let mut cache = NextHopCache::new([EXT, INT]);
        cache.handle_input(Input::Link {
            ifindex: EXT,
            link: link(MAC_EXT),
        });
        cache.handle_input(Input::Link {
            ifindex: INT,
            link: link(MAC_INT),
        });
        cache.handle_input(Input::PolicyRules(false));
        cache.handle_input(Input::Neighbour {
            ifindex: INT,
            ip: ip("10.0.2.2"),
            mac: Some(PEER_MAC),
        });
        assert_eq!(cache.acquire(key()), NextHop::NONE);
        cache.handle_input(Input::Route {
            key: key(),
            route: direct(INT, "10.0.2.2"),
        });
        drain(&mut cache);
        cache
    }

    #[test]
    fn a_route_with_link_and_neighbour_is_cached() {
        let mut cache = NextHopCache::new([EXT, INT]);
        cache.handle_input(Input::Link {
            ifindex: INT,
            link: link(MAC_INT),
        });
        cache.handle_input(Input::PolicyRules(false));
        assert_eq!(
            drain(&mut cache),
            [Output::FibFlags(relay_common::FIB_LOOKUP_DIRECT)]
        );
        assert_eq!(cache.acquire(key()), NextHop::NONE);
        assert_eq!(drain(&mut cache), [Output::LookUpRoute(key())]);
        // A second user shares the lookup.
        cache.acquire(key());
        assert_eq!(drain(&mut cache), []);
        cache.handle_input(Input::Route {
            key: key(),
            route: direct(INT, "10.0.2.2"),
        });
        // No neighbour yet: nothing to publish.
        assert_eq!(drain(&mut cache), []);
        cache.handle_input(Input::Neighbour {
            ifindex: INT,
            ip: ip("10.0.2.2"),
            mac: Some(PEER_MAC),
        });
        assert_eq!(drain(&mut cache), [Output::Changed(key())]);
        assert_eq!(
            cache.next_hop(key()),
            NextHop {
                ifindex: INT,
                mtu: 1500,
                src_mac: MAC_INT,
                dst_mac: PEER_MAC,
                _pad: [0; 2]
            }
        );
        assert_eq!(cache.stats().cached, 1);
    }

    #[test]
    fn a_neighbour_change_moves_the_mac_and_a_failed_one_withdraws() {
        let mut cache = resolved();
        cache.handle_input(Input::Neighbour {
            ifindex: INT,
            ip: ip("10.0.2.2"),
            mac: Some(GW_MAC),
        });
        assert_eq!(drain(&mut cache), [Output::Changed(key())]);
        assert_eq!(cache.next_hop(key()).dst_mac, GW_MAC);
        // The same MAC again (a state change between valid states) changes nothing.
        cache.handle_input(Input::Neighbour {
            ifindex: INT,
            ip: ip("10.0.2.2"),
            mac: Some(GW_MAC),
        });
        assert_eq!(drain(&mut cache), []);
        // Another interface's neighbour of the same address is another entry.
        cache.handle_input(Input::Neighbour {
            ifindex: EXT,
            ip: ip("10.0.2.2"),
            mac: None,
        });
        assert_eq!(drain(&mut cache), []);
        cache.handle_input(Input::Neighbour {
            ifindex: INT,
            ip: ip("10.0.2.2"),
            mac: None,
        });
        assert_eq!(drain(&mut cache), [Output::Changed(key())]);
        assert_eq!(cache.next_hop(key()), NextHop::NONE);
        assert_eq!(cache.stats().changes, 2);
    }

    #[test]
    fn a_route_change_is_looked_up_again_and_the_egress_follows() {
        let mut cache = resolved();
        cache.handle_input(Input::Neighbour {
            ifindex: EXT,
            ip: ip("10.0.1.254"),
            mac: Some(GW_MAC),
        });
        assert_eq!(drain(&mut cache), []);
        cache.handle_input(Input::RoutesChanged);
        assert_eq!(drain(&mut cache), [Output::LookUpRoute(key())]);
        // Until the answer, the old next hop stays.
        assert!(cache.next_hop(key()).is_cached());
        cache.handle_input(Input::Route {
            key: key(),
            route: Some(Route {
                ifindex: EXT,
                neighbour: ip("10.0.1.254"),
                mtu: Some(1400),
            }),
        });
        assert_eq!(drain(&mut cache), [Output::Changed(key())]);
        let hop = cache.next_hop(key());
        assert_eq!(
            (hop.ifindex, hop.src_mac, hop.dst_mac, hop.mtu),
            (EXT, MAC_EXT, GW_MAC, 1400)
        );
        // Unreachable now.
        cache.handle_input(Input::RoutesChanged);
        drain(&mut cache);
        cache.handle_input(Input::Route {
            key: key(),
            route: None,
        });
        assert_eq!(drain(&mut cache), [Output::Changed(key())]);
        assert_eq!(cache.next_hop(key()), NextHop::NONE);
    }

    #[test]
    fn an_egress_the_program_may_not_use_is_never_cached() {
        let mut cache = resolved();
        cache.handle_input(Input::Link {
            ifindex: 9,
            link: link(GW_MAC),
        });
        cache.handle_input(Input::Neighbour {
            ifindex: 9,
            ip: ip("10.0.2.2"),
            mac: Some(PEER_MAC),
        });
        cache.handle_input(Input::RoutesChanged);
        drain(&mut cache);
        cache.handle_input(Input::Route {
            key: key(),
            route: direct(9, "10.0.2.2"),
        });
        assert_eq!(drain(&mut cache), [Output::Changed(key())]);
        assert_eq!(cache.next_hop(key()), NextHop::NONE);
    }

    #[test]
    fn link_down_withdraws_and_link_up_looks_up_again() {
        let mut cache = resolved();
        cache.handle_input(Input::Link {
            ifindex: INT,
            link: Some(Link {
                mac: Some(MAC_INT),
                mtu: 1500,
                up: false,
            }),
        });
        assert_eq!(drain(&mut cache), [Output::Changed(key())]);
        assert_eq!(cache.next_hop(key()), NextHop::NONE);
        // The kernel removes the routes of a link without carrier; the lookup says so.
        cache.handle_input(Input::RoutesChanged);
        drain(&mut cache);
        cache.handle_input(Input::Route {
            key: key(),
            route: None,
        });
        assert_eq!(drain(&mut cache), []);
        cache.handle_input(Input::Link {
            ifindex: INT,
            link: link(MAC_INT),
        });
        assert_eq!(drain(&mut cache), [Output::LookUpRoute(key())]);
        cache.handle_input(Input::Route {
            key: key(),
            route: direct(INT, "10.0.2.2"),
        });
        assert_eq!(drain(&mut cache), [Output::Changed(key())]);
        assert!(cache.next_hop(key()).is_cached());
        // An MTU change on the link reaches the next hop.
        cache.handle_input(Input::Link {
            ifindex: INT,
            link: Some(Link {
                mac: Some(MAC_INT),
                mtu: 1280,
                up: true,
            }),
        });
        assert_eq!(drain(&mut cache), [Output::Changed(key())]);
        assert_eq!(cache.next_hop(key()).mtu, 1280);
    }

    #[test]
    fn policy_rules_switch_caching_off_and_the_fallback_to_a_full_lookup() {
        let mut cache = resolved();
        cache.handle_input(Input::PolicyRules(true));
        assert_eq!(
            drain(&mut cache),
            [Output::FibFlags(0), Output::Changed(key())]
        );
        assert_eq!(cache.next_hop(key()), NextHop::NONE);
        cache.handle_input(Input::PolicyRules(false));
        assert_eq!(
            drain(&mut cache),
            [
                Output::FibFlags(relay_common::FIB_LOOKUP_DIRECT),
                Output::Changed(key())
            ]
        );
    }

    #[test]
    fn released_keys_are_forgotten_and_late_answers_ignored() {
        let mut cache = resolved();
        cache.release(key());
        assert_eq!(cache.stats().routes, 0);
        cache.handle_input(Input::Route {
            key: key(),
            route: direct(INT, "10.0.2.2"),
        });
        cache.handle_input(Input::Neighbour {
            ifindex: INT,
            ip: ip("10.0.2.2"),
            mac: Some(GW_MAC),
        });
        assert_eq!(drain(&mut cache), []);
        // Releasing what nobody holds is harmless.
        cache.release(key());
    }

    #[test]
    fn a_resync_looks_every_route_up_again() {
        let mut cache = resolved();
        cache.handle_input(Input::Resynced);
        assert_eq!(drain(&mut cache), [Output::LookUpRoute(key())]);
        assert_eq!(cache.stats().resyncs, 1);
    }
}
