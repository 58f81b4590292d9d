//! The listener: TCP accept with per-source and total connection limits, the TLS handshake
//! under a timeout, the caller's roles from its certificate, then tonic on the connection.
//!
//! We run the accept loop and TLS ourselves instead of tonic's TLS so that the rustls
//! configuration (TLS 1.3 only, required client certificates, CRLs) is exactly ours, can be
//! swapped on a certificate rotation, and so the verified certificate's SANs reach every
//! request.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;

use proto::control::v1::front_end_server::FrontEndServer;
use proto::control::v1::operator_server::OperatorServer;
use proto::control::v1::relay_agent_server::RelayAgentServer;

use crate::config::{Config, ConnectionLimits};
use crate::identity::{Role, RoleMap, san_names};
use crate::service::{
    AgentService, Caller, CallerInfo, FrontEndService, OperatorService, now_unix, require,
};
use crate::state::State;
use crate::store::Store;
use crate::{Error, tls};

/// How often expired conferences and stale revocations are removed.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Handshaken connections waiting for tonic to pick them up.
const ACCEPTED_QUEUE: usize = 64;
/// After an accept error (out of file descriptors, typically), wait before the next accept
/// instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Counts connections per source address and in total.
struct ConnectionLimiter {
    limits: ConnectionLimits,
    counts: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One counted connection; dropping it frees the slot.
struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
    source: IpAddr,
}

impl ConnectionLimiter {
    fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Option<ConnectionSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_source) = &mut *counts;
        let from_source = per_source.entry(source).or_insert(0);
        if *total >= self.limits.total || *from_source >= self.limits.per_source {
            if *from_source == 0 {
                per_source.remove(&source);
            }
            return None;
        }
        *total += 1;
        *from_source += 1;
        Some(ConnectionSlot {
            limiter: self.clone(),
            source,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (total, per_source) = &mut *counts;
        *total = total.saturating_sub(1);
        if let Some(count) = per_source.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

/// A verified mutual-TLS connection, with who is on the other end.
struct TlsConnection {
    stream: TlsStream<TcpStream>,
    caller: CallerInfo,
    _slot: ConnectionSlot,
}

impl Connected for TlsConnection {
    type ConnectInfo = CallerInfo;

    fn connect_info(&self) -> CallerInfo {
        self.caller.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// What a connection's handshake task needs.
#[derive(Clone)]
struct Handshaker {
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    roles: Arc<RoleMap>,
    timeout: Duration,
    accepted: mpsc::Sender<TlsConnection>,
}

impl Handshaker {
    async fn run(self, tcp: TcpStream, peer: SocketAddr, slot: ConnectionSlot) {
        // The configuration current when the connection arrived; a rotation applies to the
        // connections after it.
        let acceptor = TlsAcceptor::from(self.tls.borrow().clone());
        let stream = match tokio::time::timeout(self.timeout, acceptor.accept(tcp)).await {
            Err(_) => {
                tracing::info!(%peer, "TLS handshake timed out");
                return;
            }
            Ok(Err(error)) => {
                // No certificate, an unknown CA, a revoked certificate, TLS 1.2: all end here.
                tracing::info!(%peer, %error, "TLS handshake refused");
                return;
            }
            Ok(Ok(stream)) => stream,
        };
        let Some(leaf) = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
        else {
            // The verifier requires a certificate; without one the handshake cannot succeed.
            tracing::warn!(%peer, "TLS handshake completed without a client certificate; closing");
            return;
        };
        let names = match san_names(leaf) {
            Ok(names) => names,
            Err(error) => {
                tracing::warn!(%peer, %error, "client certificate unreadable; closing");
                return;
            }
        };
        let roles = self.roles.roles_of(&names);
        let caller = Caller { peer, names, roles };
        if roles.is_empty() {
            // Kept open so its RPCs fail with PERMISSION_DENIED naming the problem, which is
            // easier to diagnose than a dropped connection.
            tracing::warn!(%peer, identity = %caller.identity(), "client certificate is on no role allow list");
        } else {
            tracing::debug!(%peer, identity = %caller.identity(), %roles, "connection accepted");
        }
        let connection = TlsConnection {
            stream,
            caller: CallerInfo(Arc::new(caller)),
            _slot: slot,
        };
        // Fails only when the server is stopping; the connection is then dropped.
        let _ = self.accepted.send(connection).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    limiter: Arc<ConnectionLimiter>,
    handshaker: Handshaker,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Some(slot) = limiter.try_acquire(peer.ip()) else {
            // Debug, not info: a flood of refused connections must not flood the log too.
            tracing::debug!(%peer, "connection refused: connection limit reached");
            continue;
        };
        let handshake = handshaker.clone().run(tcp, peer, slot);
        let cancel = cancel.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = handshake => {}
            }
        });
    }
}

async fn purge_loop(state: Arc<State>, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let state = state.clone();
        match tokio::task::spawn_blocking(move || state.purge_expired(now_unix())).await {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => tracing::info!(removed, "expired conferences removed"),
            Ok(Err(error)) => tracing::error!(%error, "purging expired state failed"),
            Err(error) => tracing::error!(%error, "purge task failed"),
        }
    }
}

/// Serves the control API on `listener` until `shutdown` is cancelled, then stops
/// gracefully: Sync streams end, in-flight RPCs complete, and the database is closed before
/// this returns (so a new server may open it at once).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let files = config.tls.clone();
    let initial = tokio::task::spawn_blocking(move || files.load())
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let database = config.database.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&database))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let state = Arc::new(State::new(store));

    let (tls_sender, tls_receiver) = watch::channel(initial.config.clone());
    let tasks = TaskTracker::new();
    tasks.spawn(tls::reload_loop(
        config.tls.clone(),
        initial,
        tls_sender,
        config.tls_reload_interval,
        shutdown.clone(),
    ));
    tasks.spawn(purge_loop(state.clone(), shutdown.clone()));

    let (accepted_sender, accepted_receiver) = mpsc::channel(ACCEPTED_QUEUE);
    let limiter = Arc::new(ConnectionLimiter {
        limits: config.limits,
        counts: Mutex::new((0, HashMap::new())),
    });
    let handshaker = Handshaker {
        tls: tls_receiver,
        roles: Arc::new(config.roles.clone()),
        timeout: config.limits.handshake_timeout,
        accepted: accepted_sender,
    };
    let local = listener.local_addr().map_err(Error::Listen)?;
    tasks.spawn(accept_loop(
        listener,
        limiter,
        handshaker,
        shutdown.clone(),
        tasks.clone(),
    ));

    let credentials = Arc::new(config.credentials.clone());
    let front_end = FrontEndServer::with_interceptor(
        FrontEndService::new(state.clone(), credentials),
        require(Role::FrontEnd),
    );
    let agent = RelayAgentServer::with_interceptor(
        AgentService::new(
            state.clone(),
            shutdown.clone(),
            tasks.clone(),
            config.report_interval,
        ),
        require(Role::RelayAgent),
    );
    let operator = OperatorServer::with_interceptor(
        OperatorService::new(state.clone()),
        require(Role::Operator),
    );
    tracing::info!(address = %local, "control service listening (mutual TLS 1.3)");
    let incoming = ReceiverStream::new(accepted_receiver).map(Ok::<_, io::Error>);
    let served = tonic::transport::Server::builder()
        // Dead agents and front-ends are noticed even on idle connections.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(front_end)
        .add_service(agent)
        .add_service(operator)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await;
    // Whatever ended the server, stop the background work and wait for it, so the store
    // is closed when we return.
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    drop(state);
    tracing::info!("control service stopped");
    served.map_err(|e| Error::Serve(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_are_per_source_and_total() {
        let limiter = Arc::new(ConnectionLimiter {
            limits: ConnectionLimits {
                total: 3,
                per_source: 2,
                handshake_timeout: Duration::from_secs(1),
            },
            counts: Mutex::new((0, HashMap::new())),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        let a1 = limiter.try_acquire(a).unwrap();
        let _a2 = limiter.try_acquire(a).unwrap();
        assert!(limiter.try_acquire(a).is_none(), "per source");
        let _b1 = limiter.try_acquire(b).unwrap();
        assert!(limiter.try_acquire(c).is_none(), "total");
        drop(a1);
        assert!(limiter.try_acquire(c).is_some());
        assert!(limiter.counts.lock().unwrap().1.contains_key(&a));
    }
}
