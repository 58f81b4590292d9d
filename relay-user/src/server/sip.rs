//! The Access Edge's I/O: TLS listeners outside (remote users, guests, partner edges), the
//! mutual-TLS listener inside, the long-lived connection to the next hop (with failover) and
//! to partner edges (static route or DNS SRV), all carrying many users each. Every connection
//! is cut into messages by [`rampart_sip::Framer`] and handed to [`rampart_sip::proxy::Proxy`];
//! this file only moves bytes, keeps time limits and counts what it drops.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, info, warn};

use super::lock;
use crate::config::{SipPeer, SipSettings};
use rampart_sip::guard::{SourceGuard, Verdict};
use rampart_sip::proxy::{Action, ConnectionId, Destination, Origin, Proxy, Side, SipCounters};
use rampart_sip::token::Sealer;
use rampart_sip::{Frame, Framer, Message};

/// Messages queued towards one connection before further ones are dropped (counted).
const SEND_QUEUE: usize = 1024;
/// Queued messages written together, up to about this many bytes.
const WRITE_COALESCE_BYTES: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// After every next hop failed, requests get 503 at once for this long.
const NEXT_HOP_RETRY: Duration = Duration::from_secs(2);
const PARTNER_SRV_PREFIX: &str = "_sipfederationtls._tcp.";

pub(super) struct SipEdge {
    settings: SipSettings,
    proxy: Mutex<Proxy>,
    guard: Mutex<SourceGuard>,
    /// Each connection's send queue.
    connections: Mutex<HashMap<ConnectionId, mpsc::Sender<Vec<u8>>>>,
    next_id: AtomicU64,
    /// The connection to the next hop in use; the lock makes connecting single-flight.
    next_hop: tokio::sync::Mutex<(Option<ConnectionId>, Option<Instant>)>,
    /// Outbound connections to partner edges by domain.
    partners: tokio::sync::Mutex<HashMap<String, ConnectionId>>,
    resolver: Option<TokioResolver>,
}

/// Connection figures for the counters line, beside the proxy's.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SipStats {
    #[serde(flatten)]
    pub proxy: SipCounters,
    pub connections: usize,
    pub banned_sources: usize,
}

impl SipEdge {
    pub(super) fn new(settings: SipSettings) -> Arc<SipEdge> {
        let resolver = match settings.dns_servers.as_slice() {
            [] => TokioResolver::builder_tokio()
                .map(|builder| builder.build())
                .map_err(|error| warn!(%error, "SIP: no system DNS configuration; partners need static routes"))
                .ok(),
            servers => {
                let mut config = ResolverConfig::new();
                for server in servers {
                    config.add_name_server(NameServerConfig::new(*server, Protocol::Udp));
                }
                Some(TokioResolver::builder_with_config(config, TokioConnectionProvider::default()).build())
            }
        };
        Arc::new(SipEdge {
            proxy: Mutex::new(Proxy::new(
                settings.proxy.clone(),
                settings.policy.clone(),
                match &settings.token_secret {
                    Some(secret) => Sealer::from_secret(secret),
                    None => Sealer::random(),
                },
            )),
            guard: Mutex::new(SourceGuard::new(settings.guard.clone())),
            settings,
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            next_hop: tokio::sync::Mutex::new((None, None)),
            partners: tokio::sync::Mutex::new(HashMap::new()),
            resolver,
        })
    }

    pub(super) fn set_policy(&self, policy: rampart_sip::policy::AccessPolicy) {
        let mut proxy = lock(&self.proxy);
        if *proxy.policy() != policy {
            info!(
                remote_users = policy.remote_users,
                anonymous_users = policy.anonymous_users,
                federation = policy.federation.enabled,
                allowed = policy.federation.allowed_domains.len(),
                blocked = policy.federation.blocked_domains.len(),
                "SIP access policy applied"
            );
        }
        proxy.set_policy(policy);
    }

    /// The configured policy's partner rate, for control policies that leave it unset.
    pub(super) fn configured_policy(&self) -> &rampart_sip::policy::AccessPolicy {
        &self.settings.policy
    }

    pub(super) fn stats(&self) -> SipStats {
        let now = Instant::now();
        let mut guard = lock(&self.guard);
        guard.sweep(now);
        SipStats {
            proxy: lock(&self.proxy).counters.clone(),
            connections: lock(&self.connections).len(),
            banned_sources: guard.bans(),
        }
    }

    fn count(&self, reason: &'static str) {
        lock(&self.proxy).counters.drop(reason);
    }

    /// Accepts outside connections: caps and bans first, then TLS within the handshake
    /// timeout. `acceptor` is `None` for the plain-TCP lab listener.
    pub(super) async fn external_listener(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: Option<TlsAcceptor>,
    ) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&self, error).await;
                    continue;
                }
            };
            if let Err(refusal) = lock(&self.guard).open(peer.ip(), Instant::now()) {
                self.count(refusal.counter());
                continue;
            }
            let edge = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match acceptor {
                    Some(acceptor) => {
                        match timeout(edge.settings.tls_handshake_timeout, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(tls)) => {
                                let names = peer_names(tls.get_ref().1.peer_certificates());
                                if !names.is_empty() {
                                    debug!(%peer, ?names, "SIP: partner edge connected");
                                }
                                edge.clone()
                                    .serve(tls, Side::External, peer, names, false)
                                    .await;
                            }
                            Ok(Err(error)) => {
                                debug!(%peer, %error, "SIP: TLS handshake failed");
                                edge.count("tls_handshake_failed");
                            }
                            Err(_) => edge.count("tls_handshake_timeout"),
                        }
                    }
                    None => {
                        edge.clone()
                            .serve(tcp, Side::External, peer, Vec::new(), false)
                            .await
                    }
                }
                lock(&edge.guard).closed(peer.ip());
            });
        }
    }

    /// Accepts the next hop's and other internal servers' connections (mutual TLS).
    pub(super) async fn internal_listener(self: Arc<Self>, listener: TcpListener) {
        let acceptor = TlsAcceptor::from(self.settings.internal_tls.clone());
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&self, error).await;
                    continue;
                }
            };
            let edge = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match timeout(edge.settings.tls_handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        edge.clone()
                            .serve(tls, Side::Internal, peer, Vec::new(), false)
                            .await
                    }
                    Ok(Err(error)) => {
                        warn!(%peer, %error, "SIP: internal TLS handshake failed");
                        edge.count("internal_tls_handshake_failed");
                    }
                    Err(_) => edge.count("tls_handshake_timeout"),
                }
            });
        }
    }

    /// Registers a connection and runs it to its end.
    async fn serve<S>(
        self: Arc<Self>,
        stream: S,
        side: Side,
        peer: SocketAddr,
        names: Vec<String>,
        outbound: bool,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (id, reader) = self.adopt(stream, outbound);
        self.read_loop(id, reader, side, peer, names).await;
    }

    /// Starts the writer of a connection and registers it; the caller runs the reader.
    fn adopt<S>(
        self: &Arc<Self>,
        stream: S,
        outbound: bool,
    ) -> (ConnectionId, tokio::io::ReadHalf<S>)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reader, mut writer) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(SEND_QUEUE);
        lock(&self.connections).insert(id, tx);
        // RFC 5626 section 4.4.1: the side that opened the connection sends the pings.
        let keepalive = outbound.then_some(self.settings.keepalive_interval);
        tokio::spawn(async move {
            let mut ping = keepalive
                .map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
            loop {
                let mut bytes = tokio::select! {
                    bytes = rx.recv() => match bytes {
                        Some(bytes) => bytes,
                        None => break,
                    },
                    _ = async { ping.as_mut().expect("guarded").tick().await }, if ping.is_some() => b"\r\n\r\n".to_vec(),
                };
                // Whatever else is queued goes in the same write: one TLS record and one
                // system call for many messages under load, no delay when idle.
                while bytes.len() < WRITE_COALESCE_BYTES {
                    match rx.try_recv() {
                        Ok(more) => bytes.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                if writer.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            let _ = writer.shutdown().await;
        });
        (id, reader)
    }

    async fn read_loop<S: AsyncRead>(
        self: Arc<Self>,
        id: ConnectionId,
        mut reader: tokio::io::ReadHalf<S>,
        side: Side,
        peer: SocketAddr,
        names: Vec<String>,
    ) {
        let settings = &self.settings;
        let mut framer = Framer::new(settings.limits);
        let mut buffer = vec![0u8; 16 * 1024];
        // When the message now pending began: a slow sender gets message_timeout to finish.
        let mut started: Option<tokio::time::Instant> = None;
        let end = loop {
            let idle_deadline = tokio::time::Instant::now() + settings.idle_timeout;
            let deadline = started.map_or(idle_deadline, |t| {
                (t + settings.message_timeout).min(idle_deadline)
            });
            let read = tokio::time::timeout_at(deadline, reader.read(&mut buffer)).await;
            let count = match read {
                Err(_) if started.is_some() => break "slow_sender_cut",
                Err(_) => break "idle_timeout",
                Ok(Ok(0)) => break "closed",
                Ok(Err(_)) => break "read_error",
                Ok(Ok(count)) => count,
            };
            framer.push(&buffer[..count]);
            let mut progressed = false;
            let outcome = loop {
                match framer.next_frame() {
                    Ok(None) => break None,
                    Ok(Some(frame)) => {
                        progressed = true;
                        if let Some(reason) = self.on_frame(id, side, peer, &names, frame).await {
                            break Some(reason);
                        }
                    }
                    Err(error) => {
                        let response = lock(&self.proxy).reject_unparsable(&error);
                        if let Some(response) = response {
                            self.send(id, response.to_bytes());
                        }
                        break Some("unframable_stream");
                    }
                }
            };
            if let Some(reason) = outcome {
                break reason;
            }
            let now = tokio::time::Instant::now();
            started = match (framer.pending(), progressed) {
                (0, _) => None,
                (_, true) => Some(now),
                (_, false) => started.or(Some(now)),
            };
        };
        lock(&self.connections).remove(&id);
        match end {
            "closed" | "read_error" => debug!(%peer, ?side, "SIP connection closed"),
            reason => {
                debug!(%peer, ?side, reason, "SIP connection cut");
                self.count(reason);
            }
        }
    }

    /// Handles one frame; `Some(reason)` closes the connection.
    async fn on_frame(
        self: &Arc<Self>,
        id: ConnectionId,
        side: Side,
        peer: SocketAddr,
        names: &[String],
        frame: Frame,
    ) -> Option<&'static str> {
        if side == Side::External && matches!(frame, Frame::Message(_) | Frame::Invalid(_)) {
            match lock(&self.guard).message(peer.ip(), Instant::now()) {
                Verdict::Pass => {}
                Verdict::Throttled => {
                    self.count("rate_limited");
                    return None;
                }
                Verdict::Banned => {
                    warn!(source = %peer.ip(), "SIP: source over its request rate, banned");
                    return Some("banned_source");
                }
            }
        }
        match frame {
            Frame::Ping => {
                self.send(id, b"\r\n".to_vec());
            }
            Frame::Pong => {}
            Frame::Invalid(error) => {
                let response = lock(&self.proxy).reject_unparsable(&error);
                match response {
                    Some(response) => {
                        self.send(id, response.to_bytes());
                    }
                    // Not even a response can be built: nothing more from this peer is trusted.
                    None => return Some("malformed_unanswerable"),
                }
            }
            Frame::Message(message) => {
                let origin = Origin {
                    connection: id,
                    side,
                    partner_names: names,
                };
                let action = lock(&self.proxy).handle(&origin, message, Instant::now());
                self.act(id, action).await;
            }
        }
        None
    }

    async fn act(self: &Arc<Self>, from: ConnectionId, action: Action) {
        match action {
            Action::Respond(response) => {
                self.send(from, response.to_bytes());
            }
            Action::Drop(_) => {}
            Action::Forward { to, message } => self.deliver(to, message).await,
        }
    }

    async fn deliver(self: &Arc<Self>, to: Destination, message: Message) {
        let sent = match to {
            Destination::Connection { id, partner } => {
                if self.send(id, message.to_bytes()) {
                    return;
                }
                match partner {
                    Some(domain) => self.to_partner(&domain, &message).await,
                    None => Err((430, "Flow Failed")),
                }
            }
            Destination::NextHop => match self.next_hop_connection().await {
                Some(id) if self.send(id, message.to_bytes()) => Ok(()),
                _ => Err((503, "Service Unavailable: next hop unreachable")),
            },
            Destination::Partner(domain) => self.to_partner(&domain, &message).await,
        };
        let Err((status, reason)) = sent else {
            return;
        };
        let answer = lock(&self.proxy).undeliverable(&message, status, reason);
        if let Some(Action::Forward {
            to: Destination::Connection { id, .. },
            message,
        }) = answer
            && !self.send(id, message.to_bytes())
        {
            self.count("response_connection_gone");
        }
    }

    /// Sends to a partner edge; the status to answer with when it cannot be reached.
    async fn to_partner(
        self: &Arc<Self>,
        domain: &str,
        message: &Message,
    ) -> Result<(), (u16, &'static str)> {
        match self.partner_connection(domain).await {
            Some(id) if self.send(id, message.to_bytes()) => Ok(()),
            _ => Err((503, "Service Unavailable: partner edge unreachable")),
        }
    }

    /// Queues bytes on a connection; false when the connection is gone.
    fn send(&self, id: ConnectionId, bytes: Vec<u8>) -> bool {
        let connections = lock(&self.connections);
        let Some(tx) = connections.get(&id) else {
            return false;
        };
        match tx.try_send(bytes) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                drop(connections);
                self.count("send_queue_full");
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn is_open(&self, id: ConnectionId) -> bool {
        lock(&self.connections).contains_key(&id)
    }

    /// The next hop connection, connecting (in configured order) when there is none.
    async fn next_hop_connection(self: &Arc<Self>) -> Option<ConnectionId> {
        let mut current = self.next_hop.lock().await;
        if let Some(id) = current.0
            && self.is_open(id)
        {
            return Some(id);
        }
        if current.1.is_some_and(|until| Instant::now() < until) {
            return None;
        }
        let connector = TlsConnector::from(self.settings.next_hop_tls.clone());
        for peer in &self.settings.next_hops {
            match self.connect(peer, &connector).await {
                Ok((tls, address)) => {
                    info!(next_hop = peer.host, %address, "SIP: connected to the next hop");
                    let id = self.spawn_outbound(tls, Side::Internal, address, Vec::new());
                    *current = (Some(id), None);
                    return Some(id);
                }
                Err(error) => {
                    warn!(next_hop = peer.host, port = peer.port, %error, "SIP: next hop unreachable")
                }
            }
        }
        self.count("next_hop_unreachable");
        *current = (None, Some(Instant::now() + NEXT_HOP_RETRY));
        None
    }

    fn spawn_outbound<S>(
        self: &Arc<Self>,
        stream: S,
        side: Side,
        peer: SocketAddr,
        names: Vec<String>,
    ) -> ConnectionId
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (id, reader) = self.adopt(stream, true);
        tokio::spawn(self.clone().read_loop(id, reader, side, peer, names));
        id
    }

    /// TCP then TLS to a peer by name (its certificate must name `peer.host`).
    async fn connect(
        &self,
        peer: &SipPeer,
        connector: &TlsConnector,
    ) -> io::Result<(tokio_rustls::client::TlsStream<TcpStream>, SocketAddr)> {
        let name = ServerName::try_from(peer.host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut last_error = io::Error::new(io::ErrorKind::NotFound, "no address");
        for address in self.addresses(peer).await {
            let attempt = async {
                let tcp = timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                tcp.set_nodelay(true)?;
                timeout(
                    self.settings.tls_handshake_timeout,
                    connector.connect(name.clone(), tcp),
                )
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
            };
            match attempt.await {
                Ok(tls) => return Ok((tls, address)),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    async fn addresses(&self, peer: &SipPeer) -> Vec<SocketAddr> {
        if let Some(address) = peer.address {
            return vec![address];
        }
        match &self.resolver {
            Some(resolver) => match resolver.lookup_ip(format!("{}.", peer.host)).await {
                Ok(ips) => ips
                    .iter()
                    .map(|ip| SocketAddr::new(ip, peer.port))
                    .collect(),
                Err(error) => {
                    debug!(host = peer.host, %error, "SIP: address lookup failed");
                    Vec::new()
                }
            },
            None => tokio::net::lookup_host((peer.host.as_str(), peer.port))
                .await
                .map(Iterator::collect)
                .unwrap_or_default(),
        }
    }

    /// Where a partner domain's edge is: a static route, else DNS SRV records in priority
    /// order (RFC 2782; weights are not drawn: the first of a priority is tried first).
    async fn partner_peers(&self, domain: &str) -> Vec<SipPeer> {
        if let Some(route) = self.settings.routes.get(domain) {
            return vec![route.clone()];
        }
        let Some(resolver) = &self.resolver else {
            return Vec::new();
        };
        match resolver
            .srv_lookup(format!("{PARTNER_SRV_PREFIX}{domain}."))
            .await
        {
            Ok(records) => {
                let mut records: Vec<_> = records.iter().cloned().collect();
                records.sort_by_key(|srv| (srv.priority(), std::cmp::Reverse(srv.weight())));
                records
                    .into_iter()
                    .map(|srv| SipPeer {
                        host: srv
                            .target()
                            .to_ascii()
                            .trim_end_matches('.')
                            .to_ascii_lowercase(),
                        port: srv.port(),
                        address: None,
                    })
                    .collect()
            }
            Err(error) => {
                debug!(domain, %error, "SIP: no federation SRV record");
                Vec::new()
            }
        }
    }

    async fn partner_connection(self: &Arc<Self>, domain: &str) -> Option<ConnectionId> {
        let mut partners = self.partners.lock().await;
        if let Some(id) = partners.get(domain)
            && self.is_open(*id)
        {
            return Some(*id);
        }
        let tls = self.settings.partner_tls.as_ref()?;
        for peer in self.partner_peers(domain).await {
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .ok()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PartnerVerifier::new(
                tls.roots.clone(),
                domain,
            )?))
            .with_client_auth_cert(tls.certificate.clone(), tls.private_key.clone_key())
            .ok()?;
            match self
                .connect(&peer, &TlsConnector::from(Arc::new(config)))
                .await
            {
                Ok((stream, address)) => {
                    let names = peer_names(stream.get_ref().1.peer_certificates());
                    info!(domain, edge = peer.host, %address, "SIP: connected to a partner edge");
                    let id = self.spawn_outbound(stream, Side::External, address, names);
                    partners.insert(domain.to_owned(), id);
                    return Some(id);
                }
                Err(error) => {
                    warn!(domain, edge = peer.host, %error, "SIP: partner edge unreachable")
                }
            }
        }
        self.count("partner_unreachable");
        None
    }
}

/// Out of descriptors (or another accept error): say so, count it, and give the process a
/// moment instead of spinning on the listener.
async fn accept_failed(edge: &SipEdge, error: io::Error) {
    warn!(%error, "SIP: cannot accept a connection");
    edge.count("accept_failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// The DNS names of a peer's verified certificate (none when it presented none).
fn peer_names(certificates: Option<&[CertificateDer<'_>]>) -> Vec<String> {
    let Some(certificate) = certificates.and_then(<[_]>::first) else {
        return Vec::new();
    };
    control_link::san::san_names(certificate)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|name| match name {
            control_link::san::SanName::Dns(dns) => Some(dns),
            _ => None,
        })
        .collect()
}

/// A partner's certificate must chain to the partner CA and name either the edge host we
/// connected to or the partner's SIP domain itself.
#[derive(Debug)]
struct PartnerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    domain: ServerName<'static>,
}

impl PartnerVerifier {
    fn new(roots: Arc<rustls::RootCertStore>, domain: &str) -> Option<PartnerVerifier> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Some(PartnerVerifier {
            inner: rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .ok()?,
            domain: ServerName::try_from(domain.to_owned()).ok()?,
        })
    }
}

impl ServerCertVerifier for PartnerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .or_else(|_| {
                self.inner.verify_server_cert(
                    end_entity,
                    intermediates,
                    &self.domain,
                    ocsp_response,
                    now,
                )
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The Access Edge's listeners, bound at start so a port in use fails the start.
pub(super) struct SipListeners {
    pub external: Vec<TcpListener>,
    pub external_tcp: Vec<TcpListener>,
    pub internal: TcpListener,
}

pub(super) async fn bind(settings: &SipSettings) -> Result<SipListeners, (SocketAddr, io::Error)> {
    let bind = |address: SocketAddr| async move {
        TcpListener::bind(address).await.map_err(|e| (address, e))
    };
    let mut external = Vec::new();
    for address in &settings.external {
        external.push(bind(*address).await?);
    }
    let mut external_tcp = Vec::new();
    for address in &settings.external_tcp {
        external_tcp.push(bind(*address).await?);
    }
    Ok(SipListeners {
        external,
        external_tcp,
        internal: bind(settings.internal).await?,
    })
}

/// Starts the listeners' tasks.
pub(super) fn start(
    edge: &Arc<SipEdge>,
    listeners: SipListeners,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    let acceptor = TlsAcceptor::from(edge.settings.external_tls.clone());
    for listener in listeners.external {
        if let Ok(address) = listener.local_addr() {
            info!(%address, "Access Edge listening for SIP over TLS (remote users, partners, guests)");
        }
        tasks.spawn(
            edge.clone()
                .external_listener(listener, Some(acceptor.clone())),
        );
    }
    for listener in listeners.external_tcp {
        if let Ok(address) = listener.local_addr() {
            warn!(%address, "Access Edge listening for SIP over plain TCP (labs only)");
        }
        tasks.spawn(edge.clone().external_listener(listener, None));
    }
    if let Ok(address) = listeners.internal.local_addr() {
        info!(%address, next_hops = edge.settings.next_hops.len(), "Access Edge listening for internal SIP servers (mutual TLS)");
    }
    tasks.spawn(edge.clone().internal_listener(listeners.internal));
}
