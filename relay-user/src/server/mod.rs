//! The agent's shells around its cores. The TURN core runs in relay loops (see
//! [`relay_loop`]: one thread per loop, each owning its core and its sockets, no lock on the
//! data path); tokio serves what is not a datagram: TCP and TLS clients (whose frames go to
//! their owner loop), the Web Conferencing Edge, the Access Edge and the control link. The
//! shell state here (connection admission, control-plane state, conferencing) is under one
//! lock that no datagram takes.

mod batch_io;
mod conferencing;
mod control_link;
mod data_connection;
mod relay_loop;
mod sip;
mod total_bandwidth;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use rand::RngCore;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, ConnectionLimits};
use crate::psom::{Admission, ConferencingCounters};
use rampart_turn::allocation::RelayedBytes;
use rampart_turn::channel_data::{MAX_STREAM_FRAME, next_stream_frame};
use rampart_turn::{FiveTuple, ServerConfig, SharedState, Stats, Transport};
use rampart_xdp::XdpError;
use rampart_xdp::gathering::{Gathering, ReceiveSocket, socket_index};
use rampart_xdp::steering::Steering;
use relay_loop::{
    Command, Gather, LoopReport, LoopSettings, LoopStats, Loops, StreamLink, ToStream,
};

pub use rampart_xdp::fast_path::{FastPath, FastPathStats};

/// Frames queued towards one stream client before further ones are dropped: a client that
/// does not read its media must not hold memory without bound.
const STREAM_QUEUE: usize = 256;
/// Free space a stream client's read buffer is given before each read.
const READ_SIZE: usize = 16 * 1024;
/// A stream client's read buffers waiting to be read into again. One is enough in steady
/// state (one is read into while the other is with the loop); more would be held by every
/// idle connection.
const READ_BUFFERS: usize = 1;
/// A stream client's write buffers waiting to be filled again: what is in flight towards a
/// client at media rates; frames beyond it (a burst) get buffers of their own, freed after.
const WRITE_BUFFERS: usize = 16;
/// How long a closing stream client's last answers may take to be written.
const STREAM_DRAIN: Duration = Duration::from_secs(5);
/// Write buffers larger than this are not pooled: media frames (a ChannelData header and an
/// MTU-sized payload) fit.
const POOLED_WRITE_CAPACITY: usize = 2048;
/// Receive buffer of a loop's gathering socket. It queues the peer datagrams of all the loop's
/// allocations (where each relay socket had its own ~208 KiB): about 150 ms of the measured
/// saturation rate in small datagrams. Needs CAP_NET_ADMIN (SO_RCVBUFFORCE), which attaching
/// the program does too; else SO_RCVBUF, capped by net.core.rmem_max.
const GATHER_RECEIVE_BUFFER: libc::c_int = 8 << 20;
/// How often the fast path's next-hop cache is swept.
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {transport:?} {address}")]
    Listen {
        transport: Transport,
        address: SocketAddr,
        source: io::Error,
    },
    #[error(
        "cannot start the XDP fast path (xdp.mode asks for it; use mode = \"auto\" to fall back to userspace)"
    )]
    Xdp(#[from] XdpError),
    #[error("cannot listen for the Web Conferencing Edge on {address}")]
    ListenConferencing {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("cannot start the relay loops")]
    Loops(#[source] io::Error),
    #[error("cannot listen for the Access Edge (SIP) on {address}")]
    ListenSip {
        address: SocketAddr,
        source: io::Error,
    },
}

/// Counters of the shell itself (what the state machine never saw).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ShellStats {
    pub connections_refused: u64,
    pub tls_handshake_failures: u64,
    /// The relay loops' (summed).
    #[serde(flatten)]
    pub loops: LoopStats,
}

struct State {
    connections_per_source: HashMap<IpAddr, usize>,
    connections: usize,
    shell: ShellStats,
    /// What the control service sent (empty without `[control]`).
    control: control_link::ControlState,
    /// Who may join which conference (Web Conferencing Edge), fed by the control link.
    conferencing: Admission,
    /// Per conference, what disconnects its participants when it is revoked.
    conference_sessions: HashMap<String, CancellationToken>,
    conferencing_enabled: bool,
    /// The Access Edge, whose policy the control link sets.
    sip: Option<Arc<sip::SipEdge>>,
}

/// Everything an operator counts, as logged on the `counters` line (JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub allocations: usize,
    pub relay: Stats,
    pub shell: ShellStats,
    /// `None` when the fast path is off.
    pub fast_path: Option<FastPathStats>,
    /// What the XDP program counted (packets, bytes), by slot.
    pub xdp: Vec<(&'static str, u64, u64)>,
    /// The Web Conferencing Edge; `None` when it is off.
    pub conferencing: Option<ConferencingCounters>,
    /// The Access Edge; `None` when it is off.
    pub sip: Option<sip::SipStats>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    loops: Loops,
    /// Locked when a channel goes up or down, by reports and by the netlink reader; never
    /// per datagram.
    fast_path: Arc<Mutex<Option<FastPath>>>,
    limits: ConnectionLimits,
    idle_timeout: Duration,
}

/// A lock whose holder panicked still guards whole data (every update under these locks is
/// one statement or is redone): carry on rather than take the relay down.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The counters, from the loops' `reports` and the shell's own.
    fn counters(&self, reports: &[LoopReport]) -> Counters {
        let mut relay = Stats::default();
        let mut loops = LoopStats::default();
        for report in reports {
            relay += &report.stats;
            loops += &report.shell;
        }
        let (fast_path, xdp) = match &*lock(&self.fast_path) {
            Some(fast_path) => (
                Some(fast_path.stats()),
                fast_path
                    .program()
                    .stats()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(stat, c)| (stat.name(), c.packets, c.bytes))
                    .collect(),
            ),
            None => (None, Vec::new()),
        };
        let state = self.lock();
        Counters {
            allocations: reports.iter().map(|r| r.allocations).sum(),
            relay,
            shell: ShellStats {
                loops,
                ..state.shell
            },
            fast_path,
            xdp,
            conferencing: state
                .conferencing_enabled
                .then(|| state.conferencing.counters.clone()),
            sip: state.sip.as_ref().map(|edge| edge.stats()),
        }
    }

    fn admit(&self, source: IpAddr) -> bool {
        let mut state = self.lock();
        let per_source = state
            .connections_per_source
            .get(&source)
            .copied()
            .unwrap_or(0);
        if state.connections >= self.limits.total || per_source >= self.limits.per_source {
            state.shell.connections_refused += 1;
            return false;
        }
        state.connections += 1;
        *state.connections_per_source.entry(source).or_default() += 1;
        true
    }

    fn release_connection(&self, source: IpAddr) {
        let mut state = self.lock();
        state.connections -= 1;
        if let Some(n) = state.connections_per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                state.connections_per_source.remove(&source);
            }
        }
    }
}

/// A running edge: listeners bound, relay loops and tasks started.
pub struct Edge {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
    local_addresses: Vec<(Transport, SocketAddr)>,
    /// Held for as long as the loops run: dropping it detaches the program.
    _gathering: Option<Gathering>,
}

impl Edge {
    /// Bind every listener (failing on the first that cannot be bound) and start serving.
    /// `stats_every`: how often the counters are logged (when they changed).
    pub async fn start(config: Config, stats_every: Duration) -> Result<Self, ServerError> {
        let loops = config.relay_loops;
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for listener in &config.listeners {
            let error = |source| ServerError::Listen {
                transport: listener.transport,
                address: listener.address,
                source,
            };
            match listener.transport {
                Transport::Udp => {
                    udp.push(reuseport_group(listener.address, loops).map_err(error)?);
                }
                Transport::Tcp | Transport::Tls => {
                    let socket = TcpListener::bind(listener.address).await.map_err(error)?;
                    tcp.push((listener.transport, socket));
                }
            }
        }
        let conferencing = match &config.conferencing {
            Some(settings) => {
                let bind = |address: SocketAddr| async move {
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| ServerError::ListenConferencing { address, source })
                };
                Some((
                    settings.clone(),
                    bind(settings.external).await?,
                    bind(settings.internal).await?,
                ))
            }
            None => None,
        };
        let sip = match &config.sip {
            Some(settings) => Some((
                sip::SipEdge::new(settings.clone()),
                sip::bind(settings)
                    .await
                    .map_err(|(address, source)| ServerError::ListenSip { address, source })?,
            )),
            None => None,
        };
        let idle_timeout = config.turn.max_lifetime + Duration::from_secs(60);
        let mut fast_path = match &config.xdp {
            Some(settings) => FastPath::start(settings)?,
            None => None,
        };
        let announcements = fast_path.as_mut().and_then(FastPath::take_announcements);
        let fast_path = Arc::new(Mutex::new(fast_path));
        let control = config.control.clone().map(|settings| {
            let registration = control_link::registration(&config, &settings.agent_id);
            (settings, registration)
        });
        let mut nonce_key = [0u8; 32];
        StdRng::from_entropy().fill_bytes(&mut nonce_key);
        let mut local_addresses = Vec::new();
        let mut steered = config.steering && loops > 1;
        for group in &udp {
            if let Some(address) = group.first().and_then(|s| s.local_addr().ok()) {
                local_addresses.push((Transport::Udp, address));
            }
            steered = steered && steer(group);
        }
        // Loop i gets the i-th socket of every group.
        let mut per_loop: Vec<Vec<std::net::UdpSocket>> = (0..loops).map(|_| Vec::new()).collect();
        for group in udp {
            for (i, socket) in group.into_iter().enumerate() {
                per_loop[i].push(socket);
            }
        }
        let (gathering, gathers) = if config.gather_peers {
            gather(&config.turn, loops)
        } else {
            (None, Vec::new())
        };
        let gathered = gathering.is_some();
        if config.turn.consent != rampart_turn::server::Consent::Off
            && !config.turn.listener_sides.iter().any(|l| l.internal)
        {
            warn!(
                consent = ?config.turn.consent,
                "no listener has side = \"internal\": external users' media to the allowed networks is held until an internal party allocates, and none can"
            );
        }
        let configured_bandwidth = config.turn.bandwidth.default;
        let bandwidth_total = config.bandwidth_total;
        let relay_shared = Arc::new(SharedState::for_config(&config.turn, nonce_key));
        let settings = LoopSettings {
            shared: relay_shared.clone(),
            turn: config.turn,
            fast_path: fast_path.clone(),
            runtime: tokio::runtime::Handle::current(),
        };
        let (loops, threads) =
            relay_loop::start(&settings, per_loop, gathers).map_err(ServerError::Loops)?;
        info!(
            loops = loops.len(),
            steered,
            gathered,
            "relay loops started (steered: client datagrams reach their loop in the kernel; \
             gathered: each loop reads its peers' datagrams from one socket per family)"
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                connections_per_source: HashMap::new(),
                connections: 0,
                shell: ShellStats::default(),
                control: control_link::ControlState::new(configured_bandwidth),
                conferencing: Admission::default(),
                conference_sessions: HashMap::new(),
                conferencing_enabled: conferencing.is_some(),
                sip: sip.as_ref().map(|(edge, _)| edge.clone()),
            }),
            loops,
            fast_path,
            limits: config.connections,
            idle_timeout,
        });
        if let Some(announcements) = announcements {
            let shared = Arc::downgrade(&shared);
            let reader = std::thread::Builder::new()
                .name("rampart-netlink".into())
                .spawn(move || read_announcements(shared, announcements));
            if let Err(error) = reader {
                warn!(%error, "cannot start the netlink reader: cached next hops will not follow routing changes");
            }
        }
        let mut tasks = JoinSet::new();
        let acceptor = config.tls.map(tokio_rustls::TlsAcceptor::from);
        for (transport, listener) in tcp {
            if let Ok(address) = listener.local_addr() {
                local_addresses.push((transport, address));
            }
            let acceptor = if transport == Transport::Tls {
                acceptor.clone()
            } else {
                None
            };
            tasks.spawn(stream_listener(
                shared.clone(),
                listener,
                transport,
                acceptor,
            ));
        }
        tasks.spawn(timers(shared.clone(), stats_every));
        if let Some(total) = bandwidth_total {
            tasks.spawn(total_bandwidth::share(
                shared.clone(),
                relay_shared.clone(),
                total,
            ));
        }
        if let Some((settings, external, internal)) = conferencing {
            let service = conferencing::Conferencing::new(settings);
            for (listener, what) in [
                (&external, "participants (TLS)"),
                (&internal, "internal conferencing servers (mutual TLS)"),
            ] {
                if let Ok(address) = listener.local_addr() {
                    info!(%address, "Web Conferencing Edge listening for {what}");
                }
            }
            tasks.spawn(conferencing::external_listener(
                shared.clone(),
                service.clone(),
                external,
            ));
            tasks.spawn(conferencing::internal_listener(
                shared.clone(),
                service,
                internal,
            ));
        }
        if let Some((edge, listeners)) = sip {
            sip::start(&edge, listeners, &mut tasks);
        }
        if let Some((settings, registration)) = control {
            info!(
                endpoint = settings.link.endpoint(),
                agent_id = settings.agent_id,
                "control service link enabled"
            );
            tasks.spawn(control_link::run(shared.clone(), settings, registration));
        }
        for (transport, address) in &local_addresses {
            info!(?transport, %address, "listening for TURN clients");
        }
        Ok(Edge {
            shared,
            tasks,
            threads,
            local_addresses,
            _gathering: gathering,
        })
    }

    pub fn local_addresses(&self) -> &[(Transport, SocketAddr)] {
        &self.local_addresses
    }

    pub async fn counters(&self) -> Counters {
        let reports = self.shared.loops.reports(0).await;
        self.shared.counters(&reports)
    }

    /// Serve until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        shutdown.cancelled().await;
        let allocations: usize = self
            .shared
            .loops
            .reports(0)
            .await
            .iter()
            .map(|r| r.allocations)
            .sum();
        info!(allocations, "shutting down");
        self.tasks.shutdown().await;
        self.shared.loops.broadcast(|| Command::Shutdown).await;
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// `loops` UDP sockets bound to `address` in one reuseport group (the first fixes the port
/// when `address` asks for any).
fn reuseport_group(address: SocketAddr, loops: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let mut group: Vec<std::net::UdpSocket> = Vec::with_capacity(loops);
    for _ in 0..loops {
        let address = group
            .first()
            .map_or(Ok(address), std::net::UdpSocket::local_addr)?;
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&address.into())?;
        group.push(socket.into());
    }
    Ok(group)
}

/// Each loop's receive sockets (one per relay address family, bound to the relay address on a
/// port of the kernel's choosing) with the gathering program attached to this network
/// namespace, and its handle on the relay address map; none when the program cannot be
/// attached (no BPF, not permitted): loops then read each relay socket on its own.
fn gather(turn: &ServerConfig, loops: usize) -> (Option<Gathering>, Vec<Gather>) {
    let attempt = || -> Result<(Gathering, Vec<Gather>), Box<dyn std::error::Error>> {
        let relay_ips: Vec<IpAddr> = [&turn.relay_v4, &turn.relay_v6]
            .into_iter()
            .flatten()
            .map(|relay| relay.bind)
            .collect();
        // The program keys on the address datagrams are sent to, which a wildcard bind is not.
        if let Some(ip) = relay_ips.iter().find(|ip| ip.is_unspecified()) {
            return Err(format!("the relay binds {ip}, not one address").into());
        }
        let mut receivers = Vec::new();
        for loop_index in 0..loops {
            let mut sockets = Vec::new();
            for &ip in &relay_ips {
                sockets.push((
                    socket_index(loop_index as u32, ip.is_ipv6()),
                    receive_socket(ip, turn.port_range)?,
                ));
            }
            receivers.push(sockets);
        }
        let places: Vec<ReceiveSocket<'_, std::net::UdpSocket>> = receivers
            .iter()
            .flatten()
            .map(|(index, socket)| ReceiveSocket {
                index: *index,
                socket,
            })
            .collect();
        let gathering = Gathering::attach(&places, turn.port_range.0..=turn.port_range.1)?;
        let gathers = receivers
            .into_iter()
            .map(|sockets| {
                Ok(Gather {
                    receivers: sockets.into_iter().map(|(_, socket)| socket).collect(),
                    ports: gathering.relay_ports()?,
                })
            })
            .collect::<Result<_, XdpError>>()?;
        Ok((gathering, gathers))
    };
    match attempt() {
        Ok((gathering, gathers)) => (Some(gathering), gathers),
        Err(error) => {
            // The verifier's log is in the sources.
            let mut reason = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                reason = format!("{reason}: {cause}");
                source = cause.source();
            }
            warn!(error = %reason, "cannot gather peer datagrams in the kernel: relay loops read each relay socket on its own");
            (None, Vec::new())
        }
    }
}

/// Tries at finding a receive socket port outside the relay range, which the kernel's
/// ephemeral range usually overlaps.
const RECEIVE_PORT_TRIES: usize = 16;

/// A gathering socket on `ip`: original destinations reported, a large receive queue, bound
/// to a port the kernel picks, outside `relay_ports` if one of a few picks is (a relay port
/// it held could not be allocated).
fn receive_socket(ip: IpAddr, relay_ports: (u16, u16)) -> io::Result<std::net::UdpSocket> {
    let mut tries = 0;
    loop {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(SocketAddr::new(ip, 0)),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        let (level, option) = if ip.is_ipv6() {
            socket.set_only_v6(true)?;
            (libc::IPPROTO_IPV6, libc::IPV6_RECVORIGDSTADDR)
        } else {
            (libc::IPPROTO_IP, libc::IP_RECVORIGDSTADDR)
        };
        batch_io::set_int_option(&socket, level, option, 1)?;
        if batch_io::set_int_option(
            &socket,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            GATHER_RECEIVE_BUFFER,
        )
        .is_err()
        {
            socket.set_recv_buffer_size(GATHER_RECEIVE_BUFFER as usize)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::new(ip, 0).into())?;
        let port = socket
            .local_addr()?
            .as_socket()
            .map_or(0, |address| address.port());
        tries += 1;
        if !(relay_ports.0..=relay_ports.1).contains(&port) || tries == RECEIVE_PORT_TRIES {
            return Ok(socket.into());
        }
    }
}

/// Attach the steering program to a listener's group, so that each client's datagrams reach
/// the loop that owns it; false when it cannot be. Without it (no BPF, not permitted) the
/// kernel spreads datagrams by its own hash and loops hand the ones they do not own to their
/// owner: correct, slower.
fn steer(group: &[std::net::UdpSocket]) -> bool {
    match Steering::attach(group) {
        Ok(_) => true,
        Err(error) => {
            warn!(%error, "cannot steer client datagrams in the kernel: relay loops hand them to their owner loop");
            false
        }
    }
}

async fn stream_listener(
    shared: Arc<Shared>,
    listener: TcpListener,
    transport: Transport,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !shared.admit(client.ip()) {
            debug!(%client, "connection refused: connection limit");
            continue;
        }
        let Ok(server) = stream.local_addr() else {
            shared.release_connection(client.ip());
            continue;
        };
        let _ = stream.set_nodelay(true);
        let five_tuple = FiveTuple {
            transport,
            client,
            server,
        };
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_stream(&shared, five_tuple, stream).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        shared.limits.tls_handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await;
                    match handshake {
                        Ok(Ok(stream)) => serve_stream(&shared, five_tuple, stream).await,
                        Ok(Err(error)) => {
                            shared.lock().shell.tls_handshake_failures += 1;
                            debug!(%client, %error, "TLS handshake failed");
                        }
                        Err(_) => {
                            shared.lock().shell.tls_handshake_failures += 1;
                            debug!(%client, "TLS handshake timed out");
                        }
                    }
                }
            }
            shared.release_connection(client.ip());
        });
    }
}

/// One TCP or TLS client: frames in (RFC 8656 §12.5 framing) to the loop that serves it,
/// frames out from it. A client data connection of a TCP allocation (RFC 6062) is served by
/// the loop that issued the CONNECTION-ID of its ConnectionBind, and passes bytes as they are
/// once that loop splices it to its peer connection.
async fn serve_stream<S>(shared: &Arc<Shared>, five_tuple: FiveTuple, stream: S)
where
    S: AsyncRead + AsyncWrite + std::os::fd::AsRawFd + Send + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<ToStream>(STREAM_QUEUE);
    let (write_buffers_back, write_buffers) = std::sync::mpsc::sync_channel(WRITE_BUFFERS);
    let (read_buffers_back, mut read_buffers) = std::sync::mpsc::sync_channel(READ_BUFFERS);
    let loops = &shared.loops;
    // Given to the loop with the first frames, once they say which loop serves the connection.
    let mut route = Route {
        link: Some(StreamLink {
            writer: tx,
            write_buffers,
            read_buffers: read_buffers_back,
        }),
        serving: None,
    };
    let mut incoming = Incoming::default();
    let bind = BindWait::default();
    debug!(client = %five_tuple.client, transport = ?five_tuple.transport, "client connected");
    let spliced = {
        let write = async {
            while let Some(item) = rx.recv().await {
                let frame = match item {
                    ToStream::Frame(frame) => frame,
                    ToStream::Splice(peer) => return Some(peer),
                };
                if writer.write_all(&frame).await.is_err() {
                    break;
                }
                bind.answered();
                // Large ones (a burst of big messages) are freed rather than kept by an idle
                // client.
                if frame.capacity() <= POOLED_WRITE_CAPACITY {
                    let _ = write_buffers_back.try_send(frame);
                }
            }
            None
        };
        let read = read_frames(
            shared,
            five_tuple,
            &mut reader,
            &mut incoming,
            &mut route,
            &mut read_buffers,
            &bind,
        );
        tokio::pin!(write);
        // The writer first: a splice it reaches wins over bytes the reader would take.
        let reason = tokio::select! {
            biased;
            ended = &mut write => ended.ok_or("write failed"),
            reason = read => Err(reason),
        };
        match reason {
            Ok(peer) => Some(peer),
            Err(reason) => {
                debug!(client = %five_tuple.client, reason, "client disconnected");
                if let Some(to) = route.serving {
                    let closed = Command::StreamClosed {
                        five_tuple,
                        relayed: RelayedBytes::default(),
                    };
                    loops.send_to(to, five_tuple.client, closed).await;
                    // What the loop answered to the frames it was sent is still written: the
                    // loop drops its end of the writer's queue when it takes the close, which
                    // ends the writer once drained.
                    if reason != "write failed" {
                        let _ = tokio::time::timeout(STREAM_DRAIN, write).await;
                    }
                }
                None
            }
        }
    };
    let (Some(peer), Some(to)) = (spliced, route.serving) else {
        return;
    };
    debug!(client = %five_tuple.client, "client data connection spliced to its peer");
    let relayed = data_connection::splice(reader.unsplit(writer), peer, incoming.bytes()).await;
    debug!(client = %five_tuple.client, ?relayed, "client data connection closed");
    loops
        .send_to(
            to,
            five_tuple.client,
            Command::StreamClosed {
                five_tuple,
                relayed,
            },
        )
        .await;
}

/// Which loop serves a stream client: decided by its first frames, when the loop is given
/// the connection's link (`serving`: `Some(None)` is the client's owner loop).
struct Route {
    link: Option<StreamLink>,
    serving: Option<Option<usize>>,
}

/// A ConnectionBind's wait for its answer (RFC 6062 §4.4: the client sends data only after
/// the success response). Until the answer is written the reader takes nothing more: what
/// follows a successful bind is raw data, not frames.
#[derive(Default)]
struct BindWait {
    awaiting: std::sync::atomic::AtomicBool,
    answer: tokio::sync::Notify,
}

impl BindWait {
    fn wait_for_answer(&self) {
        self.awaiting
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A frame was written to the client: the answer, if one was awaited.
    fn answered(&self) {
        // A load first: this runs for every frame written, and an answer is awaited only on a
        // ConnectionBind's connection, once.
        let awaiting = &self.awaiting;
        if awaiting.load(std::sync::atomic::Ordering::Relaxed)
            && awaiting.swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            self.answer.notify_one();
        }
    }

    async fn until_answered(&self) {
        while self.awaiting.load(std::sync::atomic::Ordering::Relaxed) {
            self.answer.notified().await;
        }
    }
}

/// A stream client's read buffer: `buf[..valid]` is what was read and not yet sent to the
/// loop (an incomplete frame), kept outside the reading task so that it survives the task's
/// end when the connection turns into a data connection.
#[derive(Default)]
struct Incoming {
    buf: Vec<u8>,
    valid: usize,
}

impl Incoming {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.valid]
    }
}

/// Read frames and send them to the loop that serves the connection ([`Route`]) until the
/// connection ends; returns why. Frames are relayed from the buffer they were read into: whole frames go to the loop
/// as read, and only an incomplete one at the end is copied, to the start of the next buffer.
async fn read_frames<R>(
    shared: &Arc<Shared>,
    five_tuple: FiveTuple,
    reader: &mut R,
    incoming: &mut Incoming,
    route: &mut Route,
    // Mutable, not shared: a std Receiver is Send but not Sync.
    read_buffers: &mut std::sync::mpsc::Receiver<Vec<u8>>,
    bind: &BindWait,
) -> &'static str
where
    R: AsyncRead + Unpin,
{
    let loops = &shared.loops;
    incoming.buf.reserve(READ_SIZE);
    loop {
        // At most READ_SIZE more per read: a command carries at most one incomplete frame
        // and READ_SIZE bytes, whatever the buffer's capacity grew to.
        let start = incoming.valid;
        incoming.buf.resize(start + READ_SIZE, 0);
        let read =
            tokio::time::timeout(shared.idle_timeout, reader.read(&mut incoming.buf[start..]))
                .await;
        let n = match read {
            Ok(Ok(0)) | Ok(Err(_)) => return "closed",
            Err(_) => return "idle timeout",
            Ok(Ok(n)) => n,
        };
        incoming.valid = start + n;
        let buf = &incoming.buf[..incoming.valid];
        let mut complete = 0;
        let mut first_frame = None;
        let mut framing = loop {
            match next_stream_frame(&buf[complete..]) {
                Ok(Some(len)) => {
                    first_frame.get_or_insert(len);
                    complete += len;
                }
                Ok(None) if buf.len() - complete <= MAX_STREAM_FRAME => break Ok(()),
                Ok(None) | Err(_) => break Err("not STUN or ChannelData framing"),
            }
        };
        // A connection that opens with a ConnectionBind goes to the loop that issued its
        // CONNECTION-ID, alone: what the client sent after it is held until the answer, as
        // raw data if the bind succeeds. (A ConnectionBind later on a connection goes to the
        // client's owner loop, which knows its id only by chance: a new connection is what
        // RFC 6062 §4.4 asks for.)
        let binding = match (route.serving, first_frame) {
            (None, Some(len)) => {
                data_connection::connection_bind_loop(&buf[..len]).map(|to| (to, len))
            }
            _ => None,
        };
        if let Some((_, len)) = binding {
            complete = len;
            framing = Ok(());
        }
        // The frames before a framing error are still relayed, in order.
        if complete > 0 {
            let to = match route.serving {
                Some(to) => to,
                None => {
                    let to = binding.map(|(to, _)| to);
                    route.serving = Some(to);
                    if let Some(stream) = route.link.take() {
                        let opened = Command::StreamOpened { five_tuple, stream };
                        loops.send_to(to, five_tuple.client, opened).await;
                    }
                    to
                }
            };
            let mut next = read_buffers
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(READ_SIZE));
            next.clear();
            next.extend_from_slice(&incoming.buf[complete..incoming.valid]);
            incoming.buf.truncate(complete);
            incoming.valid = next.len();
            let frames = std::mem::replace(&mut incoming.buf, next);
            if binding.is_some() {
                bind.wait_for_answer();
            }
            let command = Command::StreamFrames { five_tuple, frames };
            loops.send_to(to, five_tuple.client, command).await;
            bind.until_answered().await;
        }
        incoming.buf.truncate(incoming.valid);
        if let Err(reason) = framing {
            return reason;
        }
    }
}

/// Hands the kernel's routing, neighbour and link announcements to the fast path as they come,
/// until the edge is gone. Its own thread: netlink sockets are blocking, and a change must
/// reach the XDP maps at once (the next-hop cache follows the kernel within milliseconds).
fn read_announcements(
    shared: Weak<Shared>,
    mut announcements: rampart_xdp::netlink::Announcements,
) {
    loop {
        let batch = match announcements.next_batch() {
            Ok(batch) => batch,
            Err(error) => {
                warn!(%error, "reading netlink announcements failed: cached next hops no longer follow routing changes");
                return;
            }
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if batch.is_empty() {
            continue;
        }
        if let Some(fast_path) = &mut *lock(&shared.fast_path) {
            fast_path.announced(batch);
        }
    }
}

async fn timers(shared: Arc<Shared>, stats_every: Duration) {
    let mut tick = tokio::time::interval(TICK);
    let mut last_stats = Instant::now();
    let mut logged = None;
    loop {
        tick.tick().await;
        if let Some(fast_path) = &mut *lock(&shared.fast_path) {
            fast_path.sweep();
        }
        let now = Instant::now();
        if now.duration_since(last_stats) >= stats_every {
            last_stats = now;
            let reports = shared.loops.reports(0).await;
            let current = shared.counters(&reports);
            if logged.as_ref() != Some(&current) {
                match serde_json::to_string(&current) {
                    Ok(json) => info!(target: "rampart::counters", "counters {json}"),
                    Err(error) => warn!(%error, "cannot serialise counters"),
                }
                logged = Some(current);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathering_sockets_stay_off_the_relay_ports() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        // A third of the kernel's usual ephemeral range (32768-60999): 16 picks all inside
        // it happen about once in 10^7.
        let relay_ports = (40000, 49999);
        let socket = receive_socket(ip, relay_ports).unwrap();
        let port = socket.local_addr().unwrap().port();
        assert!(
            !(relay_ports.0..=relay_ports.1).contains(&port),
            "port {port}"
        );
        // With no port outside the range to find, the last pick is kept.
        assert!(receive_socket(ip, (1, 65535)).is_ok());
    }
}
