//! TCP allocations (RFC 6062) to the test's own TCP peer: the connection to the peer leaves
//! from the relayed address, what the peer sends before the ConnectionBind is delivered after
//! it, and a reader slowed down gets every byte in order while the edge's memory stays
//! bounded (back-pressure: the edge stops reading the peer, whose TCP window closes).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use rampart_tests::client::loopback;
use rampart_tests::{PASSWORD, PEER_V4, Proto, Rampart, RampartConfig, USER};

/// What the peer sends.
const TOTAL: usize = 100 << 20;
/// What the client sends with its ConnectionBind: a TLS ClientHello's first bytes, which
/// would fail STUN framing if taken for a frame.
const EARLY: &[u8] = b"\x16\x03\x01\x02\x00 then the client's own protocol";
/// The reader takes at most this per read, then pauses: about 16 MiB/s, several times slower
/// than the edge relays on loopback.
const CHUNK: usize = 64 << 10;
const READ_PAUSE: Duration = Duration::from_millis(4);
/// The whole transfer must end within this (about 7 s at the reader's pace).
const LIMIT: Duration = Duration::from_secs(120);
/// How much the edge's resident memory may grow while the 100 MiB pass. Its own buffers for
/// one spliced pair are 2 x 16 KiB; an edge that queued what the reader has not taken would
/// grow by tens of MiB.
const RSS_GROWTH_BOUND: u64 = 8 << 20;
/// What the kernel may hold for the edge's two sockets of the pair: each socket's receive
/// and send buffers are set to 256 KiB, which the kernel doubles (2 x 2 x 512 KiB), plus
/// its per-skb overhead.
const KERNEL_BOUND: u64 = 3 << 20;

/// Byte `offset` of the stream: the big-endian index of its 8-byte word, so a lost,
/// repeated or reordered stretch is seen.
fn pattern(offset: usize, out: &mut [u8]) {
    for (i, byte) in out.iter_mut().enumerate() {
        let at = offset + i;
        *byte = ((at / 8) as u64).to_be_bytes()[at % 8];
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Bytes queued in the kernel (receive queue plus send queue, `ss`'s skmem r and w) of the
/// edge's established TCP sockets at `local` addresses.
fn kernel_bytes(local: &[SocketAddr]) -> u64 {
    let mut total = 0;
    for address in local {
        let output = Command::new("ss")
            .args(["-tmnH", "state", "established", "src"])
            .arg(address.to_string())
            .output();
        let Ok(output) = output else { return 0 };
        let text = String::from_utf8_lossy(&output.stdout);
        for skmem in text.split("skmem:(").skip(1) {
            let fields = skmem.split(')').next().unwrap_or_default();
            for field in fields.split(',') {
                let value = |prefix: &str| {
                    field
                        .strip_prefix(prefix)
                        .filter(|v| v.chars().all(|c| c.is_ascii_digit()))
                        .and_then(|v| v.parse::<u64>().ok())
                };
                total += value("r").or_else(|| value("w")).unwrap_or(0);
            }
        }
    }
    total
}

#[test]
fn a_slow_reader_gets_every_byte_in_order_and_the_edge_holds_its_memory() {
    let server =
        Rampart::start(&RampartConfig::loopback(&[(Proto::Tcp, loopback(false))])).unwrap();
    let listener = TcpListener::bind((PEER_V4, 0)).unwrap();
    let peer_addr = listener.local_addr().unwrap();
    let mut control = server.client(Proto::Tcp, false).unwrap();
    let allocated = control.allocate_tcp(USER, PASSWORD).unwrap();
    let id = control
        .connect_peer(peer_addr)
        .unwrap()
        .unwrap_or_else(|refused| panic!("Connect refused: {}", refused.describe()));
    // The edge answers once it is connected: the connection is already queued here.
    listener.set_nonblocking(true).unwrap();
    let (mut peer, from) = listener.accept().expect("the edge connected");
    peer.set_nonblocking(false).unwrap();
    assert_eq!(
        from,
        allocated.relayed(),
        "the connection to the peer leaves from the relayed address (RFC 6062 §5.2)"
    );
    // Refused again while this one exists (446).
    let again = control.connect_peer(peer_addr).unwrap();
    assert_eq!(again.err().and_then(|r| r.error_code()), Some(446));

    // What the client sends in the same write as its ConnectionBind reaches the peer, as it is
    // (not taken for frames).
    let mut peer_reader = peer.try_clone().unwrap();
    let reader = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        peer_reader.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut early = vec![0u8; EARLY.len()];
        peer_reader.read_exact(&mut early)?;
        Ok(early)
    });
    // The peer sends everything at once, starting before the client binds.
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut chunk = vec![0u8; CHUNK];
        let mut sent = 0;
        while sent < TOTAL {
            let len = CHUNK.min(TOTAL - sent);
            pattern(sent, &mut chunk[..len]);
            peer.write_all(&chunk[..len])?;
            sent += len;
        }
        peer.shutdown(Shutdown::Write)
    });
    std::thread::sleep(Duration::from_millis(200));
    let baseline = rss_bytes(server.pid());
    assert!(baseline > 0, "the edge's resident memory is readable");
    let (mut data, early) = control.bind_data_connection_pipelined(id, EARLY).unwrap();
    assert_eq!(
        reader
            .join()
            .unwrap()
            .expect("the peer read the client's early bytes"),
        EARLY
    );
    // The edge's sockets of the pair: the peer connection at the relayed address, the data
    // connection at its listener's (with the idle control connection).
    let edge_sockets = [allocated.relayed(), server.loopback_addr(Proto::Tcp, false)];

    let started = Instant::now();
    let mut received = 0;
    let mut expected = vec![0u8; CHUNK.max(early.len())];
    let mut check = |bytes: &[u8], received: &mut usize| {
        pattern(*received, &mut expected[..bytes.len()]);
        assert!(
            bytes == &expected[..bytes.len()],
            "bytes {}..{} differ from what the peer sent",
            *received,
            *received + bytes.len()
        );
        *received += bytes.len();
    };
    check(&early, &mut received);
    let mut buf = vec![0u8; CHUNK];
    let (mut peak_rss, mut peak_kernel) = (0u64, 0u64);
    let mut reads = 0u64;
    while received < TOTAL {
        assert!(
            started.elapsed() < LIMIT,
            "{received} of {TOTAL} bytes after {LIMIT:?}"
        );
        let n = data.read(&mut buf).unwrap();
        assert!(n > 0, "the edge closed after {received} of {TOTAL} bytes");
        check(&buf[..n], &mut received);
        reads += 1;
        if reads.is_multiple_of(16) {
            peak_rss = peak_rss.max(rss_bytes(server.pid()));
        }
        if reads.is_multiple_of(128) {
            peak_kernel = peak_kernel.max(kernel_bytes(&edge_sockets));
        }
        std::thread::sleep(READ_PAUSE);
    }
    let took = started.elapsed();
    writer.join().unwrap().expect("the peer sent everything");
    // The peer's end of stream comes through too.
    assert_eq!(
        data.read(&mut buf).unwrap(),
        0,
        "end of stream after {TOTAL} bytes"
    );
    let growth = peak_rss.saturating_sub(baseline);
    eprintln!(
        "100 MiB through a TCP allocation to a slow reader in {took:.1?} ({:.1} MiB/s): edge RSS \
         {} KiB at the bind, peak growth {} KiB; peak kernel queue on its two sockets {} KiB",
        TOTAL as f64 / (1 << 20) as f64 / took.as_secs_f64(),
        baseline / 1024,
        growth / 1024,
        peak_kernel / 1024,
    );
    assert!(
        growth <= RSS_GROWTH_BOUND,
        "the edge's memory grew by {growth} bytes (bound {RSS_GROWTH_BOUND})"
    );
    assert!(
        peak_kernel <= KERNEL_BOUND,
        "the kernel held {peak_kernel} bytes for the edge's sockets (bound {KERNEL_BOUND})"
    );
    assert!(
        peak_kernel > 0,
        "the kernel memory probe saw the edge's sockets"
    );
}
