//! What the real binary refuses, and that refusing costs it nothing.
//!
//! - With the default peer policy (no allowed networks), peers on special-purpose addresses
//!   (IPv4-mapped loopback, 0.0.0.0, ::, the cloud metadata address 169.254.169.254, ...)
//!   get 403 on CreatePermission and ChannelBind, and Send indications to them reach
//!   nothing. That part runs in a network namespace of its own, with sockets listening on
//!   those addresses to catch anything the server would wrongly send: a bug cannot send a
//!   packet anywhere real.
//! - Wrong credentials get 401.
//! - Malformed datagrams never get an answer larger than themselves (no amplification), and
//!   the server keeps serving.
//! - Garbage on a TCP connection closes that connection only.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rampart_tests::netns::{self, Netns};
use rampart_tests::{
    PASSWORD, PEER_V4, Proto, REALM, RECV_TIMEOUT, REST_SECRET, Rampart, RampartConfig, USER,
};
use rampart_turn::auth::credentials::rest_password;
use rampart_turn::channel_data::ChannelData;
use rampart_turn::stun::{
    AddressFamily, Attribute, Class, Message, MessageBuilder, Method, PasswordAlgorithm,
    TransactionId, attr_type, long_term_key,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// How long a datagram that should not arrive is waited for. Loopback delivers in
/// microseconds; this is generous and still keeps the suite fast.
const QUIET: Duration = Duration::from_millis(500);

const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// A global unicast address given to the namespace's loopback: the allowed control peer
/// that proves the relay does send in this setup. Nothing leaves the namespace, which has
/// no interface but its loopback.
const CONTROL_PEER: Ipv4Addr = Ipv4Addr::new(198, 51, 7, 1);

#[test]
fn forbidden_peers_get_403_and_nothing_reaches_them() {
    if !netns::can_create("negative::forbidden_peers_get_403_and_nothing_reaches_them") {
        return;
    }
    let ns = Netns::create().expect("namespace");
    ns.add_loopback_address(&format!("{METADATA}/32")).unwrap();
    ns.add_loopback_address(&format!("{CONTROL_PEER}/32"))
        .unwrap();
    ns.run(forbidden_peers_in_namespace);
}

fn forbidden_peers_in_namespace() {
    let config = RampartConfig::single(Proto::Udp, false).with_default_peer_policy();
    let server = Rampart::start(&config).expect("start rampart");

    // Where a wrongly relayed datagram would land in this namespace.
    let v4 = Observer::bind(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let v6 = Observer::bind(IpAddr::V6(Ipv6Addr::LOCALHOST));
    let metadata = Observer::bind(IpAddr::V4(METADATA));
    let control = Observer::bind(IpAddr::V4(CONTROL_PEER));
    let mapped_loopback = SocketAddr::new(
        IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
        v4.addr.port(),
    );
    // Each forbidden target and the observer it would reach.
    let v4_targets: [(SocketAddr, &Observer); 4] = [
        (mapped_loopback, &v4),
        (
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), v4.addr.port()),
            &v4,
        ),
        (metadata.addr, &metadata),
        (v4.addr, &v4),
    ];
    let v6_targets: [(SocketAddr, &Observer); 3] = [
        (
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), v6.addr.port()),
            &v6,
        ),
        (v6.addr, &v6),
        (mapped_loopback, &v4),
    ];

    // The observers work: each target, sent to directly from a loopback socket as the
    // relay's would be, reaches its observer. So silence later means the server sent nothing.
    let direct4 = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let direct6 = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
    for (target, observer) in v4_targets.iter().chain(&v6_targets) {
        let canonical = SocketAddr::new(target.ip().to_canonical(), target.port());
        let socket = if canonical.is_ipv4() {
            &direct4
        } else {
            &direct6
        };
        socket.send_to(b"sanity", canonical).unwrap();
        assert_eq!(
            observer.recv().as_deref(),
            Some(&b"sanity"[..]),
            "a datagram to {target} should reach the observer at {}",
            observer.addr
        );
    }

    let mut client4 = server.client(Proto::Udp, false).unwrap();
    let relayed4 = client4
        .allocate(USER, PASSWORD, AddressFamily::V4)
        .unwrap()
        .relayed();
    let mut client6 = server.client(Proto::Udp, false).unwrap();
    client6.allocate(USER, PASSWORD, AddressFamily::V6).unwrap();

    let mut channel = 0x4000;
    for (client, targets) in [
        (&mut client4, &v4_targets[..]),
        (&mut client6, &v6_targets[..]),
    ] {
        for (target, _) in targets {
            let response = client.try_create_permission(&[*target]).unwrap();
            assert_eq!(
                response.error_code(),
                Some(403),
                "CreatePermission {target}: {}",
                response.describe()
            );
            let response = client.try_channel_bind(channel, *target).unwrap();
            assert_eq!(
                response.error_code(),
                Some(403),
                "ChannelBind {target}: {}",
                response.describe()
            );
            client.send_indication(*target, b"must not arrive").unwrap();
            // The refused channel must not carry data either.
            client
                .send_channel_data(channel, b"must not arrive")
                .unwrap();
            channel += 1;
        }
    }
    for observer in [&v4, &v6, &metadata] {
        assert_eq!(
            observer.recv_quiet(),
            None,
            "the relay sent to a forbidden peer (observer {})",
            observer.addr
        );
    }

    // Inbound: a forbidden peer cannot reach the client either (no permission exists).
    direct4.send_to(b"knock knock", relayed4).unwrap();
    assert_eq!(client4.recv(QUIET).unwrap(), None);

    // Control: a public peer is allowed by the default policy and is reached, so the silence
    // above is the policy at work, not a relay that sends nothing.
    client4.create_permission(&[control.addr]).unwrap();
    client4.send_indication(control.addr, b"allowed").unwrap();
    assert_eq!(control.recv().as_deref(), Some(&b"allowed"[..]));
}

#[test]
fn wrong_credentials_get_401() {
    let server = Rampart::start(&RampartConfig::single(Proto::Udp, false)).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = format!("{}:rest-user", now - 60);
    let fresh = format!("{}:rest-user", now + 3600);
    let cases = [
        (
            "wrong password",
            USER.to_owned(),
            "not-the-password".to_owned(),
        ),
        ("unknown user", "mallory".to_owned(), PASSWORD.to_owned()),
        (
            "expired REST credential",
            expired.clone(),
            rest_password(REST_SECRET.as_bytes(), &expired),
        ),
        (
            "REST credential from another secret",
            fresh.clone(),
            rest_password(b"some-other-secret-of-16+", &fresh),
        ),
    ];
    for (what, username, password) in cases {
        let mut client = server.client(Proto::Udp, false).unwrap();
        let response = client.try_allocate(&username, &password, &[]).unwrap();
        assert_eq!(
            response.error_code(),
            Some(401),
            "{what}: {}",
            response.describe()
        );
        let message = response.message();
        assert!(
            message.realm().is_some() && message.nonce().is_some(),
            "{what}: a 401 carries REALM and NONCE for the next attempt"
        );
        assert_eq!(
            message.xor_relayed_addresses().count(),
            0,
            "{what}: no relay on a refusal"
        );
    }
    // Refusals lock nobody out: the right password still works.
    let mut client = server.client(Proto::Udp, false).unwrap();
    client
        .allocate(USER, PASSWORD, AddressFamily::V4)
        .expect("the right password after wrong ones");
}

/// Every datagram of a seeded corpus of malformed input is sent over UDP; whatever comes
/// back must answer one of them (same transaction id) and be no larger than it, so the
/// server cannot be used to amplify a spoofed flood. Afterwards it still serves.
#[test]
fn malformed_datagrams_are_not_amplified_and_the_server_survives() {
    // The per-source limiter would drop most answers and could hide an amplification; lift
    // it so every answer the server would give is seen.
    let config = RampartConfig::single(Proto::Udp, false)
        .with_limit("unauthenticated_per_second", "1000000.0")
        .with_limit("unauthenticated_burst", "1000000.0");
    let server = Rampart::start(&config).unwrap();
    let target = server.loopback_addr(Proto::Udp, false);
    let corpus = malformed_corpus(0x5eed_7e57);
    assert!(corpus.len() > 1000, "corpus of {}", corpus.len());

    // Requests by transaction id, so each answer maps to what provoked it.
    let mut by_id: HashMap<[u8; 12], usize> = HashMap::new();
    for datagram in &corpus {
        if let Some(id) = datagram.get(8..20) {
            let id: [u8; 12] = id.try_into().unwrap();
            let longest = by_id.entry(id).or_default();
            *longest = (*longest).max(datagram.len());
        }
    }

    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    socket.connect(target).unwrap();
    let mut answers = Vec::new();
    for burst in corpus.chunks(16) {
        for datagram in burst {
            socket.send(datagram).unwrap();
        }
        // Small bursts with a pause keep the server's receive buffer from overflowing, so
        // the corpus is really processed rather than dropped by the kernel.
        drain(&socket, Duration::from_millis(2), &mut answers);
    }
    drain(&socket, QUIET, &mut answers);

    for answer in &answers {
        let id: [u8; 12] = answer
            .get(8..20)
            .and_then(|id| id.try_into().ok())
            .unwrap_or_else(|| panic!("answer of {} bytes without a header", answer.len()));
        let Some(&request_len) = by_id.get(&id) else {
            panic!("answer to nothing we sent: {answer:02x?}");
        };
        assert!(
            answer.len() <= request_len,
            "amplification: {} byte answer to a {request_len} byte malformed datagram: {answer:02x?}",
            answer.len()
        );
        let message = Message::parse(answer).expect("answers are well-formed STUN");
        assert_eq!(
            message.class,
            Class::ErrorResponse,
            "only errors answer garbage"
        );
    }

    // Still alive and serving: a Binding and a whole allocation.
    let mut client = server.client(Proto::Udp, false).unwrap();
    let mapped = client.binding().expect("Binding after the corpus");
    assert_eq!(mapped, client.local_addr());
    client
        .allocate(USER, PASSWORD, AddressFamily::V4)
        .expect("Allocate after the corpus");
}

/// A stream that is neither STUN nor ChannelData cannot be resynchronised (RFC 8656 §12.5);
/// the server closes that connection and keeps serving others.
#[test]
fn garbage_on_a_stream_closes_only_that_connection() {
    let server = Rampart::start(&RampartConfig::single(Proto::Tcp, false)).unwrap();
    let addr = server.loopback_addr(Proto::Tcp, false);
    let mut healthy = server.client(Proto::Tcp, false).unwrap();
    healthy.allocate(USER, PASSWORD, AddressFamily::V4).unwrap();

    for garbage in [
        &[0xFFu8; 64][..], // leading bits 11: neither STUN nor ChannelData
        &[0x00, 0x01, 0x00, 0x03, 0x21, 0x12, 0xA4, 0x42][..], // STUN length not a multiple of 4
        &[0x00, 0x01, 0x00, 0x08, 0xDE, 0xAD, 0xBE, 0xEF][..], // bad magic cookie
        &[0x80, 0x00, 0x00, 0x04, 0, 0, 0, 0][..], // channel 0x8000
    ] {
        let mut stream = TcpStream::connect_timeout(&addr, RECV_TIMEOUT).unwrap();
        stream.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
        stream.write_all(garbage).unwrap();
        let mut buf = [0u8; 512];
        let mut received = 0;
        let closed = loop {
            match stream.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => received += n,
                // A reset is a close too.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
            if received > garbage.len() {
                break false;
            }
        };
        assert!(
            closed && received <= garbage.len(),
            "garbage {garbage:02x?}: the connection should be closed with no more than {} bytes \
             sent back (got {received}, closed: {closed})",
            garbage.len()
        );
    }

    // A request and garbage in one segment: the request is still answered, then the
    // connection closes.
    let mut stream = TcpStream::connect_timeout(&addr, RECV_TIMEOUT).unwrap();
    stream.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
    let mut segment =
        MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([7; 12])).finish();
    segment.extend_from_slice(&[0xFF; 16]);
    stream.write_all(&segment).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let response = Message::parse(&answer).expect("the Binding response, before the close");
    assert_eq!(
        (response.method, response.class),
        (Method::BINDING, Class::SuccessResponse)
    );

    // The allocation on the healthy connection is untouched.
    assert!(
        healthy.refresh(600).is_ok(),
        "the healthy connection keeps working"
    );
}

/// ChannelBind rules of RFC 8656 §12.1 against the binary: numbers outside the range,
/// a number already bound to another peer, and a peer already bound to another number are
/// 400; requests without an allocation are 437.
#[test]
fn channel_bind_rules() {
    let server = Rampart::start(&RampartConfig::single(Proto::Udp, false)).unwrap();
    let mut client = server.client(Proto::Udp, false).unwrap();
    let peer_a = UdpSocket::bind((PEER_V4, 0)).unwrap();
    let peer_b = UdpSocket::bind((PEER_V4, 0)).unwrap();
    let a = peer_a.local_addr().unwrap();
    let b = peer_b.local_addr().unwrap();

    // Authenticated, but the allocation is gone: 437 Allocation Mismatch.
    let mut fresh = server.client(Proto::Udp, false).unwrap();
    fresh.allocate(USER, PASSWORD, AddressFamily::V4).unwrap();
    fresh.refresh(0).unwrap();
    assert_eq!(
        fresh.try_channel_bind(0x4000, a).unwrap().error_code(),
        Some(437)
    );

    client.allocate(USER, PASSWORD, AddressFamily::V4).unwrap();
    for bad in [0x0000, 0x3FFF, 0x8000, 0xFFFF] {
        let response = client.try_channel_bind(bad, a).unwrap();
        assert_eq!(
            response.error_code(),
            Some(400),
            "channel {bad:#06x}: {}",
            response.describe()
        );
    }
    client.channel_bind(0x4000, a).unwrap();
    // Rebinding the same pair refreshes it.
    client.channel_bind(0x4000, a).unwrap();
    let response = client.try_channel_bind(0x4000, b).unwrap();
    assert_eq!(
        response.error_code(),
        Some(400),
        "number bound to another peer"
    );
    let response = client.try_channel_bind(0x4001, a).unwrap();
    assert_eq!(
        response.error_code(),
        Some(400),
        "peer bound to another number"
    );

    // ChannelData on a number never bound goes nowhere.
    client.send_channel_data(0x4002, b"unbound").unwrap();
    peer_a.set_read_timeout(Some(QUIET)).unwrap();
    peer_b.set_read_timeout(Some(QUIET)).unwrap();
    let mut buf = [0u8; 64];
    assert!(peer_a.recv_from(&mut buf).is_err() && peer_b.recv_from(&mut buf).is_err());
}

/// A UDP socket that records whether anything arrives.
struct Observer {
    socket: UdpSocket,
    addr: SocketAddr,
}

impl Observer {
    fn bind(ip: IpAddr) -> Observer {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0))
            .unwrap_or_else(|e| panic!("bind an observer on {ip}: {e}"));
        let addr = socket.local_addr().unwrap();
        Observer { socket, addr }
    }

    fn recv(&self) -> Option<Vec<u8>> {
        self.recv_within(RECV_TIMEOUT)
    }

    fn recv_quiet(&self) -> Option<Vec<u8>> {
        self.recv_within(QUIET)
    }

    fn recv_within(&self, wait: Duration) -> Option<Vec<u8>> {
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, _) = self.socket.recv_from(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }
}

/// Collects datagrams until none has arrived for `quiet`.
fn drain(socket: &UdpSocket, quiet: Duration, into: &mut Vec<Vec<u8>>) {
    socket.set_read_timeout(Some(quiet)).unwrap();
    let deadline = Instant::now() + RECV_TIMEOUT;
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => into.push(buf[..n].to_vec()),
            Err(_) => return,
        }
    }
}

/// Malformed input, reproducible from `seed`: truncations of valid requests, random bytes,
/// valid headers over random bodies, wrong length fields, attribute overruns, bad
/// FINGERPRINTs, and broken ChannelData. Datagrams that happen to be well-formed (by
/// Rampart's own codec) are left out: answering those is not amplification.
fn malformed_corpus(seed: u64) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let id = |rng: &mut StdRng| {
        let mut id = [0u8; 12];
        rng.fill_bytes(&mut id);
        TransactionId(id)
    };

    // Truncations of an authenticated Allocate and of a Binding, each with its own
    // transaction id so an answer names the truncation it answers.
    let key = long_term_key(USER, REALM, PASSWORD, PasswordAlgorithm::Md5);
    let allocate = |id: TransactionId| {
        let mut b = MessageBuilder::new(Class::Request, Method::ALLOCATE, id);
        b.add(&Attribute::Username(USER))
            .add(&Attribute::Realm(REALM))
            .add(&Attribute::Nonce("0123456789abcdef"))
            .add(&Attribute::RequestedTransport(17))
            .add(&Attribute::Lifetime(600))
            .add_message_integrity(&key)
            .add_fingerprint();
        b.finish()
    };
    let binding = |id: TransactionId| {
        let mut b = MessageBuilder::new(Class::Request, Method::BINDING, id);
        b.add(&Attribute::Software("rampart negative test"))
            .add_fingerprint();
        b.finish()
    };
    let full = allocate(id(&mut rng)).len();
    for len in 0..full {
        corpus.push(allocate(id(&mut rng))[..len].to_vec());
    }
    let full = binding(id(&mut rng)).len();
    for len in 0..full {
        corpus.push(binding(id(&mut rng))[..len].to_vec());
    }

    // Random bytes.
    for _ in 0..500 {
        let len = rng.gen_range(0..=700);
        let mut datagram = vec![0u8; len];
        rng.fill_bytes(&mut datagram);
        corpus.push(datagram);
    }

    // A valid request header (random method) over a random body of the declared length.
    for _ in 0..500 {
        let method = Method(rng.gen_range(0..0x1000));
        let mut datagram = MessageBuilder::new(Class::Request, method, id(&mut rng)).finish();
        let body_len = rng.gen_range(1..=64) * 4;
        datagram.resize(20 + body_len, 0);
        rng.fill_bytes(&mut datagram[20..]);
        datagram[2..4].copy_from_slice(&(body_len as u16).to_be_bytes());
        corpus.push(datagram);
    }

    // Length fields that lie: not a multiple of 4, longer or shorter than the datagram.
    let base_len = binding(id(&mut rng)).len() - 20;
    for declared in [
        base_len + 1,
        base_len + 2,
        base_len + 3,
        base_len + 4,
        base_len.saturating_sub(4),
        base_len.saturating_sub(8),
        0,
        0xFFFC,
        0xFFFF,
    ] {
        let mut datagram = binding(id(&mut rng));
        datagram[2..4].copy_from_slice(&(declared as u16).to_be_bytes());
        corpus.push(datagram);
    }

    // An attribute running past the end of the message.
    for overrun in [4u16, 8, 100, 0xFFF0] {
        let mut datagram =
            MessageBuilder::new(Class::Request, Method::ALLOCATE, id(&mut rng)).finish();
        datagram.extend_from_slice(&attr_type::USERNAME.to_be_bytes());
        datagram.extend_from_slice(&(4 + overrun).to_be_bytes());
        datagram.extend_from_slice(b"evil");
        let body = (datagram.len() - 20) as u16;
        datagram[2..4].copy_from_slice(&body.to_be_bytes());
        corpus.push(datagram);
    }

    // More attributes than the parser walks.
    let mut datagram = MessageBuilder::new(Class::Request, Method::BINDING, id(&mut rng)).finish();
    for _ in 0..200 {
        datagram.extend_from_slice(&[0x80, 0x99, 0x00, 0x00]); // optional, empty
    }
    let body = (datagram.len() - 20) as u16;
    datagram[2..4].copy_from_slice(&body.to_be_bytes());
    corpus.push(datagram);

    // A FINGERPRINT that does not match, and an attribute after FINGERPRINT.
    let mut datagram = binding(id(&mut rng));
    let last = datagram.len() - 1;
    datagram[last] ^= 0x01;
    corpus.push(datagram);
    let mut datagram = binding(id(&mut rng));
    datagram.extend_from_slice(&[0x80, 0x22, 0x00, 0x04, b'l', b'a', b't', b'e']);
    let body = (datagram.len() - 20) as u16;
    datagram[2..4].copy_from_slice(&body.to_be_bytes());
    corpus.push(datagram);

    // Malformed attribute values inside an otherwise valid request.
    for (kind, value) in [
        (attr_type::XOR_PEER_ADDRESS, &[0x00, 0x07, 0x12, 0x34][..]), // bad family, short
        (attr_type::XOR_MAPPED_ADDRESS, &[0x00, 0x01, 0x12][..]),
        (attr_type::REQUESTED_TRANSPORT, &[17][..]),
        (attr_type::LIFETIME, &[0, 0][..]),
        (attr_type::MESSAGE_INTEGRITY, &[0u8; 7][..]),
        (attr_type::ERROR_CODE, &[0, 0, 9, 99][..]),
        (attr_type::USERNAME, &[0xFF, 0xFE, 0xFD][..]), // not UTF-8
    ] {
        let mut datagram =
            MessageBuilder::new(Class::Request, Method::ALLOCATE, id(&mut rng)).finish();
        datagram.extend_from_slice(&kind.to_be_bytes());
        datagram.extend_from_slice(&(value.len() as u16).to_be_bytes());
        datagram.extend_from_slice(value);
        datagram.resize(20 + (datagram.len() - 20).div_ceil(4) * 4, 0);
        let body = (datagram.len() - 20) as u16;
        datagram[2..4].copy_from_slice(&body.to_be_bytes());
        corpus.push(datagram);
    }

    // ChannelData that lies about its length, or is only a header.
    corpus.push(vec![0x40, 0x00, 0xFF, 0xFF, 1, 2, 3, 4]);
    corpus.push(vec![0x40, 0x00]);
    corpus.push(vec![0x4F, 0xFF, 0x00, 0x08, 1, 2, 3]);
    corpus.push(vec![0x80, 0x00, 0x00, 0x00]);

    corpus.retain(|d| Message::parse(d).is_err() && !is_valid_channel_data(d));
    corpus
}

fn is_valid_channel_data(datagram: &[u8]) -> bool {
    ChannelData::looks_like_channel_data(datagram) && ChannelData::parse(datagram).is_ok()
}
