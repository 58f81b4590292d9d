//! The Web Conferencing Edge's I/O: the external TLS listener where participants join, the
//! internal mutual-TLS listener where conferencing servers keep idle connections (they dial
//! the edge; the edge never connects inwards), the pairing of the two, and the byte relay.
//! Who may join is decided by [`crate::psom::Admission`] under the shell's lock.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_psom::frame::{Assign, Frame, Join, RejectReason};
use rampart_psom::internal::read_frame;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::control_link::unix_now;
use super::{Shared, lock};
use crate::config::ConferencingSettings;

/// Sent on the internal port before the TLS handshake, so that `nc edge 8057` shows what
/// listens there.
pub const BANNER: &[u8] =
    b"Rampart Web Conferencing Edge, internal port: TLS 1.3 with a client certificate follows\r\n";
/// Idle internal connections kept beyond the configured pool, at most.
const POOL_SLACK: usize = 64;

type InternalStream = tokio_rustls::server::TlsStream<TcpStream>;

struct Idle {
    stream: InternalStream,
    server: String,
    peer: SocketAddr,
}

/// The listeners' shared state outside the shell's lock.
pub(super) struct Conferencing {
    settings: ConferencingSettings,
    external: TlsAcceptor,
    internal: TlsAcceptor,
    pool: Mutex<VecDeque<Idle>>,
    available: Notify,
    /// Admitted participants waiting for an internal connection.
    waiting: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
}

impl Conferencing {
    pub(super) fn new(settings: ConferencingSettings) -> Arc<Conferencing> {
        Arc::new(Conferencing {
            external: TlsAcceptor::from(settings.external_tls.clone()),
            internal: TlsAcceptor::from(settings.internal_tls.clone()),
            settings,
            pool: Mutex::new(VecDeque::new()),
            available: Notify::new(),
            waiting: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
        })
    }

    pub(super) fn idle_connections(&self) -> usize {
        lock(&self.pool).len()
    }
}

/// The next connection (accept errors, such as running out of descriptors, are passed over).
async fn accept(listener: &TcpListener, leg: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                debug!(%error, leg, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Internal conferencing servers connect here and wait to be assigned a participant.
pub(super) async fn internal_listener(
    shared: Arc<Shared>,
    conferencing: Arc<Conferencing>,
    listener: TcpListener,
) {
    loop {
        let (tcp, peer) = accept(&listener, "internal").await;
        let conferencing = conferencing.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            match register_internal(&conferencing, tcp, peer).await {
                Ok(server) => {
                    shared
                        .lock()
                        .conferencing
                        .counters
                        .internal_connections_idle = conferencing.idle_connections() as u64;
                    debug!(%server, %peer, "internal conferencing connection ready");
                }
                Err(error) => {
                    shared.lock().conferencing.counters.connections_refused += 1;
                    info!(%peer, %error, "internal connection refused");
                }
            }
        });
    }
}

async fn register_internal(
    conferencing: &Conferencing,
    mut tcp: TcpStream,
    peer: SocketAddr,
) -> io::Result<String> {
    let limit = conferencing.settings.join_timeout;
    tcp.set_nodelay(true)?;
    tcp.write_all(BANNER).await?;
    let mut tls = tokio::time::timeout(limit, conferencing.internal.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let hello = tokio::time::timeout(limit, read_frame(&mut tls))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no Hello in time"))?
        .map_err(io::Error::other)?;
    let Frame::Hello { server } = hello else {
        return Err(io::Error::other("the first frame must be Hello"));
    };
    let target = usize::from(conferencing.settings.pool);
    let (idle, wanted) = {
        let pool = lock(&conferencing.pool);
        (
            pool.len(),
            target + conferencing.waiting.load(Ordering::Relaxed),
        )
    };
    if idle >= target + POOL_SLACK {
        return Err(io::Error::other("the pool is full"));
    }
    // This one counts too.
    let need = wanted.saturating_sub(idle + 1);
    if need > 0 {
        let connections = u16::try_from(need).unwrap_or(u16::MAX);
        tls.write_all(&Frame::Need { connections }.encode()).await?;
    }
    lock(&conferencing.pool).push_back(Idle {
        stream: tls,
        server: server.clone(),
        peer,
    });
    conferencing.available.notify_one();
    Ok(server)
}

/// An idle internal connection, waiting until `deadline` for one.
async fn take_internal(
    conferencing: &Conferencing,
    deadline: tokio::time::Instant,
) -> Option<Idle> {
    conferencing.waiting.fetch_add(1, Ordering::Relaxed);
    let taken = loop {
        let notified = conferencing.available.notified();
        if let Some(idle) = lock(&conferencing.pool).pop_front() {
            break Some(idle);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break lock(&conferencing.pool).pop_front();
        }
    };
    conferencing.waiting.fetch_sub(1, Ordering::Relaxed);
    taken
}

/// Participants join here.
pub(super) async fn external_listener(
    shared: Arc<Shared>,
    conferencing: Arc<Conferencing>,
    listener: TcpListener,
) {
    loop {
        let (tcp, peer) = accept(&listener, "external").await;
        let Some(slot) = SourceSlot::claim(&conferencing, peer.ip()) else {
            shared.lock().conferencing.counters.connections_refused += 1;
            debug!(%peer, "conferencing connection refused: too many from this source or in total");
            continue;
        };
        let shared = shared.clone();
        let conferencing = conferencing.clone();
        tokio::spawn(async move {
            participant(&shared, &conferencing, tcp, peer).await;
            drop(slot);
        });
    }
}

/// A connection counted against the per-source and total limits until dropped.
struct SourceSlot {
    conferencing: Arc<Conferencing>,
    source: IpAddr,
}

impl SourceSlot {
    fn claim(conferencing: &Arc<Conferencing>, source: IpAddr) -> Option<SourceSlot> {
        let settings = &conferencing.settings;
        let mut per_source = lock(&conferencing.per_source);
        let count = per_source.entry(source).or_default();
        if *count >= settings.connections_per_source
            || conferencing.total.load(Ordering::Relaxed) >= settings.connections_total
        {
            return None;
        }
        *count += 1;
        conferencing.total.fetch_add(1, Ordering::Relaxed);
        Some(SourceSlot {
            conferencing: conferencing.clone(),
            source,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut per_source = lock(&self.conferencing.per_source);
        if let Some(count) = per_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                per_source.remove(&self.source);
            }
        }
        self.conferencing.total.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn participant(
    shared: &Arc<Shared>,
    conferencing: &Conferencing,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let settings = &conferencing.settings;
    let _ = tcp.set_nodelay(true);
    let Ok(Ok(mut client)) =
        tokio::time::timeout(settings.join_timeout, conferencing.external.accept(tcp)).await
    else {
        debug!(%peer, "conferencing TLS handshake failed or timed out");
        return;
    };
    let join = match tokio::time::timeout(settings.join_timeout, read_frame(&mut client)).await {
        Ok(Ok(Frame::Join(join))) => join,
        Ok(_) => return refuse(shared, &mut client, peer, None, RejectReason::Malformed).await,
        Err(_) => return refuse(shared, &mut client, peer, None, RejectReason::Timeout).await,
    };
    let admitted = {
        let mut state = shared.lock();
        state.conferencing.admit(&join, unix_now()).map(|()| {
            state
                .conference_sessions
                .entry(join.conference_id.clone())
                .or_default()
                .clone()
        })
    };
    let cancel = match admitted {
        Ok(cancel) => cancel,
        Err(reason) => return refuse(shared, &mut client, peer, Some(&join), reason).await,
    };
    let deadline = tokio::time::Instant::now() + settings.wait_for_server;
    let assign = Assign {
        conference_id: join.conference_id.clone(),
        anonymous: join.anonymous,
        display_name: join.display_name.clone(),
        client: peer.to_string(),
    };
    let internal = loop {
        let taken = take_internal(conferencing, deadline).await;
        shared
            .lock()
            .conferencing
            .counters
            .internal_connections_idle = conferencing.idle_connections() as u64;
        let Some(mut idle) = taken else {
            shared
                .lock()
                .conferencing
                .withdraw(&join.conference_id, RejectReason::ServiceUnavailable);
            warn!(conference = %join.conference_id, %peer, "no internal conferencing server available");
            let _ = send(&mut client, RejectReason::ServiceUnavailable).await;
            return;
        };
        // An idle connection may have died since; the next one is tried.
        if idle
            .stream
            .write_all(&Frame::Assign(assign.clone()).encode())
            .await
            .is_ok()
        {
            break idle;
        }
        debug!(server = %idle.server, internal = %idle.peer, "idle internal connection lost");
    };
    if client.write_all(&Frame::Accept.encode()).await.is_err() {
        shared.lock().conferencing.leave(&join.conference_id);
        return;
    }
    info!(
        conference = %join.conference_id,
        %peer,
        anonymous = join.anonymous,
        server = %internal.server,
        "participant joined"
    );
    let bytes = Traffic::default();
    let ended = relay(
        client,
        internal.stream,
        settings.idle_timeout,
        &cancel,
        &bytes,
    )
    .await;
    let mut state = shared.lock();
    state.conferencing.leave(&join.conference_id);
    state.conferencing.counters.bytes_from_clients += bytes.from_client.load(Ordering::Relaxed);
    state.conferencing.counters.bytes_to_clients += bytes.to_client.load(Ordering::Relaxed);
    info!(conference = %join.conference_id, %peer, why = ended, "participant left");
}

async fn refuse<S: AsyncWrite + Unpin>(
    shared: &Shared,
    client: &mut S,
    peer: SocketAddr,
    join: Option<&Join>,
    reason: RejectReason,
) {
    if join.is_none() {
        // admit() counts its own refusals.
        shared.lock().conferencing.reject(reason);
    }
    info!(
        %peer,
        conference = join.map_or("", |j| j.conference_id.as_str()),
        reason = reason.name(),
        "join refused"
    );
    let _ = send(client, reason).await;
}

async fn send<S: AsyncWrite + Unpin>(client: &mut S, reason: RejectReason) -> io::Result<()> {
    client
        .write_all(
            &Frame::Reject {
                reason,
                text: reason.text().to_owned(),
            }
            .encode(),
        )
        .await?;
    client.shutdown().await
}

#[derive(Default)]
struct Traffic {
    from_client: AtomicU64,
    to_client: AtomicU64,
}

/// Bytes both ways, each direction writing before it reads more (back-pressure), until a
/// side closes, nothing moves for `idle`, or the conference is revoked. Says which.
async fn relay(
    client: tokio_rustls::server::TlsStream<TcpStream>,
    internal: InternalStream,
    idle: Duration,
    cancel: &CancellationToken,
    traffic: &Traffic,
) -> &'static str {
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let (client_read, client_write) = tokio::io::split(client);
    let (internal_read, internal_write) = tokio::io::split(internal);
    let up = pump(
        client_read,
        internal_write,
        &traffic.from_client,
        &last,
        started,
    );
    let down = pump(
        internal_read,
        client_write,
        &traffic.to_client,
        &last,
        started,
    );
    let watchdog = async {
        loop {
            let quiet = started
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        _ = up => "participant closed",
        _ = down => "server closed",
        () = watchdog => "idle timeout",
        () = cancel.cancelled() => "conference revoked",
    }
}

async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut from: R,
    mut to: W,
    bytes: &AtomicU64,
    last: &AtomicU64,
    started: Instant,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        last.store(
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}
