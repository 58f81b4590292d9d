//! A small blocking TURN client (RFC 8656) over UDP, TCP or TLS, built on Rampart's sans-IO
//! codec. It does exactly what the end-to-end tests need: the 401 dance with long-term
//! credentials (MD5 key, MESSAGE-INTEGRITY, FINGERPRINT), CreatePermission, ChannelBind,
//! Refresh, Send indications and ChannelData out, Data indications and ChannelData in.
//!
//! Every receive is bounded by [`crate::RECV_TIMEOUT`]. There are no retransmissions: on
//! loopback nothing is lost, and a retransmission would hide a server that drops requests.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use rampart_turn::channel_data::{ChannelData, encode_channel_data, next_stream_frame};
use rampart_turn::stun::{
    AddressFamily, Attribute, Class, Message, MessageBuilder, Method, PasswordAlgorithm,
    TransactionId, long_term_key,
};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rustls::pki_types::{CertificateDer, ServerName};

use crate::RECV_TIMEOUT;
use crate::certs::SERVER_NAME;

/// IANA protocol number of UDP, the only REQUESTED-TRANSPORT of RFC 8656 §7.1.
const UDP_PROTOCOL: u8 = 17;
const TCP_PROTOCOL: u8 = 6;

/// Client transport to the TURN server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Udp,
    Tcp,
    Tls,
}

impl Proto {
    pub const ALL: [Proto; 3] = [Proto::Udp, Proto::Tcp, Proto::Tls];

    /// The word the configuration file uses.
    pub fn config_name(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
            Proto::Tls => "tls",
        }
    }

    fn is_stream(self) -> bool {
        self != Proto::Udp
    }
}

/// The loopback address of a family.
pub fn loopback(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }
}

/// Relayed data that reached the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// A Data indication (RFC 8656 §11.4): the peer had no channel.
    Data { peer: SocketAddr, data: Vec<u8> },
    /// A ChannelData message (RFC 8656 §12.4).
    Channel { channel: u16, data: Vec<u8> },
}

/// A STUN response, validated on receipt (it parses, and FINGERPRINT checks if present).
#[derive(Clone, Debug)]
pub struct Response {
    bytes: Vec<u8>,
}

impl Response {
    pub fn message(&self) -> Message<'_> {
        Message::parse(&self.bytes).expect("validated when received")
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn is_success(&self) -> bool {
        self.message().class == Class::SuccessResponse
    }

    /// The ERROR-CODE of an error response.
    pub fn error_code(&self) -> Option<u16> {
        let message = self.message();
        if message.class != Class::ErrorResponse {
            return None;
        }
        message.error_code().map(|(code, _)| code)
    }

    /// A one-line description for failure messages.
    pub fn describe(&self) -> String {
        let m = self.message();
        match m.error_code() {
            Some((code, reason)) => format!("{:?} {:?} {code} {reason}", m.method, m.class),
            None => format!("{:?} {:?}", m.method, m.class),
        }
    }
}

/// What a successful Allocate returned.
#[derive(Clone, Debug)]
pub struct Allocated {
    /// XOR-RELAYED-ADDRESS values (two for a dual-stack allocation).
    pub relayed: Vec<SocketAddr>,
    /// XOR-MAPPED-ADDRESS: the client as the server saw it.
    pub mapped: Option<SocketAddr>,
    pub lifetime: Option<u32>,
}

impl Allocated {
    pub fn relayed(&self) -> SocketAddr {
        self.relayed[0]
    }
}

#[derive(Clone)]
struct Credentials {
    username: String,
    realm: String,
    nonce: String,
    key: Vec<u8>,
}

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

pub struct TurnClient {
    proto: Proto,
    conn: Conn,
    local: SocketAddr,
    server: SocketAddr,
    /// Stream bytes not yet cut into frames.
    inbox: Vec<u8>,
    /// Frames that arrived while a response was awaited, for [`TurnClient::recv`].
    pending: VecDeque<Vec<u8>>,
    credentials: Option<Credentials>,
    rng: StdRng,
}

impl TurnClient {
    /// Connects to `server`. TLS needs the CA that signed the server's `localhost`
    /// certificate; the handshake completes before this returns.
    pub fn connect(
        proto: Proto,
        server: SocketAddr,
        ca: Option<&CertificateDer<'static>>,
    ) -> anyhow::Result<TurnClient> {
        let local_ip = loopback(server.is_ipv6());
        let conn = match proto {
            Proto::Udp => {
                let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))?;
                // Connected, so only the server's datagrams reach this socket.
                socket.connect(server)?;
                Conn::Udp(socket)
            }
            Proto::Tcp => Conn::Tcp(tcp_connect(server)?),
            Proto::Tls => {
                let ca = ca.context("a TLS client needs the test CA")?;
                Conn::Tls(Box::new(tls_connect(server, ca)?))
            }
        };
        Self::with_conn(proto, conn, server)
    }

    /// A UDP client whose socket is bound to `local_ip` (an address of a test host in a
    /// network namespace, say) rather than to loopback.
    pub fn connect_udp(local_ip: IpAddr, server: SocketAddr) -> anyhow::Result<TurnClient> {
        let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))
            .with_context(|| format!("binding a UDP client socket on {local_ip}"))?;
        socket.connect(server)?;
        Self::with_conn(Proto::Udp, Conn::Udp(socket), server)
    }

    fn with_conn(proto: Proto, conn: Conn, server: SocketAddr) -> anyhow::Result<TurnClient> {
        let local = match &conn {
            Conn::Udp(s) => s.local_addr()?,
            Conn::Tcp(s) => s.local_addr()?,
            Conn::Tls(s) => s.sock.local_addr()?,
        };
        Ok(TurnClient {
            proto,
            conn,
            local,
            server,
            inbox: Vec::new(),
            pending: VecDeque::new(),
            credentials: None,
            // Random, not seeded by the port: a later client on the same port (a load test
            // opens thousands) must not repeat an earlier one's transaction ids, which a
            // server rightly takes for retransmissions of the earlier requests.
            rng: StdRng::from_entropy(),
        })
    }

    /// The UDP socket, for driving media on an allocation made through this client (a load
    /// generator); None for TCP and TLS.
    pub fn into_udp_socket(self) -> Option<UdpSocket> {
        match self.conn {
            Conn::Udp(socket) => Some(socket),
            Conn::Tcp(_) | Conn::Tls(_) => None,
        }
    }

    /// The UDP socket, borrowed (None for TCP and TLS).
    pub fn udp_socket(&self) -> Option<&UdpSocket> {
        match &self.conn {
            Conn::Udp(socket) => Some(socket),
            Conn::Tcp(_) | Conn::Tls(_) => None,
        }
    }

    pub fn proto(&self) -> Proto {
        self.proto
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn server_addr(&self) -> SocketAddr {
        self.server
    }

    pub fn new_transaction_id(&mut self) -> TransactionId {
        let mut id = [0u8; 12];
        self.rng.fill_bytes(&mut id);
        TransactionId(id)
    }

    /// Sends bytes as they are: one datagram, or appended to the stream.
    pub fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match &mut self.conn {
            Conn::Udp(s) => {
                s.send(bytes).context("sending a datagram to the server")?;
            }
            Conn::Tcp(s) => s.write_all(bytes).context("writing to the server")?,
            Conn::Tls(s) => {
                s.write_all(bytes).context("writing to the server (TLS)")?;
                s.flush()?;
            }
        }
        Ok(())
    }

    /// Sends a request and waits for the response with its transaction id. Frames that come
    /// in meanwhile (Data indications, ChannelData) are kept for [`TurnClient::recv`].
    pub fn transact(&mut self, request: &[u8]) -> anyhow::Result<Response> {
        self.send_raw(request)?;
        self.await_response(request)
    }

    /// The response to `request`, already sent.
    fn await_response(&mut self, request: &[u8]) -> anyhow::Result<Response> {
        let (_, method, id) = Message::peek_header(request).context("not a STUN request")?;
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let Some(frame) = self.recv_frame(deadline)? else {
                bail!(
                    "no response to {method:?} from {} ({:?}) within {RECV_TIMEOUT:?}",
                    self.server,
                    self.proto
                );
            };
            match Message::peek_header(&frame) {
                Some((Class::SuccessResponse | Class::ErrorResponse, _, got)) if got == id => {
                    Message::parse(&frame).map_err(|e| {
                        anyhow!("response to {method:?} does not parse: {e} ({frame:02x?})")
                    })?;
                    return Ok(Response { bytes: frame });
                }
                _ => self.pending.push_back(frame),
            }
        }
    }

    /// Binding request (RFC 8489 §7.3.1); returns XOR-MAPPED-ADDRESS.
    pub fn binding(&mut self) -> anyhow::Result<SocketAddr> {
        let id = self.new_transaction_id();
        let mut b = MessageBuilder::new(Class::Request, Method::BINDING, id);
        b.add_fingerprint();
        let response = self.transact(&b.finish())?;
        ensure!(response.is_success(), "Binding: {}", response.describe());
        response
            .message()
            .xor_mapped_address()
            .context("Binding success without XOR-MAPPED-ADDRESS")
    }

    /// Allocate with the 401 dance (RFC 8656 §7.1, RFC 8489 §9.2): an unauthenticated
    /// request to learn REALM and NONCE, then the same request with USERNAME, REALM, NONCE,
    /// MESSAGE-INTEGRITY (MD5 long-term key) and FINGERPRINT. Returns the final response,
    /// which may be an error (e.g. 401 for a wrong password).
    pub fn try_allocate(
        &mut self,
        username: &str,
        password: &str,
        extra: &[Attribute<'_>],
    ) -> anyhow::Result<Response> {
        self.try_allocate_transport(username, password, UDP_PROTOCOL, extra)
    }

    /// A TCP allocation (RFC 6062 §4.1, REQUESTED-TRANSPORT 6) that must succeed.
    pub fn allocate_tcp(&mut self, username: &str, password: &str) -> anyhow::Result<Allocated> {
        let response = self.try_allocate_transport(username, password, TCP_PROTOCOL, &[])?;
        ensure!(
            response.is_success(),
            "Allocate (TCP): {}",
            response.describe()
        );
        let relayed: Vec<SocketAddr> = response.message().xor_relayed_addresses().collect();
        ensure!(
            !relayed.is_empty(),
            "Allocate success without XOR-RELAYED-ADDRESS"
        );
        Ok(Allocated {
            relayed,
            mapped: response.message().xor_mapped_address(),
            lifetime: response.message().lifetime(),
        })
    }

    /// Connect (RFC 6062 §4.3) to `peer` through this client's TCP allocation: the
    /// CONNECTION-ID of the connection, or the error response.
    pub fn connect_peer(&mut self, peer: SocketAddr) -> anyhow::Result<Result<u32, Response>> {
        let response = self.request(Method::CONNECT, &[Attribute::XorPeerAddress(peer)])?;
        if !response.is_success() {
            return Ok(Err(response));
        }
        let id = response
            .message()
            .connection_id()
            .context("Connect success without CONNECTION-ID")?;
        Ok(Ok(id))
    }

    /// A new connection to the server, with this client's credentials, that binds to peer
    /// connection `id` (ConnectionBind, RFC 6062 §4.4): the connection's stream (TCP only)
    /// and the bytes of the peer that came with the response.
    pub fn bind_data_connection(&self, id: u32) -> anyhow::Result<(TcpStream, Vec<u8>)> {
        self.bind_data_connection_pipelined(id, &[])
    }

    /// [`TurnClient::bind_data_connection`], sending `early` in the same write as the
    /// ConnectionBind, before its answer (which RFC 6062 §4.4 tells clients not to do).
    pub fn bind_data_connection_pipelined(
        &self,
        id: u32,
        early: &[u8],
    ) -> anyhow::Result<(TcpStream, Vec<u8>)> {
        ensure!(
            self.proto == Proto::Tcp,
            "data connections over TCP only here"
        );
        let mut data = Self::with_conn(
            Proto::Tcp,
            Conn::Tcp(tcp_connect(self.server)?),
            self.server,
        )?;
        data.credentials = self.credentials.clone();
        let request =
            data.signed_request(Method::CONNECTION_BIND, &[Attribute::ConnectionId(id)])?;
        data.send_raw(&[request.as_slice(), early].concat())?;
        let response = data.await_response(&request)?;
        ensure!(
            response.is_success(),
            "ConnectionBind: {}",
            response.describe()
        );
        let key = &data.credentials.as_ref().expect("copied above").key;
        ensure!(
            response.message().verify_integrity(key),
            "ConnectionBind success without a MESSAGE-INTEGRITY that verifies"
        );
        let Conn::Tcp(stream) = data.conn else {
            unreachable!("made above");
        };
        stream.set_read_timeout(None)?;
        Ok((stream, data.inbox))
    }

    fn try_allocate_transport(
        &mut self,
        username: &str,
        password: &str,
        transport: u8,
        extra: &[Attribute<'_>],
    ) -> anyhow::Result<Response> {
        let mut attributes = vec![Attribute::RequestedTransport(transport)];
        attributes.extend_from_slice(extra);
        let id = self.new_transaction_id();
        let mut b = MessageBuilder::new(Class::Request, Method::ALLOCATE, id);
        for a in &attributes {
            b.add(a);
        }
        b.add_fingerprint();
        let challenge = self.transact(&b.finish())?;
        ensure!(
            challenge.error_code() == Some(401),
            "unauthenticated Allocate: expected 401, got {}",
            challenge.describe()
        );
        let message = challenge.message();
        let realm = message.realm().context("401 without REALM")?.to_owned();
        let nonce = message.nonce().context("401 without NONCE")?.to_owned();
        self.credentials = Some(Credentials {
            key: long_term_key(username, &realm, password, PasswordAlgorithm::Md5),
            username: username.to_owned(),
            realm,
            nonce,
        });
        self.request(Method::ALLOCATE, &attributes)
    }

    /// [`TurnClient::try_allocate`] that must succeed.
    pub fn allocate_with(
        &mut self,
        username: &str,
        password: &str,
        extra: &[Attribute<'_>],
    ) -> anyhow::Result<Allocated> {
        let response = self.try_allocate(username, password, extra)?;
        ensure!(response.is_success(), "Allocate: {}", response.describe());
        let message = response.message();
        let relayed: Vec<SocketAddr> = message.xor_relayed_addresses().collect();
        ensure!(
            !relayed.is_empty(),
            "Allocate success without XOR-RELAYED-ADDRESS"
        );
        Ok(Allocated {
            relayed,
            mapped: message.xor_mapped_address(),
            lifetime: message.lifetime(),
        })
    }

    /// Allocate a relay address of `family` (REQUESTED-ADDRESS-FAMILY, RFC 8656 §7.1; the
    /// server's default is IPv4).
    pub fn allocate(
        &mut self,
        username: &str,
        password: &str,
        family: AddressFamily,
    ) -> anyhow::Result<Allocated> {
        match family {
            AddressFamily::V4 => self.allocate_with(username, password, &[]),
            AddressFamily::V6 => self.allocate_with(
                username,
                password,
                &[Attribute::RequestedAddressFamily(AddressFamily::V6)],
            ),
        }
    }

    /// An authenticated request after [`TurnClient::try_allocate`] learned the realm and
    /// nonce. A 438 (stale nonce) is answered once with the new nonce (RFC 8489 §9.2.5).
    /// A response that carries MESSAGE-INTEGRITY must verify with our key.
    pub fn request(
        &mut self,
        method: Method,
        attributes: &[Attribute<'_>],
    ) -> anyhow::Result<Response> {
        let mut response = self.request_once(method, attributes)?;
        if response.error_code() == Some(438) {
            let nonce = response
                .message()
                .nonce()
                .context("438 without NONCE")?
                .to_owned();
            if let Some(c) = self.credentials.as_mut() {
                c.nonce = nonce;
            }
            response = self.request_once(method, attributes)?;
        }
        {
            let message = response.message();
            if message.has_message_integrity() {
                let key = &self.credentials.as_ref().expect("set by request_once").key;
                ensure!(
                    message.verify_integrity(key),
                    "{method:?} response with a MESSAGE-INTEGRITY that does not verify"
                );
            } else if message.class == Class::SuccessResponse {
                // RFC 8489 §9.2.4: a success response to an authenticated request is
                // protected with the same key, or the client cannot trust it.
                bail!("{method:?} success response without MESSAGE-INTEGRITY");
            }
        }
        Ok(response)
    }

    fn request_once(
        &mut self,
        method: Method,
        attributes: &[Attribute<'_>],
    ) -> anyhow::Result<Response> {
        let request = self.signed_request(method, attributes)?;
        self.transact(&request)
    }

    /// A request with this client's credentials (USERNAME, REALM, NONCE, MESSAGE-INTEGRITY)
    /// and FINGERPRINT.
    fn signed_request(
        &mut self,
        method: Method,
        attributes: &[Attribute<'_>],
    ) -> anyhow::Result<Vec<u8>> {
        let id = self.new_transaction_id();
        let c = self
            .credentials
            .as_ref()
            .context("authenticated request before Allocate")?;
        let mut b = MessageBuilder::new(Class::Request, method, id);
        b.add(&Attribute::Username(&c.username))
            .add(&Attribute::Realm(&c.realm))
            .add(&Attribute::Nonce(&c.nonce));
        for a in attributes {
            b.add(a);
        }
        b.add_message_integrity(&c.key).add_fingerprint();
        ensure!(!b.overflowed(), "{method:?} request does not fit");
        Ok(b.finish())
    }

    /// CreatePermission for the IPs of `peers` (RFC 8656 §9).
    pub fn try_create_permission(&mut self, peers: &[SocketAddr]) -> anyhow::Result<Response> {
        let attributes: Vec<Attribute<'_>> = peers
            .iter()
            .map(|p| Attribute::XorPeerAddress(*p))
            .collect();
        self.request(Method::CREATE_PERMISSION, &attributes)
    }

    pub fn create_permission(&mut self, peers: &[SocketAddr]) -> anyhow::Result<()> {
        let response = self.try_create_permission(peers)?;
        ensure!(
            response.is_success(),
            "CreatePermission {peers:?}: {}",
            response.describe()
        );
        Ok(())
    }

    /// ChannelBind (RFC 8656 §12.1).
    pub fn try_channel_bind(&mut self, channel: u16, peer: SocketAddr) -> anyhow::Result<Response> {
        self.request(
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(channel),
                Attribute::XorPeerAddress(peer),
            ],
        )
    }

    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> anyhow::Result<()> {
        let response = self.try_channel_bind(channel, peer)?;
        ensure!(
            response.is_success(),
            "ChannelBind {channel:#06x} -> {peer}: {}",
            response.describe()
        );
        Ok(())
    }

    /// Refresh (RFC 8656 §8); returns the granted LIFETIME. 0 deletes the allocation.
    pub fn refresh(&mut self, lifetime: u32) -> anyhow::Result<u32> {
        let response = self.request(Method::REFRESH, &[Attribute::Lifetime(lifetime)])?;
        ensure!(
            response.is_success(),
            "Refresh({lifetime}): {}",
            response.describe()
        );
        response
            .message()
            .lifetime()
            .context("Refresh success without LIFETIME")
    }

    /// Send indication (RFC 8656 §11.1): data for `peer` without a channel.
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) -> anyhow::Result<()> {
        let id = self.new_transaction_id();
        let mut b = MessageBuilder::new(Class::Indication, Method::SEND, id);
        b.add(&Attribute::XorPeerAddress(peer))
            .add(&Attribute::Data(data))
            .add_fingerprint();
        ensure!(!b.overflowed(), "Send indication does not fit");
        let indication = b.finish();
        self.send_raw(&indication)
    }

    /// ChannelData (RFC 8656 §12.4); padded to 4 bytes over TCP/TLS (§12.5).
    pub fn send_channel_data(&mut self, channel: u16, data: &[u8]) -> anyhow::Result<()> {
        let frame = encode_channel_data(channel, data, self.proto.is_stream());
        self.send_raw(&frame)
    }

    /// The next relayed message, or None when nothing arrives within `wait`.
    pub fn recv(&mut self, wait: Duration) -> anyhow::Result<Option<Received>> {
        let deadline = Instant::now() + wait;
        let frame = match self.pending.pop_front() {
            Some(frame) => frame,
            None => match self.recv_frame(deadline)? {
                Some(frame) => frame,
                None => return Ok(None),
            },
        };
        if ChannelData::looks_like_channel_data(&frame) {
            let cd = ChannelData::parse(&frame)
                .map_err(|e| anyhow!("bad ChannelData from the server: {e}"))?;
            if self.proto == Proto::Udp {
                // RFC 8656 §12.5: padding over UDP is allowed but pointless; Rampart does not
                // pad, so a longer datagram would mean a length bug.
                ensure!(
                    frame.len() == 4 + cd.data.len(),
                    "ChannelData datagram of {} bytes for {} bytes of data",
                    frame.len(),
                    cd.data.len()
                );
            }
            return Ok(Some(Received::Channel {
                channel: cd.channel,
                data: cd.data.to_vec(),
            }));
        }
        let message = Message::parse(&frame)
            .map_err(|e| anyhow!("unparsable frame from the server: {e} ({frame:02x?})"))?;
        ensure!(
            message.class == Class::Indication && message.method == Method::DATA,
            "expected relayed data, got {:?} {:?}",
            message.method,
            message.class
        );
        let peer = message
            .xor_peer_addresses()
            .next()
            .context("Data indication without XOR-PEER-ADDRESS")?;
        let data = message.data().context("Data indication without DATA")?;
        Ok(Some(Received::Data {
            peer,
            data: data.to_vec(),
        }))
    }

    /// [`TurnClient::recv`] that must deliver within [`RECV_TIMEOUT`].
    pub fn expect_recv(&mut self) -> anyhow::Result<Received> {
        self.recv(RECV_TIMEOUT)?.with_context(|| {
            format!(
                "no relayed data reached the client ({:?} {}) within {RECV_TIMEOUT:?}",
                self.proto, self.local
            )
        })
    }

    /// One datagram, or one complete STUN/ChannelData frame from the stream; None at the
    /// deadline.
    fn recv_frame(&mut self, deadline: Instant) -> anyhow::Result<Option<Vec<u8>>> {
        if let Conn::Udp(socket) = &self.conn {
            let Some(wait) = remaining(deadline) else {
                return Ok(None);
            };
            socket.set_read_timeout(Some(wait))?;
            let mut buf = vec![0u8; 65_536];
            return match socket.recv(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    Ok(Some(buf))
                }
                Err(e) if is_timeout(&e) => Ok(None),
                Err(e) => Err(e).context("receiving from the server"),
            };
        }
        loop {
            match next_stream_frame(&self.inbox) {
                Ok(Some(len)) => return Ok(Some(self.inbox.drain(..len).collect())),
                Ok(None) => {}
                Err(e) => bail!("the server's stream is not STUN/ChannelData framed: {e}"),
            }
            let Some(wait) = remaining(deadline) else {
                return Ok(None);
            };
            let mut buf = [0u8; 16_384];
            let read = match &mut self.conn {
                Conn::Tcp(s) => {
                    s.set_read_timeout(Some(wait))?;
                    s.read(&mut buf)
                }
                Conn::Tls(s) => {
                    s.sock.set_read_timeout(Some(wait))?;
                    s.read(&mut buf)
                }
                Conn::Udp(_) => unreachable!("handled above"),
            };
            match read {
                Ok(0) => bail!("the server closed the {:?} connection", self.proto),
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(e).context("reading from the server"),
            }
        }
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    // A zero read timeout is refused by the OS API; anything left under a millisecond is up.
    let left = deadline.saturating_duration_since(Instant::now());
    (left >= Duration::from_millis(1)).then_some(left)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn tcp_connect(server: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&server, RECV_TIMEOUT)
        .with_context(|| format!("connecting to {server}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A rustls client (ring provider) trusting only the test CA, for the name `localhost`.
pub fn tls_client_config(ca: &CertificateDer<'static>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn tls_connect(
    server: SocketAddr,
    ca: &CertificateDer<'static>,
) -> anyhow::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let config = Arc::new(tls_client_config(ca)?);
    let name = ServerName::try_from(SERVER_NAME)?.to_owned();
    let mut conn = rustls::ClientConnection::new(config, name)?;
    let mut sock = tcp_connect(server)?;
    sock.set_read_timeout(Some(RECV_TIMEOUT))?;
    sock.set_write_timeout(Some(RECV_TIMEOUT))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .with_context(|| format!("TLS handshake with {server}"))?;
    }
    Ok(rustls::StreamOwned::new(conn, sock))
}
