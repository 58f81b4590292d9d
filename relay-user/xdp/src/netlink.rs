//! The netlink I/O of the next-hop cache (`crate::next_hop`): route lookups and dumps on one
//! socket, the kernel's announcements of link, neighbour, route and rule changes on another.
//!
//! Both are plain blocking rtnetlink sockets (netlink-sys, with messages built and parsed by
//! netlink-packet-route): a lookup is answered by the kernel within the request's system
//! call, so it is made inline, in microseconds; the announcements are read by a thread of
//! their own, which hands them to the fast path at once (the cache follows the kernel within
//! milliseconds).

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType},
    rule::{RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::next_hop::{Input, Link, NextHopCache, Output, Route, RouteKey};
use relay_common::NextHop;

/// A change the kernel announced, as the fast path acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Announcement {
    Link {
        ifindex: u32,
        link: Option<Link>,
    },
    Neighbour {
        ifindex: u32,
        ip: IpAddr,
        mac: Option<[u8; 6]>,
    },
    RoutesChanged,
    RulesChanged,
    /// Announcements were lost (ENOBUFS): everything must be read again.
    Lost,
}

/// The request socket: route lookups and dumps.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

/// Receive buffer of both sockets: room for the burst of announcements a topology change
/// brings (a full neighbour table flush) before the kernel reports an overflow.
const RECEIVE_BUFFER: usize = 4 << 20;
/// One datagram from the kernel: a dump part or a burst of announcements.
const DATAGRAM: usize = 64 << 10;

impl Netlink {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
            buffer: Vec::with_capacity(DATAGRAM),
        })
    }

    /// The route the kernel would give a datagram from `key.src` to `key.dst` (an output
    /// lookup, as for the relay's own socket), if it leaves through an interface: `None` for
    /// an unreachable, prohibited, local or broadcast destination.
    pub fn route(&mut self, key: RouteKey) -> io::Result<Option<Route>> {
        let mut message = RouteMessage::default();
        message.header.address_family = family(key.dst);
        message.header.destination_prefix_length = full_prefix(key.dst);
        message.header.source_prefix_length = full_prefix(key.src);
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(key.dst)));
        message
            .attributes
            .push(RouteAttribute::Source(RouteAddress::from(key.src)));
        let answers = match self.request(RouteNetlinkMessage::GetRoute(message), 0) {
            Ok(answers) => answers,
            // Unreachable, prohibited, no route, source not ours: nothing to cache.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(
                        libc::ENETUNREACH
                            | libc::EHOSTUNREACH
                            | libc::EACCES
                            | libc::EINVAL
                            | libc::ESRCH
                    )
                ) =>
            {
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        Ok(answers.into_iter().find_map(|answer| match answer {
            RouteNetlinkMessage::NewRoute(route) => parse_route(&route, key.dst),
            _ => None,
        }))
    }

    /// Feeds `cache` every interface and every usable neighbour entry the kernel has.
    pub fn read_links_and_neighbours(&mut self, cache: &mut NextHopCache) -> io::Result<()> {
        for (ifindex, link) in self.links()? {
            cache.handle_input(Input::Link {
                ifindex,
                link: Some(link),
            });
        }
        for (ifindex, ip, mac) in self.neighbours()? {
            cache.handle_input(Input::Neighbour {
                ifindex,
                ip,
                mac: Some(mac),
            });
        }
        Ok(())
    }

    /// Every interface.
    pub fn links(&mut self) -> io::Result<Vec<(u32, Link)>> {
        let answers = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewLink(link) => Some((link.header.index, parse_link(&link))),
                _ => None,
            })
            .collect())
    }

    /// Every IPv4 and IPv6 neighbour with a valid link-layer address.
    pub fn neighbours(&mut self) -> io::Result<Vec<(u32, IpAddr, [u8; 6])>> {
        let mut neighbours = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = NeighbourMessage::default();
            request.header.family = family;
            for answer in self.request(RouteNetlinkMessage::GetNeighbour(request), NLM_F_DUMP)? {
                if let RouteNetlinkMessage::NewNeighbour(neighbour) = answer
                    && let Some((ifindex, ip, Some(mac))) = parse_neighbour(&neighbour, false)
                {
                    neighbours.push((ifindex, ip, mac));
                }
            }
        }
        Ok(neighbours)
    }

    /// Whether any IPv4 or IPv6 policy-routing rule exists beyond the kernel's defaults
    /// (`0: from all lookup local`, `32766: from all lookup main`, and for IPv4
    /// `32767: from all lookup default`).
    pub fn has_policy_rules(&mut self) -> io::Result<bool> {
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = RuleMessage::default();
            request.header.family = family;
            for answer in self.request(RouteNetlinkMessage::GetRule(request), NLM_F_DUMP)? {
                if let RouteNetlinkMessage::NewRule(rule) = answer
                    && !is_default_rule(&rule)
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Sends one request and collects its answers: every part of a dump, or the one answer of
    /// a lookup. An error message from the kernel is returned as its errno.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;

        let dump = flags & NLM_F_DUMP != 0;
        let mut answers = Vec::new();
        // Bounded: a dump ends with NLMSG_DONE; the kernel sends nothing unasked on this
        // socket (it joined no group), and stale answers to older requests are skipped.
        loop {
            self.buffer.clear();
            self.socket.recv(&mut self.buffer, 0)?;
            for message in parse_datagram(&self.buffer) {
                if message.header.sequence_number != sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => {
                        answers.push(inner);
                        if !dump {
                            return Ok(answers);
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(error) if error.code.is_some() => {
                        return Err(error.to_io());
                    }
                    NetlinkPayload::Error(_) => return Ok(answers),
                    _ => {}
                }
            }
        }
    }
}

/// Resolves one route's next hop now, as the agent's cache would (for tests and benchmarks
/// that bind channels without an agent): `NONE` unless everything is known and the egress is
/// one of `egress`.
pub fn resolve(key: RouteKey, egress: &[u32]) -> io::Result<NextHop> {
    let mut netlink = Netlink::open()?;
    let mut cache = NextHopCache::new(egress.iter().copied());
    netlink.read_links_and_neighbours(&mut cache)?;
    cache.handle_input(Input::PolicyRules(netlink.has_policy_rules()?));
    cache.acquire(key);
    while let Some(output) = cache.poll_output() {
        if let Output::LookUpRoute(key) = output {
            let route = netlink.route(key)?;
            cache.handle_input(Input::Route { key, route });
        }
    }
    Ok(cache.next_hop(key))
}

/// The announcement socket: joined to the link, neighbour, route and rule groups of both
/// families. Open it before the first dump, so that no change falls between the two.
pub struct Announcements {
    socket: Socket,
    buffer: Vec<u8>,
}

impl Announcements {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.set_rx_buf_sz(RECEIVE_BUFFER)?;
        for group in [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_NEIGH,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_IPV6_ROUTE,
            libc::RTNLGRP_IPV4_RULE,
            libc::RTNLGRP_IPV6_RULE,
        ] {
            socket.add_membership(group)?;
        }
        // A bounded wait, so that the reading thread notices when the agent is gone.
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: a valid descriptor and option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            socket,
            buffer: Vec::with_capacity(DATAGRAM),
        })
    }

    /// Waits up to a second for announcements; an empty batch when none came.
    pub fn next_batch(&mut self) -> io::Result<Vec<Announcement>> {
        self.buffer.clear();
        match self.socket.recv(&mut self.buffer, 0) {
            Ok(_) => Ok(parse_datagram(&self.buffer)
                .into_iter()
                .filter_map(|message| match message.payload {
                    NetlinkPayload::InnerMessage(inner) => announcement(inner),
                    _ => None,
                })
                .collect()),
            Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                Ok(vec![Announcement::Lost])
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Vec::new())
            }
            Err(error) => Err(error),
        }
    }
}

fn announcement(message: RouteNetlinkMessage) -> Option<Announcement> {
    match message {
        RouteNetlinkMessage::NewLink(link) => Some(Announcement::Link {
            ifindex: link.header.index,
            link: Some(parse_link(&link)),
        }),
        RouteNetlinkMessage::DelLink(link) => Some(Announcement::Link {
            ifindex: link.header.index,
            link: None,
        }),
        RouteNetlinkMessage::NewNeighbour(neighbour) => parse_neighbour(&neighbour, false)
            .map(|(ifindex, ip, mac)| Announcement::Neighbour { ifindex, ip, mac }),
        RouteNetlinkMessage::DelNeighbour(neighbour) => parse_neighbour(&neighbour, true)
            .map(|(ifindex, ip, mac)| Announcement::Neighbour { ifindex, ip, mac }),
        RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_) => {
            Some(Announcement::RoutesChanged)
        }
        RouteNetlinkMessage::NewRule(_) | RouteNetlinkMessage::DelRule(_) => {
            Some(Announcement::RulesChanged)
        }
        _ => None,
    }
}

/// The netlink messages of one datagram; a malformed one ends the walk (the rest cannot be
/// framed).
fn parse_datagram(bytes: &[u8]) -> Vec<NetlinkMessage<RouteNetlinkMessage>> {
    let mut messages = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let Ok(buffer) = NetlinkBuffer::new_checked(&bytes[offset..]) else {
            break;
        };
        let length = buffer.length() as usize;
        if length == 0 {
            break;
        }
        if let Ok(message) =
            NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..offset + length])
        {
            messages.push(message);
        }
        // Messages are aligned to 4 bytes (NLMSG_ALIGN).
        offset += (length + 3) & !3;
    }
    messages
}

fn parse_link(link: &LinkMessage) -> Link {
    let mut mac = None;
    let mut mtu = 0;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::Address(address) if address.len() == 6 => {
                mac = <[u8; 6]>::try_from(address.as_slice()).ok();
            }
            LinkAttribute::Mtu(value) => mtu = *value,
            _ => {}
        }
    }
    let flags = link.header.flags;
    Link {
        mac: mac.filter(|_| link.header.link_layer_type == LinkLayerType::Ether),
        mtu,
        up: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
    }
}

/// (interface, address, MAC if the entry is usable). `deleted`: the entry went away.
fn parse_neighbour(
    neighbour: &NeighbourMessage,
    deleted: bool,
) -> Option<(u32, IpAddr, Option<[u8; 6]>)> {
    let mut ip = None;
    let mut mac = None;
    for attribute in &neighbour.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6));
            }
            NeighbourAttribute::LinkLayerAddress(address) => {
                mac = <[u8; 6]>::try_from(address.as_slice()).ok();
            }
            _ => {}
        }
    }
    // RFC 4861 §7.3.2 (and ARP alike): these states hold a link-layer address the kernel
    // itself sends to; INCOMPLETE, FAILED and NONE do not.
    let usable = !deleted
        && matches!(
            neighbour.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
    Some((neighbour.header.ifindex, ip?, mac.filter(|_| usable)))
}

fn parse_route(route: &RouteMessage, dst: IpAddr) -> Option<Route> {
    if route.header.kind != RouteType::Unicast {
        return None;
    }
    let mut ifindex = None;
    let mut gateway = None;
    let mut mtu = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Oif(index) => ifindex = Some(*index),
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) => gateway = Some(IpAddr::V4(*v4)),
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => gateway = Some(IpAddr::V6(*v6)),
            RouteAttribute::Metrics(metrics) => {
                mtu = metrics.iter().find_map(|metric| match metric {
                    RouteMetric::Mtu(value) => Some(*value),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Some(Route {
        ifindex: ifindex?,
        neighbour: gateway.unwrap_or(dst),
        mtu,
    })
}

fn is_default_rule(rule: &RuleMessage) -> bool {
    let header = &rule.header;
    if header.src_len != 0 || header.dst_len != 0 || header.tos != 0 {
        return false;
    }
    let mut priority = 0;
    let mut table = u32::from(header.table);
    for attribute in &rule.attributes {
        match attribute {
            RuleAttribute::Priority(value) => priority = *value,
            RuleAttribute::Table(value) => table = *value,
            RuleAttribute::Protocol(_) => {}
            // The kernel reports these unset as all ones.
            RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            // Any selector (interface, mark, ports, ...) or action makes it a policy rule.
            _ => return false,
        }
    }
    matches!(
        (priority, table),
        (0, RT_TABLE_LOCAL) | (32766, RT_TABLE_MAIN) | (32767, RT_TABLE_DEFAULT)
    )
}

const RT_TABLE_DEFAULT: u32 = 253;
const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_LOCAL: u32 = 255;

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn full_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's own answers, read from this machine's network namespace: the loopback
    /// interface is there in every namespace and has no Ethernet address.
    #[test]
    fn dumps_links_and_looks_up_a_local_route() {
        let Ok(mut netlink) = Netlink::open() else {
            eprintln!("SKIP: no rtnetlink socket here");
            return;
        };
        let links = netlink.links().expect("link dump");
        let lo = links
            .iter()
            .find(|(index, _)| *index == 1)
            .expect("loopback is interface 1");
        assert_eq!(lo.1.mac, None);
        netlink.neighbours().expect("neighbour dump");
        netlink.has_policy_rules().expect("rule dump");
        // A local destination is no next hop.
        let local = RouteKey {
            src: "127.0.0.1".parse().unwrap(),
            dst: "127.0.0.1".parse().unwrap(),
        };
        assert_eq!(netlink.route(local).expect("route lookup"), None);
    }
}
