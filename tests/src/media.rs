//! Media over bound TURN channels between a [`TurnClient`] and a UDP peer, and the accounting
//! of it, for the XDP fast path's end-to-end tests (`xdp_topology`, `xdp_restart`).
//!
//! - [`client_to_peer`] / [`peer_to_client`]: one direction of one channel's media, from a
//!   sending and a receiving thread, with a bounded window in flight (so no socket buffer on
//!   the way can overflow and a loss is the relay's) and bounded in time; every message must
//!   arrive exactly once, byte for byte.
//! - [`messages`]: distinct messages of the lengths in [`LENGTHS`].
//! - [`next_counters`], [`number`], [`xdp_stats`]: the agent's `counters` log line
//!   (`--stats-interval`); [`Flow`] / [`Expect`]: what the media should have moved in the
//!   userspace relay counters (data bytes) and in the XDP program's (frame bytes).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Rampart, Received, TurnClient};

/// Data lengths, used in turn: a 1-byte message (a frame under Ethernet's 60-byte minimum),
/// lengths that are not multiples of 4 (ChannelData padding), a voice-sized and a
/// video-sized one.
pub const LENGTHS: [usize; 5] = [1, 3, 63, 160, 1201];
/// Messages in flight at most: the sender waits for the receiver beyond this, so no socket
/// buffer on the way can overflow and a loss is the relay's.
const WINDOW: usize = 16;
/// Bounds one direction of one channel's media (a healthy one takes milliseconds).
const PHASE_LIMIT: Duration = Duration::from_secs(10);
/// A phase that received nothing for this long has stalled: a failure, reported at once.
const STALL_LIMIT: Duration = Duration::from_secs(2);
/// Bounds the wait for the next `counters` line (logged every second when something changed).
pub const COUNTERS_WAIT: Duration = Duration::from_secs(5);

pub const ETHERNET: u64 = 14;
pub const UDP_HEADER: u64 = 8;
pub const CHANNEL_HEADER: u64 = 4;

/// IPv4 or IPv6 header without options or extension headers.
pub fn ip_header(v6: bool) -> u64 {
    if v6 { 40 } else { 20 }
}

/// One bound channel of an allocation: its number, the peer's socket, the relay address the
/// peer talks to.
pub struct Channel {
    pub number: u16,
    pub peer: UdpSocket,
    pub relayed: SocketAddr,
}

/// Client -> peer: ChannelData on `channel`, received by the peer from the relay address.
pub fn client_to_peer(
    client: &mut TurnClient,
    channel: &Channel,
    messages: &[Vec<u8>],
) -> Result<(), String> {
    let progress = Progress::new(messages.len());
    let what = format!("client -> peer on channel {:#06x}", channel.number);
    let (sent, got) = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 2048];
            let _ = channel
                .peer
                .set_read_timeout(Some(Duration::from_millis(50)));
            while progress.keep_receiving() {
                if let Ok((n, from)) = channel.peer.recv_from(&mut buf) {
                    got.push((from, buf[..n].to_vec()));
                    progress.received();
                }
            }
            got
        });
        let sent = progress.send_all(messages, |m| {
            client
                .send_channel_data(channel.number, m)
                .map_err(|e| format!("{e:#}"))
        });
        (sent, receiver.join().expect("receiver thread"))
    });
    sent.map_err(|e| format!("{what}: {e}"))?;
    if let Some((from, _)) = got.iter().find(|(from, _)| *from != channel.relayed) {
        return Err(format!(
            "{what}: a datagram came from {from}, not from the relay address {}",
            channel.relayed
        ));
    }
    compare(
        &what,
        messages,
        got.into_iter().map(|(_, data)| data).collect(),
    )
}

/// Peer -> client: datagrams to the relay address, received as ChannelData on `channel`.
pub fn peer_to_client(
    client: &mut TurnClient,
    channel: &Channel,
    messages: &[Vec<u8>],
) -> Result<(), String> {
    let progress = Progress::new(messages.len());
    let what = format!("peer -> client on channel {:#06x}", channel.number);
    let (sent, got) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            progress.send_all(messages, |m| {
                channel
                    .peer
                    .send_to(m, channel.relayed)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        });
        let mut got = Vec::new();
        let mut problem = None;
        while progress.keep_receiving() {
            match client.recv(Duration::from_millis(50)) {
                Ok(Some(Received::Channel { channel: n, data })) if n == channel.number => {
                    got.push(data);
                    progress.received();
                }
                Ok(Some(other)) => {
                    problem = Some(format!("unexpected relayed message {other:?}"));
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    problem = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        let sent = sender.join().expect("sender thread");
        (problem.map_or(sent, Err), got)
    });
    sent.map_err(|e| format!("{what}: {e}"))?;
    compare(&what, messages, got)
}

/// One direction of media between a sending and a receiving thread: how much arrived, and
/// when to give up.
struct Progress {
    expected: usize,
    received: AtomicUsize,
    sender_done: AtomicBool,
    started: Instant,
    /// Milliseconds after `started` of the last arrival (or of the start).
    last_arrival_ms: AtomicU64,
}

impl Progress {
    fn new(expected: usize) -> Self {
        Progress {
            expected,
            received: AtomicUsize::new(0),
            sender_done: AtomicBool::new(false),
            started: Instant::now(),
            last_arrival_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn received(&self) {
        self.received.fetch_add(1, Ordering::AcqRel);
        self.last_arrival_ms.store(self.now_ms(), Ordering::Release);
    }

    fn stalled(&self) -> bool {
        let quiet = self
            .now_ms()
            .saturating_sub(self.last_arrival_ms.load(Ordering::Acquire));
        Duration::from_millis(quiet) >= STALL_LIMIT || self.started.elapsed() >= PHASE_LIMIT
    }

    /// For the receiver: false once everything arrived, or the sender is done and nothing
    /// came for [`STALL_LIMIT`], or time is up.
    fn keep_receiving(&self) -> bool {
        self.received.load(Ordering::Acquire) < self.expected
            && !(self.sender_done.load(Ordering::Acquire) && self.stalled())
            && self.started.elapsed() < PHASE_LIMIT
    }

    /// Sends every message, keeping at most [`WINDOW`] unreceived; gives up when nothing
    /// arrives for [`STALL_LIMIT`].
    fn send_all(
        &self,
        messages: &[Vec<u8>],
        mut send: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        let outcome = (|| {
            for (sent, message) in messages.iter().enumerate() {
                while sent - self.received.load(Ordering::Acquire).min(sent) >= WINDOW {
                    if self.stalled() {
                        return Err(format!(
                            "stalled: {sent} sent, {} received, nothing more within {STALL_LIMIT:?}",
                            self.received.load(Ordering::Acquire)
                        ));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                send(message)?;
            }
            Ok(())
        })();
        self.sender_done.store(true, Ordering::Release);
        outcome
    }
}

/// Every message arrived exactly once, bytes exact (in any order).
pub fn compare(what: &str, sent: &[Vec<u8>], mut got: Vec<Vec<u8>>) -> Result<(), String> {
    let count = got.len();
    let mut expected = sent.to_vec();
    expected.sort();
    got.sort();
    if got == expected {
        return Ok(());
    }
    let missing = expected.iter().filter(|m| !got.contains(m)).count();
    let unexpected = got.iter().filter(|m| !expected.contains(m)).count();
    let lengths: BTreeMap<usize, usize> =
        expected
            .iter()
            .filter(|m| !got.contains(m))
            .fold(BTreeMap::new(), |mut acc, m| {
                *acc.entry(m.len()).or_default() += 1;
                acc
            });
    Err(format!(
        "{what}: {count} of {} arrived; {missing} missing (by length: {lengths:?}), {unexpected} \
         not sent (or altered)",
        sent.len()
    ))
}

/// `count` messages of the lengths in [`LENGTHS`], each distinct: a tag, the index, a pattern.
pub fn messages(tag: u8, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let len = LENGTHS[i % LENGTHS.len()];
            let index = u16::try_from(i).expect("few messages").to_be_bytes();
            let head = [tag, index[0], index[1]];
            (0..len)
                .map(|j| {
                    head.get(j)
                        .copied()
                        .unwrap_or_else(|| u8::try_from((i * 31 + j * 7) % 251).expect("below 251"))
                })
                .collect()
        })
        .collect()
}

/// Waits for a `counters` line logged after this call: it reflects everything the agent did
/// before the call (the line is computed and written under the agent's state lock).
pub fn next_counters(server: &Rampart) -> Result<Value, String> {
    let seen = server.counters().len();
    let deadline = Instant::now() + COUNTERS_WAIT;
    loop {
        let mut lines = server.counters();
        if lines.len() > seen {
            return Ok(lines.pop().expect("non-empty"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no new `counters` line within {COUNTERS_WAIT:?} (--stats-interval 1)"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn number(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |v, key| &v[*key])
        .as_u64()
        .unwrap_or_else(|| panic!("counters line without {path:?}: {v}"))
}

/// The `xdp` slots of a counters line: name -> (packets, bytes).
pub fn xdp_stats(v: &Value) -> BTreeMap<String, (u64, u64)> {
    v["xdp"]
        .as_array()
        .map(|slots| {
            slots
                .iter()
                .filter_map(|slot| {
                    Some((
                        slot[0].as_str()?.to_owned(),
                        (slot[1].as_u64()?, slot[2].as_u64()?),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub to_peer: Count,
    pub to_client: Count,
}

impl std::ops::Add for Count {
    type Output = Count;

    fn add(self, other: Count) -> Count {
        Count {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
        }
    }
}

impl std::ops::Add for Flow {
    type Output = Flow;

    fn add(self, other: Flow) -> Flow {
        Flow {
            to_peer: self.to_peer + other.to_peer,
            to_client: self.to_client + other.to_client,
        }
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "to peer {} pkts / {} B, to client {} pkts / {} B",
            self.to_peer.packets, self.to_peer.bytes, self.to_client.packets, self.to_client.bytes
        )
    }
}

#[derive(Default)]
pub struct Expected {
    pub packets: u64,
    pub data_bytes: u64,
    pub frame_bytes: u64,
}

impl Expected {
    pub fn add(&mut self, data: u64, frame: u64) {
        self.packets += 1;
        self.data_bytes += data;
        self.frame_bytes += frame;
    }
}

#[derive(Default)]
pub struct Expect {
    pub to_peer: Expected,
    pub to_client: Expected,
}

impl Expect {
    /// What userspace counts of the media: data bytes.
    pub fn data(&self) -> Flow {
        Flow {
            to_peer: Count {
                packets: self.to_peer.packets,
                bytes: self.to_peer.data_bytes,
            },
            to_client: Count {
                packets: self.to_client.packets,
                bytes: self.to_client.data_bytes,
            },
        }
    }
}

impl Expect {
    /// Accounts for media both ways on one channel: `outbound` from a client of family
    /// `client_v6`, `inbound` from a peer of the relay address's family.
    pub fn record(
        &mut self,
        client_v6: bool,
        channel: &Channel,
        outbound: &[Vec<u8>],
        inbound: &[Vec<u8>],
    ) {
        for m in outbound {
            let len = m.len() as u64;
            self.to_peer.add(
                len,
                ETHERNET + ip_header(client_v6) + UDP_HEADER + CHANNEL_HEADER + len,
            );
        }
        for m in inbound {
            let len = m.len() as u64;
            self.to_client.add(
                len,
                ETHERNET + ip_header(channel.relayed.is_ipv6()) + UDP_HEADER + len,
            );
        }
    }

    /// What the XDP program counts of the media: frames as received.
    pub fn frames(&self) -> Flow {
        Flow {
            to_peer: Count {
                packets: self.to_peer.packets,
                bytes: self.to_peer.frame_bytes,
            },
            to_client: Count {
                packets: self.to_client.packets,
                bytes: self.to_client.frame_bytes,
            },
        }
    }
}

/// What the agent's userspace relay moved between two `counters` lines.
pub fn userspace_delta(before: &Value, after: &Value) -> Flow {
    let relay = |v: &Value, key: &str| number(v, &["relay", key]);
    let delta = |key: &str| relay(after, key).wrapping_sub(relay(before, key));
    Flow {
        to_peer: Count {
            packets: delta("to_peer_packets"),
            bytes: delta("to_peer_bytes"),
        },
        to_client: Count {
            packets: delta("to_client_packets"),
            bytes: delta("to_client_bytes"),
        },
    }
}

/// The XDP slots that moved between two `counters` lines: name -> (packets, bytes).
pub fn xdp_delta(before: &Value, after: &Value) -> BTreeMap<String, (u64, u64)> {
    let xdp_before = xdp_stats(before);
    xdp_stats(after)
        .into_iter()
        .map(|(name, (p, b))| {
            let (p0, b0) = xdp_before.get(&name).copied().unwrap_or_default();
            (name, (p.wrapping_sub(p0), b.wrapping_sub(b0)))
        })
        .filter(|(_, (p, _))| *p > 0)
        .collect()
}

/// One slot of an [`xdp_delta`] (zero when it did not move).
pub fn slot(delta: &BTreeMap<String, (u64, u64)>, name: &str) -> Count {
    let (packets, bytes) = delta.get(name).copied().unwrap_or_default();
    Count { packets, bytes }
}

/// What the XDP program forwarded, from an [`xdp_delta`].
pub fn kernel_flow(delta: &BTreeMap<String, (u64, u64)>) -> Flow {
    Flow {
        to_peer: slot(delta, "forwarded_to_peer"),
        to_client: slot(delta, "forwarded_to_client"),
    }
}
