//! The Web Conferencing Edge end to end: the control service, the agent with `[conferencing]`
//! and the reference conferencing server (which dials the edge's internal port), with
//! participants joining over TLS.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use proto::control::v1::{
    RegisterConferenceRequest, RevokeConferenceRequest, register_conference_request,
};
use rampart_psom::frame::{Frame, RejectReason};
use rampart_tests::conferencing::{self, Joined, request};
use rampart_tests::control::{ControlPki, ControlService, temp_dir};
use rampart_tests::ports::free_port;
use rampart_tests::{Proto, Rampart, RampartConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const KEY: &[u8] = b"correct horse battery staple";

struct Edge {
    pki: ControlPki,
    control: ControlService,
    agent: Rampart,
    external: SocketAddr,
    internal: SocketAddr,
    _dir: tempfile::TempDir,
}

fn loopback_port() -> SocketAddr {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    SocketAddr::new(ip, free_port(Proto::Tcp, ip).unwrap())
}

fn start_edge() -> Edge {
    let dir = temp_dir().unwrap();
    let pki = ControlPki::create(dir.path()).unwrap();
    let control =
        ControlService::start(&pki, &dir.path().join("control"), loopback_port()).unwrap();
    let (external, internal) = (loopback_port(), loopback_port());
    let agent = Rampart::start(
        &RampartConfig::single(Proto::Udp, false)
            .with_control(pki.agent_link(control.address))
            .with_conferencing(conferencing::config(&pki, external, internal))
            .with_stats_interval(1),
    )
    .unwrap();
    Edge {
        pki,
        control,
        agent,
        external,
        internal,
        _dir: dir,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn registration(id: &str, expires_in: u64, anonymous_allowed: bool) -> RegisterConferenceRequest {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    RegisterConferenceRequest {
        conference_id: id.into(),
        session_key: Some(register_conference_request::SessionKey::Key(KEY.to_vec())),
        expires_at_unix: now + expires_in,
        anonymous_allowed,
        max_participants: 0,
    }
}

/// The reference conferencing server, dialling the edge with a pool of `pool` connections.
fn reference_server(
    edge: &Edge,
    pool: usize,
) -> (
    std::sync::Arc<rampart_psom::reference::ConferenceServer>,
    tokio_util::sync::CancellationToken,
) {
    let link = conferencing::edge_link(&edge.pki, edge.internal).unwrap();
    conferencing::start_reference_server(link, pool)
}

/// Joins until admitted (the agent learns of a conference from its control stream shortly
/// after registration), for at most `within`.
async fn admitted(
    edge: &Edge,
    conference: &str,
    anonymous: bool,
    within: Duration,
) -> Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let started = Instant::now();
    loop {
        match conferencing::join(
            &edge.pki,
            edge.external,
            request(conference, KEY, anonymous),
        )
        .await
        .unwrap()
        {
            Joined::Accepted(stream) => return stream,
            Joined::Refused(frame) => {
                assert!(
                    started.elapsed() < within,
                    "{conference}: not admitted within {within:?}: {frame:?}\n{}",
                    edge.agent.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn reason(joined: Joined) -> RejectReason {
    match joined {
        Joined::Refused(Frame::Reject { reason, text }) => {
            assert!(!text.is_empty());
            reason
        }
        Joined::Refused(other) => panic!("refused with {other:?}"),
        Joined::Accepted(_) => panic!("admitted"),
    }
}

async fn read_exactly(stream: &mut (impl tokio::io::AsyncRead + Unpin), len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .expect("bytes arrive in time")
        .expect("the stream stays open");
    buf
}

/// A conference registered through the control API is joinable within a second, and its
/// participants share state through the edge and the reference server.
#[test]
fn a_registered_conference_is_joinable_within_a_second_and_shares_state() {
    let edge = start_edge();
    let rt = runtime();
    rt.block_on(async {
        let (server, shutdown) = reference_server(&edge, 2);
        let mut front_end = edge.pki.front_end(edge.control.address).await.unwrap();
        front_end
            .register_conference(registration("weekly", 600, true))
            .await
            .unwrap();
        let mut alice = admitted(&edge, "weekly", false, Duration::from_secs(1)).await;
        alice.write_all(b"slide 1|").await.unwrap();
        // A guest joining later gets the shared state, then live updates.
        let mut guest =
            match conferencing::join(&edge.pki, edge.external, request("weekly", KEY, true))
                .await
                .unwrap()
            {
                Joined::Accepted(stream) => stream,
                Joined::Refused(frame) => panic!("guest refused: {frame:?}"),
            };
        assert_eq!(read_exactly(&mut guest, 8).await, b"slide 1|");
        alice.write_all(b"ink").await.unwrap();
        assert_eq!(read_exactly(&mut guest, 3).await, b"ink");
        guest.write_all(b"hello").await.unwrap();
        assert_eq!(read_exactly(&mut alice, 5).await, b"hello");
        let stats = server.stats();
        assert_eq!(stats.sessions, 2);
        assert_eq!(stats.bytes_received, 8 + 3 + 5);
        shutdown.cancel();
    });
}

/// Wrong key, expired, revoked, anonymous-not-allowed and unknown conferences are refused,
/// each with its reason, and not a byte reaches the internal side.
#[test]
fn refused_joins_say_why_and_nothing_reaches_the_internal_side() {
    let edge = start_edge();
    let rt = runtime();
    rt.block_on(async {
        let (server, shutdown) = reference_server(&edge, 2);
        let mut front_end = edge.pki.front_end(edge.control.address).await.unwrap();
        for (id, expires_in, anonymous) in [
            ("members", 600, false),
            ("short", 2, true),
            ("cancelled", 600, true),
            ("open", 600, true),
        ] {
            front_end
                .register_conference(registration(id, expires_in, anonymous))
                .await
                .unwrap();
        }
        // Wait until the agent has the conferences (an admitted join proves it) before the
        // revocation: an agent whose first snapshot came after it would never have seen
        // "cancelled", and would call it unknown rather than revoked.
        drop(admitted(&edge, "open", true, Duration::from_secs(5)).await);
        front_end
            .revoke_conference(RevokeConferenceRequest {
                conference_id: "cancelled".into(),
            })
            .await
            .unwrap();
        // Then for the short one to expire (and the revocation to arrive, on the open stream).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let sessions_before = server.stats().sessions;

        let cases = [
            (
                request("members", b"not the key", false),
                RejectReason::WrongKey,
            ),
            (request("short", KEY, true), RejectReason::Expired),
            (request("cancelled", KEY, true), RejectReason::Revoked),
            (
                request("members", KEY, true),
                RejectReason::AnonymousNotAllowed,
            ),
            (
                request("no-such", KEY, true),
                RejectReason::UnknownConference,
            ),
        ];
        for (join, expected) in cases {
            let joined = conferencing::join(&edge.pki, edge.external, join.clone())
                .await
                .unwrap();
            assert_eq!(reason(joined), expected, "{join:?}");
        }
        let stats = server.stats();
        assert_eq!(
            stats.sessions, sessions_before,
            "a refused join reached the server"
        );
        assert_eq!(stats.bytes_received, 0);
        shutdown.cancel();
    });
    // The agent counted each refusal by its reason (on a counters line of the next seconds;
    // lines come each second, later on a loaded machine).
    let reasons = [
        "wrong_key",
        "expired",
        "revoked",
        "anonymous_not_allowed",
        "unknown_conference",
    ];
    let counted = |counters: &serde_json::Value| {
        reasons.iter().all(|name| {
            counters["conferencing"]["joins_rejected"][name]
                .as_u64()
                .unwrap_or(0)
                >= 1
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let counters = loop {
        let last = edge.agent.counters().pop();
        if last.as_ref().is_some_and(counted) || Instant::now() > deadline {
            break last.expect("a counters line");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let rejected = &counters["conferencing"]["joins_rejected"];
    for name in reasons {
        assert!(
            rejected[name].as_u64().unwrap_or(0) >= 1,
            "{name}: {counters}"
        );
    }
}

/// Revoking a conference through the control API disconnects its participants; with no
/// internal server a join gets "service unavailable" after the bounded wait.
#[test]
fn revoking_a_conference_disconnects_its_participants() {
    let edge = start_edge();
    let rt = runtime();
    rt.block_on(async {
        let mut front_end = edge.pki.front_end(edge.control.address).await.unwrap();
        front_end
            .register_conference(registration("board", 600, true))
            .await
            .unwrap();
        // No internal server yet: admitted by key, but nobody to serve it.
        let started = Instant::now();
        let unavailable = loop {
            let joined = conferencing::join(&edge.pki, edge.external, request("board", KEY, true))
                .await
                .unwrap();
            let why = reason(joined);
            if why != RejectReason::UnknownConference {
                break why;
            }
            assert!(started.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(unavailable, RejectReason::ServiceUnavailable);

        // Operators can check the internal port with nc: a text line comes before TLS.
        let mut internal = tokio::net::TcpStream::connect(edge.internal).await.unwrap();
        let banner = read_exactly(&mut internal, 29).await;
        assert_eq!(banner, b"Rampart Web Conferencing Edge");
        drop(internal);

        let (_server, shutdown) = reference_server(&edge, 2);
        let mut participant = admitted(&edge, "board", true, Duration::from_secs(5)).await;
        front_end
            .revoke_conference(RevokeConferenceRequest {
                conference_id: "board".into(),
            })
            .await
            .unwrap();
        let revoked = Instant::now();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(3), participant.read(&mut buf))
            .await
            .expect("the participant is disconnected");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(revoked.elapsed() < Duration::from_secs(2));
        shutdown.cancel();
    });
}

/// Throughput through the edge (TLS on both legs) and join rate; `cargo test --release -p
/// rampart-tests --test conferencing -- --ignored bench --nocapture`. Results belong in
/// docs/benchmarks.md.
#[test]
#[ignore = "a benchmark: run it by hand, in release mode"]
fn bench_conferencing() {
    const MB: usize = 1 << 20;
    const VOLUME: usize = 256 * MB;
    const JOINS: usize = 400;
    let edge = start_edge();
    let rt = runtime();
    rt.block_on(async {
        let (server, shutdown) = reference_server(&edge, 8);
        let mut front_end = edge.pki.front_end(edge.control.address).await.unwrap();
        front_end
            .register_conference(registration("bench", 3600, true))
            .await
            .unwrap();
        drop(admitted(&edge, "bench", true, Duration::from_secs(5)).await);
        // Upload: participant -> edge -> reference server.
        let mut sender = admitted(&edge, "bench", true, Duration::from_secs(5)).await;
        let before = server.stats().bytes_received;
        let chunk = vec![0x5a; 64 * 1024];
        let started = Instant::now();
        let mut sent = 0;
        while sent < VOLUME {
            sender.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        while server.stats().bytes_received - before < VOLUME as u64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let upload = VOLUME as f64 / MB as f64 / started.elapsed().as_secs_f64();
        drop(sender);
        println!("upload, participant -> server (2 TLS legs): {upload:.0} MB/s");

        // Joins: TLS handshake, join, admission, pairing with a pooled internal connection.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let pki = ControlPki {
                    dir: edge.pki.dir.clone(),
                };
                let external = edge.external;
                tokio::spawn(async move {
                    let mut joined = 0;
                    while joined < JOINS / 4 {
                        if let Joined::Accepted(stream) =
                            conferencing::join(&pki, external, request("bench", KEY, true))
                                .await
                                .unwrap()
                        {
                            drop(stream);
                            joined += 1;
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let joins = JOINS as f64 / started.elapsed().as_secs_f64();
        println!("joins: {joins:.0} per second (4 at a time; TLS handshake each)");
        shutdown.cancel();
    });
}
