//! Which peers a relay may talk to.
//!
//! A TURN relay is an open door into whatever network it sits in, so every path that names a
//! peer (CreatePermission, ChannelBind, Send, ChannelData) asks [`PeerPolicy::check`], which
//! first canonicalises the address (an IPv6 address that embeds an IPv4 one is judged as that
//! IPv4 address) and then classifies it. Special-purpose ranges are denied unless an operator
//! allows a network explicitly: relaying external users to internal clients is this edge's job,
//! but only for the networks the operator names.
//!
//! Cloud instance-metadata endpoints ([`CLOUD_METADATA`]) are denied even on an allowed
//! network: a relay in a cloud must never hand a client the instance's credentials. Only an
//! allowed network that names one of them (lies within its entry) lets it through.
//!
//! The relay's own addresses are denied except for its relay ports: two clients that are both
//! relayed by this edge (the usual case for two external users) talk relay-to-relay, but no
//! client may reach the edge's listeners or any other service on its addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why a peer address is refused (reported in logs and counters; the client only sees 403).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// An IANA special-purpose range (loopback, private, link-local, documentation, ...).
    SpecialPurpose(&'static str),
    /// A network the operator denied explicitly.
    OperatorDenied,
    /// One of the server's own addresses on a port that is not a relay port (its listeners,
    /// or anything else running on the edge).
    OwnSocket,
    /// A cloud instance-metadata endpoint ([`CLOUD_METADATA`]).
    CloudMetadata(&'static str),
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DenyReason::SpecialPurpose(range) => write!(f, "special-purpose range ({range})"),
            DenyReason::OperatorDenied => f.write_str("a network denied by configuration"),
            DenyReason::OwnSocket => {
                f.write_str("the server's own address outside its relay port range")
            }
            DenyReason::CloudMetadata(what) => write!(f, "cloud metadata endpoint ({what})"),
        }
    }
}

/// IANA IPv4 special-purpose address registry (plus multicast and the limited broadcast).
const SPECIAL_V4: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.31.196.0/24", "AS112"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("192.175.48.0/24", "AS112 direct delegation"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "limited broadcast"),
];

/// Cloud instance-metadata and platform endpoints: a relayed request there could read the
/// instance's credentials. Some lie outside every special-purpose range (Azure's 168.63.129.16),
/// and the others must stay denied when an operator allows their whole range (link-local,
/// CGNAT, ULA). Denied unless an allowed network of the configuration names them.
pub const CLOUD_METADATA: &[(&str, &str)] = &[
    (
        "169.254.169.254/32",
        "AWS, Azure, Google Cloud, OpenStack, Oracle and others' instance metadata",
    ),
    ("169.254.170.2/32", "AWS ECS task metadata"),
    ("169.254.170.23/32", "AWS EKS Pod Identity"),
    ("169.254.0.23/32", "Tencent Cloud metadata"),
    ("168.63.129.16/32", "Azure WireServer and platform DNS"),
    ("100.100.100.200/32", "Alibaba Cloud metadata"),
    ("192.0.0.192/32", "Oracle Cloud metadata"),
    ("fd00:ec2::254/128", "AWS instance metadata over IPv6"),
    ("fd00:ec2::23/128", "AWS EKS Pod Identity over IPv6"),
    ("fd20:ce::254/128", "Google Cloud metadata over IPv6"),
];

/// IANA IPv6 special-purpose address registry (plus multicast). The forms that embed an IPv4
/// address are unwrapped by [`canonicalize`] before this list is consulted; they stay listed so
/// that an embedded form which cannot be unwrapped is still refused.
const SPECIAL_V6: &[(&str, &str)] = &[
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("::ffff:0:0:0/96", "IPv4-translated (RFC 2765)"),
    ("::/96", "IPv4-compatible"),
    ("64:ff9b::/96", "NAT64 well-known prefix"),
    ("64:ff9b:1::/48", "NAT64 local-use"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignments"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing SIDs"),
    ("fc00::/7", "unique local (ULA)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
];

/// The address a packet would really reach: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-translated
/// (`::ffff:0:a.b.c.d`, RFC 2765), IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`), 6to4 (`2002:AABB:CCDD::/48`) and Teredo
/// (`2001:0::/32`, client address inverted) forms are unwrapped to the IPv4 address they carry.
pub fn canonicalize(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    let o = v6.octets();
    let seg = v6.segments();
    let last_v4 = || Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    if seg[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return IpAddr::V4(last_v4());
    }
    // IPv4-compatible, but not :: and ::1, which are IPv6's own unspecified and loopback.
    if seg[..6] == [0; 6] && u32::from(last_v4()) > 1 {
        return IpAddr::V4(last_v4());
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(last_v4());
    }
    if seg[0] == 0x0064 && seg[1] == 0xff9b && seg[2] == 0x0001 {
        return IpAddr::V4(last_v4());
    }
    if seg[0] == 0x2002 {
        return IpAddr::V4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if seg[0] == 0x2001 && seg[1] == 0 {
        return IpAddr::V4(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]));
    }
    ip
}

/// The peer policy of one relay: compiled once from configuration.
#[derive(Clone, Debug)]
pub struct PeerPolicy {
    cloud_metadata: Vec<(IpNet, &'static str)>,
    special_v4: Vec<(Ipv4Net, &'static str)>,
    special_v6: Vec<(Ipv6Net, &'static str)>,
    allowed: Vec<IpNet>,
    /// Allowed by the control plane's access policy, on top of `allowed`.
    allowed_by_control: Vec<IpNet>,
    denied: Vec<IpNet>,
    own_addresses: Vec<IpAddr>,
    own_sockets: Vec<SocketAddr>,
    own_port_range: Option<(u16, u16)>,
}

impl PeerPolicy {
    /// `allowed` overrides the special-purpose denials; `denied` is an extra deny list that
    /// wins over everything. `own_addresses` are the relay's bound and advertised addresses,
    /// `own_sockets` its listeners, `own_port_range` its relay ports.
    pub fn new(
        allowed: Vec<IpNet>,
        denied: Vec<IpNet>,
        own_addresses: Vec<IpAddr>,
        own_sockets: Vec<SocketAddr>,
        own_port_range: Option<(u16, u16)>,
    ) -> Self {
        PeerPolicy {
            cloud_metadata: CLOUD_METADATA
                .iter()
                .map(|(net, what)| (net.parse().expect("static metadata range"), *what))
                .collect(),
            special_v4: SPECIAL_V4
                .iter()
                .map(|(net, why)| (net.parse().expect("static IPv4 range"), *why))
                .collect(),
            special_v6: SPECIAL_V6
                .iter()
                .map(|(net, why)| (net.parse().expect("static IPv6 range"), *why))
                .collect(),
            allowed: allowed.into_iter().map(canonical_network).collect(),
            allowed_by_control: Vec::new(),
            denied: denied.into_iter().map(canonical_network).collect(),
            own_addresses: own_addresses.into_iter().map(canonicalize).collect(),
            own_sockets: own_sockets
                .into_iter()
                .map(|s| SocketAddr::new(canonicalize(s.ip()), s.port()))
                .collect(),
            own_port_range,
        }
    }

    /// Replace the networks the control plane's access policy allows. They add to the
    /// configured ones, never remove them: a control plane that has no policy yet must not
    /// silently cut an edge off the internal networks its operator configured. The denied
    /// networks and every other rule stay.
    pub fn set_allowed_by_control(&mut self, allowed: Vec<IpNet>) {
        self.allowed_by_control = allowed.into_iter().map(canonical_network).collect();
    }

    /// Whether `ip` is on an internal network: one the operator or the control plane allows
    /// (`allowed_peer_networks`), not one of the edge's own addresses (relay to relay). Media
    /// from external users towards it needs an internal party's consent.
    pub fn is_internal(&self, ip: IpAddr) -> bool {
        let ip = canonicalize(ip);
        !self.own_addresses.contains(&ip)
            && self
                .allowed
                .iter()
                .chain(&self.allowed_by_control)
                .any(|net| net.contains(&ip))
    }

    /// Classify a peer IP (the check for CreatePermission, where no port is given).
    pub fn check(&self, ip: IpAddr) -> Result<(), DenyReason> {
        let ip = canonicalize(ip);
        if self.denied.iter().any(|net| net.contains(&ip)) {
            return Err(DenyReason::OperatorDenied);
        }
        if let Some((metadata, what)) = self
            .cloud_metadata
            .iter()
            .find(|(net, _)| net.contains(&ip))
            && !self
                .allowed
                .iter()
                .any(|net| net.contains(&ip) && metadata.contains(net))
        {
            return Err(DenyReason::CloudMetadata(what));
        }
        if self
            .allowed
            .iter()
            .chain(&self.allowed_by_control)
            .any(|net| net.contains(&ip))
        {
            return Ok(());
        }
        let special = match ip {
            IpAddr::V4(v4) => self
                .special_v4
                .iter()
                .find(|(net, _)| net.contains(&v4))
                .map(|(_, why)| *why),
            IpAddr::V6(v6) => self
                .special_v6
                .iter()
                .find(|(net, _)| net.contains(&v6))
                .map(|(_, why)| *why),
        };
        match special {
            Some(why) => Err(DenyReason::SpecialPurpose(why)),
            None => Ok(()),
        }
    }

    /// Classify a peer transport address (ChannelBind, Send, ChannelData): the IP check, and
    /// on the server's own addresses only its relay ports, even on an allowed network, so the
    /// relay cannot be pointed at its own listeners or at other services of the edge host.
    pub fn check_socket(&self, peer: SocketAddr) -> Result<(), DenyReason> {
        self.check(peer.ip())?;
        let ip = canonicalize(peer.ip());
        let own_listener = self
            .own_sockets
            .iter()
            .any(|s| s.port() == peer.port() && (s.ip() == ip || s.ip().is_unspecified()));
        let own_ip =
            self.own_addresses.contains(&ip) || self.own_sockets.iter().any(|s| s.ip() == ip);
        let relay_port = self
            .own_port_range
            .is_some_and(|(lo, hi)| (lo..=hi).contains(&peer.port()));
        if own_listener || (own_ip && !relay_port) {
            return Err(DenyReason::OwnSocket);
        }
        Ok(())
    }
}

/// An operator writing `::ffff:10.0.0.0/104` means 10.0.0.0/8.
fn canonical_network(net: IpNet) -> IpNet {
    match (net, canonicalize(net.addr())) {
        (IpNet::V6(v6), IpAddr::V4(v4)) if v6.prefix_len() >= 96 => {
            IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).expect("prefix <= 32"))
        }
        _ => net.trunc(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_policy() -> PeerPolicy {
        PeerPolicy::new(
            vec![],
            vec![],
            vec!["198.51.7.1".parse().unwrap()],
            vec!["198.51.7.1:3478".parse().unwrap()],
            Some((50000, 59999)),
        )
    }

    fn denied(policy: &PeerPolicy, ip: &str) -> bool {
        policy.check(ip.parse().unwrap()).is_err()
    }

    #[test]
    fn special_purpose_ranges_are_denied_by_default() {
        let p = default_policy();
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "::",
            "::1",
            "169.254.169.254",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert!(denied(&p, ip), "{ip} must be denied");
        }
    }

    #[test]
    fn embedded_ipv4_forms_are_judged_as_ipv4() {
        let p = default_policy();
        for ip in [
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::10.0.0.1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:0001::",
        ] {
            assert!(denied(&p, ip), "{ip} must be denied");
        }
        // Teredo carries the client address inverted: !127.0.0.1 = 128.255.255.254
        assert_eq!(
            canonicalize("2001:0:4136:e378:8000:63bf:80ff:fffe".parse().unwrap()),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        // A mapped public address is allowed, judged as the IPv4 address.
        assert!(!denied(&p, "::ffff:8.8.8.8"));
        assert!(!denied(&p, "64:ff9b::808:808"));
    }

    #[test]
    fn ipv4_translated_addresses_are_unwrapped() {
        let p = default_policy();
        assert_eq!(
            canonicalize("::ffff:0:8.8.8.8".parse().unwrap()),
            "8.8.8.8".parse::<IpAddr>().unwrap()
        );
        assert!(!denied(&p, "::ffff:0:8.8.8.8"));
        for ip in [
            "::ffff:0:127.0.0.1",
            "::ffff:0:10.1.2.3",
            "::ffff:0:169.254.169.254",
        ] {
            assert!(denied(&p, ip), "{ip} must be denied");
        }
    }

    #[test]
    fn cloud_metadata_is_denied_unless_an_allowed_network_names_it() {
        let policy = |allowed: &[&str]| {
            PeerPolicy::new(
                allowed.iter().map(|n| n.parse().unwrap()).collect(),
                vec![],
                vec![],
                vec![],
                None,
            )
        };
        let azure: IpAddr = "168.63.129.16".parse().unwrap();
        let default = policy(&[]);
        assert!(matches!(
            default.check(azure),
            Err(DenyReason::CloudMetadata(_))
        ));
        assert!(
            default
                .check("::ffff:168.63.129.16".parse().unwrap())
                .is_err()
        );
        assert!(default.check("168.63.129.17".parse().unwrap()).is_ok());
        // Allowing a network around it is not naming it.
        for broad in [&["0.0.0.0/0"][..], &["168.63.0.0/16"], &["169.254.0.0/16"]] {
            let p = policy(broad);
            assert!(p.check(azure).is_err(), "{broad:?}");
            assert!(
                p.check("169.254.169.254".parse().unwrap()).is_err(),
                "{broad:?}"
            );
        }
        assert!(
            policy(&["169.254.0.0/16"])
                .check("169.254.1.1".parse().unwrap())
                .is_ok()
        );
        for metadata in ["fd00:ec2::254", "fd20:ce::254", "fd00:ec2::23"] {
            assert!(
                policy(&["fc00::/7"])
                    .check(metadata.parse().unwrap())
                    .is_err()
            );
        }
        // Named: allowed.
        assert!(policy(&["168.63.129.16/32"]).check(azure).is_ok());
        // The control plane's networks never lift it: only the operator's configuration.
        let mut controlled = policy(&[]);
        controlled.set_allowed_by_control(vec!["168.63.129.16/32".parse().unwrap()]);
        assert!(controlled.check(azure).is_err());
    }

    #[test]
    fn public_addresses_are_allowed() {
        let p = default_policy();
        assert!(!denied(&p, "8.8.8.8"));
        assert!(!denied(&p, "2606:4700::1111"));
    }

    #[test]
    fn own_addresses_only_on_relay_ports() {
        let p = default_policy();
        // Relay-to-relay: two clients of this edge reach each other's relayed addresses.
        assert!(p.check("198.51.7.1".parse().unwrap()).is_ok());
        assert!(p.check_socket("198.51.7.1:50001".parse().unwrap()).is_ok());
        for peer in [
            "198.51.7.1:3478",
            "198.51.7.1:22",
            "[::ffff:198.51.7.1]:8057",
        ] {
            assert_eq!(
                p.check_socket(peer.parse().unwrap()),
                Err(DenyReason::OwnSocket),
                "{peer}"
            );
        }
        let lab = PeerPolicy::new(
            vec!["127.0.0.0/8".parse().unwrap()],
            vec![],
            vec!["127.0.0.1".parse().unwrap()],
            vec!["127.0.0.1:3478".parse().unwrap()],
            Some((50000, 59999)),
        );
        assert!(lab.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(lab.check_socket("127.0.0.2:40000".parse().unwrap()).is_ok());
        assert_eq!(
            lab.check_socket("127.0.0.1:3478".parse().unwrap()),
            Err(DenyReason::OwnSocket)
        );
        assert_eq!(
            lab.check_socket("127.0.0.1:40000".parse().unwrap()),
            Err(DenyReason::OwnSocket)
        );
        assert!(
            lab.check_socket("[::ffff:127.0.0.1]:50001".parse().unwrap())
                .is_ok()
        );
        // The mapped form of an allowed network is allowed too.
        assert!(lab.check("::ffff:127.0.0.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn operator_networks_allow_and_deny() {
        let p = PeerPolicy::new(
            vec!["10.20.0.0/16".parse().unwrap()],
            vec![
                "8.8.0.0/16".parse().unwrap(),
                "::ffff:10.20.30.0/120".parse().unwrap(),
            ],
            vec![],
            vec![],
            None,
        );
        assert!(p.check("10.20.1.1".parse().unwrap()).is_ok());
        assert!(p.check("::ffff:10.20.1.1".parse().unwrap()).is_ok());
        assert!(p.check("10.21.1.1".parse().unwrap()).is_err());
        assert_eq!(
            p.check("8.8.8.8".parse().unwrap()),
            Err(DenyReason::OperatorDenied)
        );
        assert_eq!(
            p.check("10.20.30.4".parse().unwrap()),
            Err(DenyReason::OperatorDenied)
        );
    }
}
