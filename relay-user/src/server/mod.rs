//! The tokio shell around [`rampart_turn::Server`]: sockets in, bytes to the state machine,
//! bytes out. No protocol decision is made here.
//!
//! One lock guards the state machine, the relay sockets and the stream connections; it is
//! held only for the synchronous call into the state machine, never across an `.await`.

mod conferencing;
mod control_link;
mod relay_socket;
mod sip;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, ConnectionLimits};
use crate::psom::{Admission, ConferencingCounters};
use rampart_turn::channel_data::{MAX_STREAM_FRAME, next_stream_frame};
use rampart_turn::server::{Output, Payload};
use rampart_turn::{FiveTuple, Server, SharedState, Stats, Transmit, Transport};
use rampart_xdp::XdpError;

pub use rampart_xdp::fast_path::{FastPath, FastPathStats};

/// Frames queued towards one stream client before further ones are dropped: a client that
/// does not read its media must not hold memory without bound.
const STREAM_QUEUE: usize = 256;
/// How often expiries are swept (the state machine's timers are exact to this).
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
    pub stream_frames_dropped: u64,
    pub send_failures: u64,
}

struct State {
    core: Server,
    fast_path: Option<FastPath>,
    relays: HashMap<SocketAddr, relay_socket::RelaySocket>,
    streams: HashMap<FiveTuple, mpsc::Sender<Vec<u8>>>,
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

impl State {
    /// Carry out what the core asked for, in order: relay binds are made and answered at
    /// once, channel changes go to the kernel (or nowhere without a fast path), transmits
    /// are resolved to where they go and left in `sends` for after the lock.
    fn carry_out(&mut self, shared: &Arc<Shared>, sends: &mut Vec<Route>) {
        let mut channel_changes = Vec::new();
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Transmit(transmit) => sends.extend(self.route(shared, transmit)),
                Output::BindRelay {
                    relay,
                    dont_fragment,
                } => {
                    let bound = relay_socket::bind(&mut self.relays, shared, relay, dont_fragment);
                    self.core.handle_bind_result(relay, bound, Instant::now());
                }
                Output::ReleaseRelay { relay } => relay_socket::release(&mut self.relays, relay),
                Output::FastPath(change) => channel_changes.push(change),
            }
        }
        if let Some(fast_path) = &mut self.fast_path
            && !channel_changes.is_empty()
        {
            for (five_tuple, bytes) in fast_path.apply(channel_changes, Instant::now()) {
                self.core.credit_fast_path(&five_tuple, bytes);
            }
        }
    }

    fn route(&self, shared: &Shared, transmit: Transmit) -> Option<Route> {
        match transmit {
            Transmit::ToClient {
                five_tuple,
                payload,
            } => match five_tuple.transport {
                Transport::Udp => shared
                    .udp_listeners
                    .get(&five_tuple.server)
                    .map(|s| Route::Datagram(s.clone(), five_tuple.client, payload)),
                Transport::Tcp | Transport::Tls => self
                    .streams
                    .get(&five_tuple)
                    .map(|tx| Route::Stream(tx.clone(), payload)),
            },
            Transmit::ToPeer {
                relay,
                peer,
                payload,
            } => self
                .relays
                .get(&relay)
                .map(|r| Route::Datagram(r.sender.clone(), peer, payload)),
        }
    }
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

impl State {
    fn counters(&self) -> Counters {
        Counters {
            allocations: self.core.allocation_count(),
            relay: self.core.stats().clone(),
            shell: self.shell,
            fast_path: self.fast_path.as_ref().map(FastPath::stats),
            xdp: self
                .fast_path
                .as_ref()
                .and_then(|f| f.program().stats().ok())
                .unwrap_or_default()
                .into_iter()
                .map(|(stat, c)| (stat.name(), c.packets, c.bytes))
                .collect(),
            conferencing: self
                .conferencing_enabled
                .then(|| self.conferencing.counters.clone()),
            sip: self.sip.as_ref().map(|edge| edge.stats()),
        }
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
    udp_listeners: HashMap<SocketAddr, Arc<UdpSocket>>,
    limits: ConnectionLimits,
    idle_timeout: Duration,
}

/// Where a transmit goes, resolved under the lock and sent after it. Datagrams leave with a
/// plain `sendto` on the socket's descriptor: tokio's `try_send_to` reports a fresh socket
/// unwritable until its reactor has seen it, which would drop the first packets of every new
/// allocation.
enum Route {
    Datagram(Arc<UdpSocket>, SocketAddr, Payload),
    Stream(mpsc::Sender<Vec<u8>>, Payload),
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the whole relay down with a poisoned lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run one state-machine step and resolve where its output goes, into `sends`.
    fn step(self: &Arc<Self>, sends: &mut Vec<Route>, f: impl FnOnce(&mut Server)) {
        let mut guard = self.lock();
        let state = &mut *guard;
        f(&mut state.core);
        state.carry_out(self, sends);
    }

    /// Send what a step resolved; `buf` is the buffer its input came in (in-place payloads).
    fn send(&self, sends: &mut Vec<Route>, buf: &[u8]) {
        let mut failures = 0;
        for route in sends.drain(..) {
            let sent = match route {
                // UDP is best effort: a full socket buffer drops, like the network would.
                Route::Datagram(socket, to, payload) => {
                    let bytes = match &payload {
                        Payload::Message(message) => message.as_slice(),
                        Payload::InPlace(range) => buf.get(range.clone()).unwrap_or_default(),
                    };
                    socket2::SockRef::from(&*socket)
                        .send_to(bytes, &to.into())
                        .is_ok()
                }
                Route::Stream(tx, payload) => {
                    let frame = match payload {
                        Payload::Message(message) => message,
                        Payload::InPlace(range) => buf.get(range).unwrap_or_default().to_vec(),
                    };
                    tx.try_send(frame).is_ok()
                }
            };
            if !sent {
                failures += 1;
            }
        }
        if failures > 0 {
            self.lock().shell.send_failures += failures;
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

/// A running edge: listeners bound, tasks spawned.
pub struct Edge {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    local_addresses: Vec<(Transport, SocketAddr)>,
}

impl Edge {
    /// Bind every listener (failing on the first that cannot be bound) and start serving.
    /// `stats_every`: how often the counters are logged (when they changed).
    pub async fn start(config: Config, stats_every: Duration) -> Result<Self, ServerError> {
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
                    udp.push(udp_socket(listener.address).map_err(error)?);
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
        let now = Instant::now();
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let idle_timeout = config.turn.max_lifetime + Duration::from_secs(60);
        let mut fast_path = match &config.xdp {
            Some(settings) => FastPath::start(settings)?,
            None => None,
        };
        let announcements = fast_path.as_mut().and_then(FastPath::take_announcements);
        let control = config.control.clone().map(|settings| {
            let registration = control_link::registration(&config, &settings.agent_id);
            (settings, registration)
        });
        let mut rng = StdRng::from_entropy();
        let mut nonce_key = [0u8; 32];
        rng.fill_bytes(&mut nonce_key);
        let shared_state = Arc::new(SharedState::for_config(&config.turn, nonce_key));
        let core = Server::new(config.turn, shared_state, rng, now, unix_now);
        let mut local_addresses = Vec::new();
        let mut receivers = Vec::new();
        let mut udp_listeners = HashMap::new();
        for socket in udp {
            if let Ok(address) = socket.local_addr() {
                udp_listeners.insert(address, socket.clone());
                receivers.push((address, socket));
            }
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                core,
                fast_path,
                relays: HashMap::new(),
                streams: HashMap::new(),
                connections_per_source: HashMap::new(),
                connections: 0,
                shell: ShellStats::default(),
                control: control_link::ControlState::default(),
                conferencing: Admission::default(),
                conference_sessions: HashMap::new(),
                conferencing_enabled: conferencing.is_some(),
                sip: sip.as_ref().map(|(edge, _)| edge.clone()),
            }),
            udp_listeners,
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
        for (address, receiver) in receivers {
            local_addresses.push((Transport::Udp, address));
            tasks.spawn(udp_listener(shared.clone(), address, receiver));
        }
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
            local_addresses,
        })
    }

    pub fn local_addresses(&self) -> &[(Transport, SocketAddr)] {
        &self.local_addresses
    }

    pub fn counters(&self) -> Counters {
        self.shared.lock().counters()
    }

    /// Serve until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        shutdown.cancelled().await;
        let allocations = self.shared.lock().core.allocation_count();
        info!(allocations, "shutting down");
        self.tasks.shutdown().await;
    }
}

async fn udp_listener(shared: Arc<Shared>, local: SocketAddr, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65536];
    let mut sends = Vec::new();
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                debug!(%local, %error, "UDP receive error");
                continue;
            }
        };
        let five_tuple = FiveTuple {
            transport: Transport::Udp,
            client,
            server: local,
        };
        let input = &buf[..len];
        shared.step(&mut sends, |core| {
            core.handle_client_input(five_tuple, input, Instant::now());
        });
        shared.send(&mut sends, input);
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

/// One TCP or TLS client: frames in (RFC 8656 §12.5 framing), queued frames out.
async fn serve_stream<S>(shared: &Arc<Shared>, five_tuple: FiveTuple, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(STREAM_QUEUE);
    shared.lock().streams.insert(five_tuple, tx);
    debug!(client = %five_tuple.client, transport = ?five_tuple.transport, "client connected");
    let write = async {
        while let Some(frame) = rx.recv().await {
            if writer.write_all(&frame).await.is_err() {
                break;
            }
        }
    };
    let read = async {
        let mut buf = Vec::with_capacity(4096);
        let mut sends = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let read = tokio::time::timeout(shared.idle_timeout, reader.read(&mut chunk)).await;
            let n = match read {
                Ok(Ok(0)) | Ok(Err(_)) => return "closed",
                Err(_) => return "idle timeout",
                Ok(Ok(n)) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            loop {
                match next_stream_frame(&buf) {
                    Ok(Some(len)) => {
                        let frame = &buf[..len];
                        shared.step(&mut sends, |core| {
                            core.handle_client_input(five_tuple, frame, Instant::now());
                        });
                        shared.send(&mut sends, frame);
                        buf.drain(..len);
                    }
                    Ok(None) if buf.len() <= MAX_STREAM_FRAME => break,
                    Ok(None) | Err(_) => return "not STUN or ChannelData framing",
                }
            }
        }
    };
    let reason = tokio::select! {
        reason = read => reason,
        () = write => "write failed",
    };
    debug!(client = %five_tuple.client, reason, "client disconnected");
    let mut guard = shared.lock();
    let state = &mut *guard;
    state.streams.remove(&five_tuple);
    state.core.client_closed(five_tuple);
    state.carry_out(shared, &mut Vec::new());
}

/// A bound UDP socket as a plain, non-blocking sending half and a tokio receiving half.
/// A non-blocking UDP socket for both directions: received through tokio, sent with a plain
/// `sendto` on the same descriptor (see [`Route`]), so each relay costs one descriptor.
pub(crate) fn udp_socket(address: SocketAddr) -> io::Result<Arc<UdpSocket>> {
    let socket = std::net::UdpSocket::bind(address)?;
    socket.set_nonblocking(true)?;
    Ok(Arc::new(UdpSocket::from_std(socket)?))
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
        if let Some(fast_path) = &mut shared.lock().fast_path {
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
        let now = Instant::now();
        let mut guard = shared.lock();
        let state = &mut *guard;
        state.core.handle_timeout(now);
        state.carry_out(&shared, &mut Vec::new());
        if let Some(fast_path) = &mut state.fast_path {
            fast_path.sweep();
        }
        if now.duration_since(last_stats) >= stats_every {
            last_stats = now;
            let current = state.counters();
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
