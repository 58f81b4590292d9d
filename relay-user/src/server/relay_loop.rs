//! Relay loops: N threads (by default one per CPU the process may use), each the sole owner of
//! a TURN core, of one socket in every UDP listener's reuseport group, and of the relay
//! sockets of its allocations. Nothing on the data path is shared or locked: a client's
//! datagrams reach its owner loop (the `rampart-steer` program picks the socket by
//! [`owner_of`] the client), and its peers' datagrams arrive on relay sockets the same loop
//! owns. What the loops share is in [`rampart_turn::SharedState`]; the fast path is locked
//! only when a channel goes up or down.
//!
//! Each loop waits on one epoll instance (mio) for all its sockets and its command channel,
//! with the core's next deadline as the timeout; readable sockets are drained with `recvmmsg`
//! and what a batch produced leaves with `sendmmsg`, per socket (see [`batch_io`]). With
//! [`Gather`] (the `rampart-gather` program attached), the peer datagrams of all a loop's
//! allocations arrive on one receive socket per family, read many at a time whatever the
//! number of allocations; the relay sockets are still watched, for what the program lets
//! through (an address not yet or no longer in its map).
//!
//! The tokio side talks to a loop only through [`Command`]s: stream clients' frames (TCP and
//! TLS are served, and TLS handshakes made, by tokio), control-plane changes, reports.
//!
//! TCP allocations (RFC 6062) are served by tokio too, on the loop's orders: a loop's relay
//! listeners and connects to peers are tokio tasks that hand their connections to the loop,
//! which holds each one unread until the core splices it to a client data connection; the
//! bytes then pass between the two in that connection's task ([`PeerStream`]).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::batch_io::{BATCH, RecvBatch, SendBatch, set_int_option};
use super::lock;
use rampart_turn::allocation::RelayedBytes;
use rampart_turn::channel_data::next_stream_frame;
use rampart_turn::server::{ConnectionId, Output, PEER_HEADROOM, PEER_TAILROOM, Payload};
use rampart_turn::{FiveTuple, Server, ServerConfig, SharedState, Stats, Transmit, Transport};
use rampart_xdp::fast_path::FastPath;
use rampart_xdp::gathering::{RelayPorts, socket_index};
use rampart_xdp::steering::owner_of;

/// The largest UDP payload over IPv6 (65535 less the UDP header; IPv4's is smaller).
const MAX_DATAGRAM: usize = 65527;
/// Commands queued towards one loop; senders wait beyond that (a stream client's reads
/// slow down instead of its frames piling up).
const COMMAND_QUEUE: usize = 1024;
/// Batches read from one socket before the others get their turn; a socket with more left
/// is read again after them.
const BATCHES_PER_TURN: usize = 8;
const WAKER: Token = Token(usize::MAX);
/// Allocations a loop lists per report command (about 0.1 ms of its time).
const LISTED_PER_COMMAND: usize = 256;
/// Receive and send buffer of every TCP socket towards a peer (relay listeners, whose
/// accepted connections inherit it, and connects), fixed before listen or connect so that the
/// window follows it: what a peer connection holds in the kernel, and what a peer may send
/// before its ConnectionBind (RFC 6062 §5.3: the window closes when it is full). The kernel
/// doubles it for its bookkeeping. 256 KiB keeps a 20 Mbit/s flow at 100 ms round trips.
pub(crate) const PEER_SOCKET_BUFFER: usize = 256 * 1024;
/// Connections a relay listener queues before the loop takes them.
const PEER_BACKLOG: i32 = 64;

/// What the tokio side asks of a loop.
pub(crate) enum Command {
    /// A TCP or TLS client connected.
    StreamOpened {
        five_tuple: FiveTuple,
        stream: StreamLink,
    },
    /// Complete frames (RFC 8656 §12.5 framing) from a stream client, as read; the buffer
    /// goes back to the reader through [`StreamLink::read_buffers`].
    StreamFrames {
        five_tuple: FiveTuple,
        frames: Vec<u8>,
    },
    StreamClosed {
        five_tuple: FiveTuple,
        /// What the connection relayed as a client data connection (RFC 6062), if it was one.
        relayed: RelayedBytes,
    },
    /// A TCP peer connected to the relay listener at `relay`.
    PeerAccepted {
        relay: SocketAddr,
        peer: SocketAddr,
        stream: tokio::net::TcpStream,
    },
    /// The answer to a connect the loop asked for (by its task: an answer from a connect
    /// that was aborted is not taken for a later one under the same id); None when it
    /// failed.
    PeerConnected {
        id: ConnectionId,
        task: tokio::task::Id,
        stream: Option<tokio::net::TcpStream>,
    },
    /// A client datagram that reached another loop's socket (no steering program attached,
    /// or sent before it was).
    HandOff {
        five_tuple: FiveTuple,
        datagram: Vec<u8>,
    },
    Change(LoopChange),
    /// Counters and the allocations `listed` names, in the loop's order of iteration.
    Report {
        listed: Range<usize>,
        reply: oneshot::Sender<LoopReport>,
    },
    Shutdown,
}

/// A loop's side of a stream client's connection. Buffers circulate between the loop and the
/// connection's reader and writer instead of being allocated per frame: the reader's come
/// back through `read_buffers` once the loop has relayed their frames, the loop takes the
/// buffers of frames to the client from `write_buffers`, where the writer returns them. Both
/// pools are bounded: a buffer that finds its pool full is freed.
pub(crate) struct StreamLink {
    /// Frames to the client.
    pub writer: mpsc::Sender<ToStream>,
    pub write_buffers: std::sync::mpsc::Receiver<Vec<u8>>,
    pub read_buffers: std::sync::mpsc::SyncSender<Vec<u8>>,
}

/// What a stream client's writer is given, in order.
pub(crate) enum ToStream {
    Frame(Vec<u8>),
    /// The connection is now a client data connection (RFC 6062 §5.4): frames end, and bytes
    /// pass as they are between it and this peer connection.
    Splice(PeerStream),
}

/// A peer connection handed to a client data connection, and how the loop ends it.
pub(crate) struct PeerStream {
    pub stream: tokio::net::TcpStream,
    pub closed: CancellationToken,
}

/// A peer connection as the loop holds it.
enum PeerSide {
    Connecting(tokio::task::AbortHandle),
    /// Up and unread, until its ConnectionBind.
    Waiting(tokio::net::TcpStream),
    Spliced(CancellationToken),
}

/// A control-plane change every loop applies to its core.
#[derive(Clone, Debug)]
pub(crate) enum LoopChange {
    AllowedPeerNetworks(Vec<IpNet>),
    RevokeUser {
        user: String,
        through_unix: u64,
    },
    /// All the front-ends' media authorizations (consent).
    MediaAuthorizations(Vec<rampart_turn::server::MediaAuthorization>),
    /// Bandwidth limits: the control plane's policy over the configured default.
    Bandwidth(rampart_turn::bandwidth::BandwidthPolicy),
}

/// Counters of what a loop's shell (not its core) saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LoopStats {
    pub stream_frames_dropped: u64,
    pub send_failures: u64,
    pub datagrams_handed_off: u64,
    pub datagrams_truncated: u64,
    /// Peer datagrams read from the loop's receive sockets ([`Gather`]).
    pub peer_datagrams_gathered: u64,
}

impl std::ops::AddAssign<&LoopStats> for LoopStats {
    fn add_assign(&mut self, other: &LoopStats) {
        self.stream_frames_dropped += other.stream_frames_dropped;
        self.send_failures += other.send_failures;
        self.datagrams_handed_off += other.datagrams_handed_off;
        self.datagrams_truncated += other.datagrams_truncated;
        self.peer_datagrams_gathered += other.peer_datagrams_gathered;
    }
}

/// One loop's answer to [`Command::Report`].
pub(crate) struct LoopReport {
    pub allocations: usize,
    pub stats: Stats,
    pub shell: LoopStats,
    pub listed: Vec<AllocationInfo>,
}

/// An allocation as a report lists it.
pub(crate) struct AllocationInfo {
    pub five_tuple: FiveTuple,
    pub username: Arc<str>,
    pub user: Arc<str>,
    pub relayed: Option<SocketAddr>,
    pub expires_at_unix: u64,
    pub permissions: usize,
    pub channels: usize,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    /// 0 when unlimited.
    pub bandwidth_limit_bps: u64,
    pub over_limit: RelayedBytes,
}

/// How the tokio side reaches one loop.
#[derive(Clone)]
struct LoopHandle {
    commands: mpsc::Sender<Command>,
    waker: Arc<Waker>,
}

/// Every loop, by index: the owner of a client is `owner_of(client, len)`.
#[derive(Clone)]
pub(crate) struct Loops(Arc<[LoopHandle]>);

impl Loops {
    fn owner_index(&self, client: SocketAddr) -> usize {
        owner_of(client, self.0.len() as u32) as usize
    }

    /// Send to loop `index`, or to `client`'s owner when there is no such loop, waiting while
    /// its queue is full.
    pub(crate) async fn send_to(&self, index: Option<usize>, client: SocketAddr, command: Command) {
        let index = index
            .filter(|i| *i < self.0.len())
            .unwrap_or_else(|| self.owner_index(client));
        send(&self.0[index], command).await;
    }

    /// Send to every loop.
    pub(crate) async fn broadcast(&self, command: impl Fn() -> Command) {
        for handle in self.0.iter() {
            send(handle, command()).await;
        }
    }

    /// Every loop's report, listing at most `list` allocations in all. The list is asked for
    /// [`LISTED_PER_COMMAND`] at a time, so that a loop relays between two slices instead of
    /// stopping for the whole list (thousands of allocations took it 2-4 ms).
    pub(crate) async fn reports(&self, list: usize) -> Vec<LoopReport> {
        let mut reports = Vec::with_capacity(self.0.len());
        let mut left = list;
        for handle in self.0.iter() {
            let ask = |listed: Range<usize>| async move {
                let (reply, answer) = oneshot::channel();
                send(handle, Command::Report { listed, reply }).await;
                answer.await.ok()
            };
            // A loop that is gone (it panicked) reports nothing.
            let Some(mut report) = ask(0..left.min(LISTED_PER_COMMAND)).await else {
                continue;
            };
            while report.listed.len() < left.min(report.allocations) {
                let from = report.listed.len();
                let to = from + (left - from).min(LISTED_PER_COMMAND);
                match ask(from..to).await {
                    Some(more) if !more.listed.is_empty() => report.listed.extend(more.listed),
                    _ => break,
                }
            }
            left -= report.listed.len();
            reports.push(report);
        }
        reports
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

async fn send(handle: &LoopHandle, command: Command) {
    if handle.commands.send(command).await.is_ok() {
        let _ = handle.waker.wake();
    }
}

/// What every loop is started with.
pub(crate) struct LoopSettings {
    pub turn: ServerConfig,
    pub shared: Arc<SharedState>,
    pub fast_path: Arc<Mutex<Option<FastPath>>>,
    /// Where TCP relay listeners and connects to peers run.
    pub runtime: tokio::runtime::Handle,
}

/// A loop's share of the gathering of peer datagrams (`rampart_xdp::gathering`): its receive
/// sockets (bound, `IP_RECVORIGDSTADDR` / `IPV6_RECVORIGDSTADDR` set, at
/// `socket_index(loop, family)` in the program's map) and its handle on the relay address map.
pub(crate) struct Gather {
    pub receivers: Vec<std::net::UdpSocket>,
    pub ports: RelayPorts,
}

/// Start `listeners.len()` loops; `listeners[i]` are loop i's sockets, one per UDP listener
/// address (the same addresses, in the same order, for every loop), `gathers[i]` its share of
/// the gathering, if any (an empty list: none for any loop).
pub(crate) fn start(
    settings: &LoopSettings,
    listeners: Vec<Vec<std::net::UdpSocket>>,
    gathers: Vec<Gather>,
) -> io::Result<(Loops, Vec<std::thread::JoinHandle<()>>)> {
    let mut polls = Vec::new();
    let mut handles = Vec::new();
    let mut receivers = Vec::new();
    for _ in &listeners {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        polls.push(poll);
        handles.push(LoopHandle { commands, waker });
        receivers.push(receiver);
    }
    let loops = Loops(handles.into());
    let mut threads = Vec::new();
    let mut gathers = gathers.into_iter();
    for (index, ((poll, commands), sockets)) in
        polls.into_iter().zip(receivers).zip(listeners).enumerate()
    {
        let mut registered = Vec::new();
        for (i, socket) in sockets.into_iter().enumerate() {
            let address = socket.local_addr()?;
            let mut socket = UdpSocket::from_std(socket);
            poll.registry()
                .register(&mut socket, Token(i), Interest::READABLE)?;
            registered.push((address, socket));
        }
        let gather = match gathers.next() {
            Some(Gather { receivers, ports }) => {
                let mut gathering = Vec::new();
                for socket in receivers {
                    let address = socket.local_addr()?;
                    let mut socket = UdpSocket::from_std(socket);
                    let token = Token(registered.len() + gathering.len());
                    poll.registry()
                        .register(&mut socket, token, Interest::READABLE)?;
                    gathering.push((address, socket));
                }
                Some(Gathered {
                    receivers: gathering,
                    ports,
                })
            }
            None => None,
        };
        let now = Instant::now();
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // Loops are at most MAX_LOOPS (256): each has its own shard.
        let core = Server::new(
            settings.turn.clone(),
            settings.shared.clone(),
            StdRng::from_entropy(),
            now,
            unix_now,
        )
        .with_connection_shard(index as u8);
        let runtime = settings.runtime.clone();
        let fast_path = settings.fast_path.clone();
        let loops = loops.clone();
        let thread = std::thread::Builder::new()
            .name(format!("rampart-relay-{index}"))
            .spawn(move || {
                // Built on the loop's own thread: the batch holds raw pointers (not Send).
                let peer_batch = RecvBatch::new(PEER_HEADROOM, MAX_DATAGRAM, PEER_TAILROOM);
                let peer_batch = if gather.is_some() {
                    peer_batch.with_destinations()
                } else {
                    peer_batch
                };
                let relay_loop = RelayLoop {
                    index,
                    loops,
                    core,
                    poll,
                    commands,
                    listener_at: registered
                        .iter()
                        .enumerate()
                        .map(|(i, (address, _))| (*address, i))
                        .collect(),
                    listeners: registered,
                    peer_batch,
                    gather,
                    relays: Vec::new(),
                    free_slots: Vec::new(),
                    relay_at: HashMap::new(),
                    streams: HashMap::new(),
                    runtime,
                    tcp_relays: HashMap::new(),
                    peer_connections: HashMap::new(),
                    fast_path,
                    channel_changes: Vec::new(),
                    stats: LoopStats::default(),
                    client_batch: RecvBatch::new(0, MAX_DATAGRAM, 0),
                    sender: SendBatch::new(),
                    outgoing: Vec::with_capacity(2 * BATCH),
                    unfinished: Vec::new(),
                    shutdown: false,
                };
                relay_loop.run();
            })?;
        threads.push(thread);
    }
    Ok((loops, threads))
}

struct RelaySocket {
    address: SocketAddr,
    socket: UdpSocket,
}

/// A loop's receive sockets (tokens after the listeners') and relay address map.
struct Gathered {
    receivers: Vec<(SocketAddr, UdpSocket)>,
    ports: RelayPorts,
}

/// What a token names.
#[derive(Clone, Copy)]
enum Source {
    Listener(usize),
    Receiver(usize),
    Relay(usize),
}

/// Where the bytes of a queued datagram are.
enum Bytes {
    /// In receive buffer `buffer` of the client batch.
    Clients {
        buffer: usize,
        range: Range<usize>,
    },
    /// In receive buffer `buffer` of the peer batch.
    Peers {
        buffer: usize,
        range: Range<usize>,
    },
    Owned(Vec<u8>),
}

/// A datagram to send when the batch it came from is done.
struct Outgoing {
    fd: RawFd,
    to: SocketAddr,
    bytes: Bytes,
}

/// Where the input that a core step relays from lives: a buffer of the client or the peer
/// batch being processed, or bytes of a command.
#[derive(Clone, Copy)]
enum Input<'a> {
    Clients(usize),
    Peers(usize),
    Bytes(&'a [u8]),
}

struct RelayLoop {
    index: usize,
    loops: Loops,
    core: Server,
    poll: Poll,
    commands: mpsc::Receiver<Command>,
    listeners: Vec<(SocketAddr, UdpSocket)>,
    /// Listener index by local address, for transmits to UDP clients.
    listener_at: HashMap<SocketAddr, usize>,
    gather: Option<Gathered>,
    /// Relay sockets by slot; a slot's token follows the listeners' and the receivers'.
    relays: Vec<Option<RelaySocket>>,
    free_slots: Vec<usize>,
    relay_at: HashMap<SocketAddr, usize>,
    streams: HashMap<FiveTuple, StreamLink>,
    runtime: tokio::runtime::Handle,
    /// TCP relay listeners (their accept tasks) by relayed address.
    tcp_relays: HashMap<SocketAddr, CancellationToken>,
    peer_connections: HashMap<ConnectionId, PeerSide>,
    fast_path: Arc<Mutex<Option<FastPath>>>,
    channel_changes: Vec<rampart_turn::allocation::FastPathEvent>,
    stats: LoopStats,
    client_batch: RecvBatch,
    peer_batch: RecvBatch,
    sender: SendBatch,
    outgoing: Vec<Outgoing>,
    /// Sockets left readable after their turn.
    unfinished: Vec<Token>,
    shutdown: bool,
}

impl RelayLoop {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut ready = Vec::new();
        while !self.shutdown {
            let timeout = if self.unfinished.is_empty() {
                self.core
                    .poll_timeout()
                    .map(|at| at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(error) = self.poll.poll(&mut events, timeout) {
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(loop_index = self.index, %error, "relay loop cannot wait for its sockets: stopping");
                return;
            }
            ready.clear();
            ready.append(&mut self.unfinished);
            ready.extend(events.iter().map(|event| event.token()));
            for &token in &ready {
                if token == WAKER {
                    self.drain_commands();
                } else if self.read(token) {
                    self.unfinished.push(token);
                }
            }
            // What every socket's datagrams of this round produced leaves together.
            self.flush();
            self.core.handle_timeout(Instant::now());
            self.carry_out(Input::Bytes(&[]));
        }
        // The tasks of TCP relays end with the loop (a dropped token cancels nothing).
        for listener in self.tcp_relays.values() {
            listener.cancel();
        }
        for (_, side) in self.peer_connections.drain() {
            match side {
                PeerSide::Connecting(task) => task.abort(),
                PeerSide::Spliced(closed) => closed.cancel(),
                PeerSide::Waiting(_) => {}
            }
        }
        info!(
            loop_index = self.index,
            allocations = self.core.allocation_count(),
            "relay loop stopped"
        );
    }

    /// The token of relay slot 0: after the listeners' and the receivers'.
    fn first_relay_token(&self) -> usize {
        self.listeners.len() + self.gather.as_ref().map_or(0, |g| g.receivers.len())
    }

    fn source(&self, token: Token) -> Source {
        let listeners = self.listeners.len();
        let relays = self.first_relay_token();
        if token.0 < listeners {
            Source::Listener(token.0)
        } else if token.0 < relays {
            Source::Receiver(token.0 - listeners)
        } else {
            Source::Relay(token.0 - relays)
        }
    }

    /// Read a readable socket (a listener: client datagrams; a relay socket or a receiver:
    /// peer datagrams) for its turn; true when it has more.
    fn read(&mut self, token: Token) -> bool {
        let source = self.source(token);
        let (socket, fd) = match source {
            Source::Listener(i) => {
                let (address, ref socket) = self.listeners[i];
                (address, socket.as_raw_fd())
            }
            Source::Receiver(i) => match &self.gather {
                Some(gather) => (gather.receivers[i].0, gather.receivers[i].1.as_raw_fd()),
                None => return false,
            },
            Source::Relay(slot) => match self.relays.get(slot) {
                Some(Some(relay)) => (relay.address, relay.socket.as_raw_fd()),
                _ => return false,
            },
        };
        let peers = !matches!(source, Source::Listener(_));
        for _ in 0..BATCHES_PER_TURN {
            let Some((filled, more)) = self.receive(peers, fd, socket) else {
                return false;
            };
            let now = Instant::now();
            if let Source::Receiver(_) = source {
                self.stats.peer_datagrams_gathered += filled.len() as u64;
            }
            for i in filled {
                match source {
                    Source::Listener(_) => self.client_datagram(i, socket, now),
                    Source::Relay(_) => self.peer_datagram(i, socket, now),
                    Source::Receiver(_) => {
                        if let Some(relay) = self.peer_batch.destination(i) {
                            self.peer_datagram(i, relay, now);
                        }
                    }
                }
            }
            // A relay may have been released by what the batch did.
            if !more || (matches!(source, Source::Relay(_)) && !self.relay_at.contains_key(&socket))
            {
                return false;
            }
        }
        true
    }

    /// Client datagram `i` of the batch, received on the listener at `server`: to the core,
    /// or to the loop that owns its client.
    fn client_datagram(&mut self, i: usize, server: SocketAddr, now: Instant) {
        let Some((buffer, len, client)) = self.client_batch.datagram(i) else {
            return;
        };
        let five_tuple = FiveTuple {
            transport: Transport::Udp,
            client,
            server,
        };
        let owner = self.loops.owner_index(client);
        if owner != self.index {
            let command = Command::HandOff {
                five_tuple,
                datagram: buffer[..len].to_vec(),
            };
            let handle = &self.loops.0[owner];
            if handle.commands.try_send(command).is_ok() {
                let _ = handle.waker.wake();
                self.stats.datagrams_handed_off += 1;
            } else {
                self.stats.send_failures += 1;
            }
            return;
        }
        self.core
            .handle_client_input(five_tuple, &buffer[..len], now);
        self.carry_out(Input::Clients(i));
    }

    /// Peer datagram `i` of the batch, received on the relay socket at `relay`.
    fn peer_datagram(&mut self, i: usize, relay: SocketAddr, now: Instant) {
        let Some((buffer, len, peer)) = self.peer_batch.datagram(i) else {
            return;
        };
        self.core.handle_peer_input(relay, peer, buffer, len, now);
        self.carry_out(Input::Peers(i));
    }

    /// Receive from `fd` into the peer batch (`peers`) or the client batch, flushing it
    /// first when it is full: the buffers filled, and whether the socket may have more.
    /// None when the socket is drained.
    fn receive(
        &mut self,
        peers: bool,
        fd: RawFd,
        socket: SocketAddr,
    ) -> Option<(Range<usize>, bool)> {
        let full = |batch: &RecvBatch| batch.free() == 0;
        if full(if peers {
            &self.peer_batch
        } else {
            &self.client_batch
        }) {
            self.flush();
        }
        let (batch, headroom) = if peers {
            (&mut self.peer_batch, PEER_HEADROOM)
        } else {
            (&mut self.client_batch, 0)
        };
        let received = batch.recv(fd, headroom, &mut self.stats.datagrams_truncated);
        let filled = drained(received, socket)?;
        Some((filled, full(batch)))
    }

    fn drain_commands(&mut self) {
        loop {
            let command = match self.commands.try_recv() {
                Ok(command) => command,
                Err(mpsc::error::TryRecvError::Empty) => return,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.shutdown = true;
                    return;
                }
            };
            let now = Instant::now();
            match command {
                Command::StreamOpened { five_tuple, stream } => {
                    self.streams.insert(five_tuple, stream);
                }
                Command::StreamFrames { five_tuple, frames } => {
                    let mut offset = 0;
                    while let Some(frame) = frames.get(offset..)
                        && let Ok(Some(len)) = next_stream_frame(frame)
                    {
                        let frame = &frame[..len];
                        self.core.handle_client_input(five_tuple, frame, now);
                        self.carry_out(Input::Bytes(frame));
                        offset += len;
                    }
                    if let Some(stream) = self.streams.get(&five_tuple) {
                        let _ = stream.read_buffers.try_send(frames);
                    }
                }
                Command::StreamClosed {
                    five_tuple,
                    relayed,
                } => {
                    self.streams.remove(&five_tuple);
                    self.core.credit_data_connection(&five_tuple, relayed);
                    self.core.client_closed(five_tuple);
                    self.carry_out(Input::Bytes(&[]));
                }
                Command::PeerAccepted {
                    relay,
                    peer,
                    stream,
                } => {
                    // Refused: dropped, which closes it.
                    if let Some(id) = self.core.handle_peer_connection(relay, peer, now) {
                        self.peer_connections.insert(id, PeerSide::Waiting(stream));
                    }
                    self.carry_out(Input::Bytes(&[]));
                }
                Command::PeerConnected { id, task, stream } => {
                    let ours = matches!(
                        self.peer_connections.get(&id),
                        Some(PeerSide::Connecting(connect)) if connect.id() == task
                    );
                    if !ours {
                        continue;
                    }
                    self.peer_connections.remove(&id);
                    let connected = stream.is_some();
                    if self.core.handle_connect_result(id, connected, now)
                        && let Some(stream) = stream
                    {
                        self.peer_connections.insert(id, PeerSide::Waiting(stream));
                    }
                    self.carry_out(Input::Bytes(&[]));
                }
                Command::HandOff {
                    five_tuple,
                    datagram,
                } => {
                    self.core.handle_client_input(five_tuple, &datagram, now);
                    self.carry_out(Input::Bytes(&datagram));
                }
                Command::Change(LoopChange::AllowedPeerNetworks(networks)) => {
                    self.core.set_allowed_peer_networks(networks, now);
                    self.carry_out(Input::Bytes(&[]));
                }
                Command::Change(LoopChange::MediaAuthorizations(authorizations)) => {
                    self.core.set_media_authorizations(authorizations, now);
                    // Consent taken back leaves the kernel and closes connections now.
                    self.carry_out(Input::Bytes(&[]));
                }
                Command::Change(LoopChange::Bandwidth(policy)) => {
                    self.core.set_bandwidth_policy(policy, now);
                    // Channels in the kernel take the new limits now.
                    self.carry_out(Input::Bytes(&[]));
                }
                Command::Change(LoopChange::RevokeUser { user, through_unix }) => {
                    self.core.revoke_user(&user, through_unix, now);
                    // The ended allocations' sockets close and their channels leave the kernel.
                    self.carry_out(Input::Bytes(&[]));
                }
                Command::Report { listed, reply } => {
                    let _ = reply.send(self.report(listed));
                }
                Command::Shutdown => self.shutdown = true,
            }
        }
    }

    /// Carry out what the core asked for, in order: relay binds are made and answered at
    /// once, channel changes go to the kernel (or nowhere without a fast path), datagrams
    /// from a batch are queued for [`RelayLoop::flush`] and the others sent at once.
    fn carry_out(&mut self, input: Input<'_>) {
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Transmit(transmit) => self.transmit(transmit, input),
                Output::BindRelay {
                    relay,
                    dont_fragment,
                } => {
                    let bound = self.bind_relay(relay, dont_fragment);
                    self.core.handle_bind_result(relay, bound, Instant::now());
                }
                Output::ListenRelay { relay } => {
                    let listening = self.listen_relay(relay);
                    self.core
                        .handle_bind_result(relay, listening, Instant::now());
                }
                Output::ReleaseRelay { relay } => self.release_relay(relay),
                Output::FastPath(change) => self.channel_changes.push(change),
                Output::ConnectPeer { id, relay, peer } => self.connect_peer(id, relay, peer),
                Output::SpliceConnection { id, client } => self.splice(id, client),
                Output::ClosePeerConnection { id } => match self.peer_connections.remove(&id) {
                    Some(PeerSide::Connecting(task)) => task.abort(),
                    Some(PeerSide::Spliced(closed)) => closed.cancel(),
                    Some(PeerSide::Waiting(_)) | None => {}
                },
            }
        }
        if self.channel_changes.is_empty() {
            return;
        }
        let changes = std::mem::take(&mut self.channel_changes);
        let withdrawn = match &mut *lock(&self.fast_path) {
            Some(fast_path) => fast_path.apply(changes, Instant::now()),
            None => Vec::new(),
        };
        for (five_tuple, traffic) in withdrawn {
            self.core
                .credit_fast_path(&five_tuple, traffic.relayed, traffic.over_limit);
        }
    }

    fn transmit(&mut self, transmit: Transmit, input: Input<'_>) {
        let (fd, to, payload) = match transmit {
            Transmit::ToClient {
                five_tuple,
                payload,
            } => match five_tuple.transport {
                Transport::Udp => match self.listener_at.get(&five_tuple.server) {
                    Some(&i) => (self.listeners[i].1.as_raw_fd(), five_tuple.client, payload),
                    None => return,
                },
                Transport::Tcp | Transport::Tls => {
                    let Some(stream) = self.streams.get(&five_tuple) else {
                        return;
                    };
                    let frame = match payload {
                        Payload::Message(message) => message,
                        Payload::InPlace(range) => {
                            let mut frame = stream.write_buffers.try_recv().unwrap_or_default();
                            frame.clear();
                            frame.extend_from_slice(self.input_bytes(input, range));
                            frame
                        }
                    };
                    if stream.writer.try_send(ToStream::Frame(frame)).is_err() {
                        self.stats.stream_frames_dropped += 1;
                    }
                    return;
                }
            },
            Transmit::ToPeer {
                relay,
                peer,
                payload,
            } => match self.relay_at.get(&relay) {
                Some(&slot) => match &self.relays[slot] {
                    Some(relay) => (relay.socket.as_raw_fd(), peer, payload),
                    None => return,
                },
                None => return,
            },
        };
        match (input, payload) {
            (Input::Clients(buffer), Payload::InPlace(range)) => self.outgoing.push(Outgoing {
                fd,
                to,
                bytes: Bytes::Clients { buffer, range },
            }),
            (Input::Peers(buffer), Payload::InPlace(range)) => self.outgoing.push(Outgoing {
                fd,
                to,
                bytes: Bytes::Peers { buffer, range },
            }),
            (Input::Clients(_) | Input::Peers(_), Payload::Message(message)) => {
                self.outgoing.push(Outgoing {
                    fd,
                    to,
                    bytes: Bytes::Owned(message),
                });
            }
            (Input::Bytes(bytes), payload) => {
                let bytes = match &payload {
                    Payload::Message(message) => message.as_slice(),
                    Payload::InPlace(range) => bytes.get(range.clone()).unwrap_or_default(),
                };
                self.stats.send_failures += self.sender.send(fd, [(to, bytes)].into_iter());
            }
        }
    }

    /// In-place bytes of the input a step ran on.
    fn input_bytes<'a>(&'a self, input: Input<'a>, range: Range<usize>) -> &'a [u8] {
        let bytes = match input {
            Input::Clients(buffer) => self.client_batch.buffer(buffer),
            Input::Peers(buffer) => self.peer_batch.buffer(buffer),
            Input::Bytes(bytes) => bytes,
        };
        bytes.get(range).unwrap_or_default()
    }

    /// Send what the batches received since the last flush queued, one `sendmmsg` per run
    /// of datagrams from the same socket, and free their buffers.
    fn flush(&mut self) {
        let mut start = 0;
        while start < self.outgoing.len() {
            let fd = self.outgoing[start].fd;
            let run = self.outgoing[start..]
                .iter()
                .take_while(|o| o.fd == fd)
                .count();
            let (clients, peers) = (&self.client_batch, &self.peer_batch);
            let datagrams = self.outgoing[start..start + run].iter().map(|o| {
                let bytes = match &o.bytes {
                    Bytes::Clients { buffer, range } => clients.buffer(*buffer).get(range.clone()),
                    Bytes::Peers { buffer, range } => peers.buffer(*buffer).get(range.clone()),
                    Bytes::Owned(message) => Some(message.as_slice()),
                };
                (o.to, bytes.unwrap_or_default())
            });
            self.stats.send_failures += self.sender.send(fd, datagrams);
            start += run;
        }
        self.outgoing.clear();
        self.client_batch.clear();
        self.peer_batch.clear();
    }

    fn bind_relay(&mut self, address: SocketAddr, dont_fragment: bool) -> bool {
        let socket = match relay_socket(address, dont_fragment) {
            Ok(socket) => socket,
            Err(error) => {
                debug!(%address, %error, "relay port unavailable");
                return false;
            }
        };
        let mut socket = UdpSocket::from_std(socket);
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.relays.push(None);
            self.relays.len() - 1
        });
        let token = Token(self.first_relay_token() + slot);
        if let Err(error) = self
            .poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)
        {
            warn!(%address, %error, "cannot watch a relay socket");
            self.free_slots.push(slot);
            return false;
        }
        if let Some(gather) = &mut self.gather {
            let index = socket_index(self.index as u32, address.is_ipv6());
            if let Err(error) = gather.ports.insert(address, index) {
                // Its relay socket, which is watched, receives instead.
                debug!(%address, %error, "relay address not gathered");
            }
        }
        self.relays[slot] = Some(RelaySocket { address, socket });
        self.relay_at.insert(address, slot);
        true
    }

    /// A TCP relay listener at `address` (RFC 6062 §5.1), accepting in a task that hands
    /// each connection to this loop.
    fn listen_relay(&mut self, address: SocketAddr) -> bool {
        let listener = match peer_listener(address) {
            Ok(listener) => listener,
            Err(error) => {
                debug!(%address, %error, "TCP relay port unavailable");
                return false;
            }
        };
        let closed = CancellationToken::new();
        let handle = self.loops.0[self.index].clone();
        let stop = closed.clone();
        self.runtime.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(error) => {
                    warn!(%address, %error, "cannot watch a TCP relay listener");
                    return;
                }
            };
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        send(
                            &handle,
                            Command::PeerAccepted {
                                relay: address,
                                peer,
                                stream,
                            },
                        )
                        .await;
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        debug!(%address, %error, "accept on a TCP relay failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        self.tcp_relays.insert(address, closed);
        true
    }

    /// Connect from `relay` to `peer` in a task, which answers with
    /// [`Command::PeerConnected`]; the core's timer bounds it (its close aborts the task).
    fn connect_peer(&mut self, id: ConnectionId, relay: SocketAddr, peer: SocketAddr) {
        let handle = self.loops.0[self.index].clone();
        let task = self.runtime.spawn(async move {
            let stream = match connect_from(relay, peer).await {
                Ok(stream) => Some(stream),
                Err(error) => {
                    debug!(%relay, %peer, %error, "connect to a TCP peer failed");
                    None
                }
            };
            let task = tokio::task::id();
            send(&handle, Command::PeerConnected { id, task, stream }).await;
        });
        self.peer_connections
            .insert(id, PeerSide::Connecting(task.abort_handle()));
    }

    /// Hand peer connection `id` to the data connection `client`'s task, after the frames
    /// already queued for it (the ConnectionBind response).
    fn splice(&mut self, id: ConnectionId, client: FiveTuple) {
        let Some(PeerSide::Waiting(stream)) = self.peer_connections.remove(&id) else {
            return;
        };
        let Some(link) = self.streams.get(&client) else {
            self.core.client_closed(client);
            return;
        };
        let closed = CancellationToken::new();
        let peer = PeerStream {
            stream,
            closed: closed.clone(),
        };
        if link.writer.try_send(ToStream::Splice(peer)).is_ok() {
            self.peer_connections.insert(id, PeerSide::Spliced(closed));
        } else {
            // The client was told it is bound and will never be: end it all (its writer's
            // queue is full or gone, so the connection is as good as closed).
            self.stats.stream_frames_dropped += 1;
            self.core.client_closed(client);
        }
    }

    fn release_relay(&mut self, address: SocketAddr) {
        if let Some(listener) = self.tcp_relays.remove(&address) {
            listener.cancel();
            return;
        }
        let Some(slot) = self.relay_at.remove(&address) else {
            return;
        };
        if let Some(gather) = &mut self.gather {
            gather.ports.remove(address);
        }
        if let Some(mut relay) = self.relays[slot].take() {
            let _ = self.poll.registry().deregister(&mut relay.socket);
        }
        self.free_slots.push(slot);
    }

    /// Counters, and the allocations at `listed` in iteration order (which changes only as
    /// allocations come and go: a list taken in slices may miss or repeat one that did).
    fn report(&self, listed: Range<usize>) -> LoopReport {
        let core = &self.core;
        LoopReport {
            allocations: core.allocation_count(),
            stats: core.stats().clone(),
            shell: self.stats,
            listed: core
                .allocations()
                .skip(listed.start)
                .take(listed.len())
                .map(|allocation| {
                    let relay = allocation.relays.first();
                    AllocationInfo {
                        five_tuple: allocation.five_tuple,
                        username: allocation.username.clone(),
                        user: allocation.quota_key.clone(),
                        relayed: relay.map(|r| r.advertised),
                        expires_at_unix: relay.map_or(0, |r| core.unix_time(r.expires)),
                        permissions: allocation.permission_count(),
                        channels: allocation.channels().count(),
                        bytes_from_client: allocation.relayed.from_client,
                        bytes_to_client: allocation.relayed.to_client,
                        bandwidth_limit_bps: allocation
                            .bandwidth
                            .map_or(0, |limit| limit.bits_per_second),
                        over_limit: allocation.over_limit,
                    }
                })
                .collect(),
        }
    }
}

/// The datagrams a receive filled; None when the socket is drained (or failed: logged).
fn drained(received: io::Result<Range<usize>>, socket: SocketAddr) -> Option<Range<usize>> {
    match received {
        Ok(filled) => Some(filled),
        Err(error) => {
            if error.kind() != io::ErrorKind::WouldBlock {
                debug!(%socket, %error, "UDP receive error");
            }
            None
        }
    }
}

/// A TCP socket towards peers, bound at `address` with `SO_REUSEPORT` (and `SO_REUSEADDR`)
/// so that a relay's listener and its connects share the address: Linux allows that only when
/// every socket on it has the option (RFC 6062 §5.2 connects from the relayed address). The
/// relay port space (the core's) keeps one allocation per port; the option is not a licence
/// to share one.
fn peer_socket(address: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_recv_buffer_size(PEER_SOCKET_BUFFER)?;
    socket.set_send_buffer_size(PEER_SOCKET_BUFFER)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    Ok(socket)
}

fn peer_listener(address: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = peer_socket(address)?;
    socket.listen(PEER_BACKLOG)?;
    Ok(socket.into())
}

async fn connect_from(relay: SocketAddr, peer: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::from_std_stream(peer_socket(relay)?.into());
    socket.connect(peer).await
}

/// A relay socket: non-blocking, with DF set when the client asked for DONT-FRAGMENT.
fn relay_socket(address: SocketAddr, dont_fragment: bool) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(address)?;
    socket.set_nonblocking(true)?;
    if dont_fragment {
        set_dont_fragment(&socket, address.is_ipv6())?;
    }
    Ok(socket)
}

/// RFC 8656 §14.8 DONT-FRAGMENT: datagrams to the peer leave with DF set (path MTU
/// discovery "do"), so oversized ones fail instead of being fragmented.
fn set_dont_fragment(socket: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    let (level, option, value) = if ipv6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    };
    set_int_option(socket, level, option, value)
}
