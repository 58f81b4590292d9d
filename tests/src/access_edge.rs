//! The Access Edge (SIP) under test: a PKI for its names and peers, its `[sip]` section, a
//! blocking SIP-over-TLS client that can send raw bytes, and a scripted next hop that
//! answers like an internal front end (with internal names the edge must hide).

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use rampart_sip::{Frame, Framer, HeaderName, Limits, Message, StartLine};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The enterprise of the tests (a partner is `partner.example`).
pub const DOMAIN: &str = "corp.example";
/// What the scripted next hop puts in Contact and Server: the edge must never show these.
pub const INTERNAL_CONTACT: &str = "sip:bob@10.0.0.21:5061;transport=tls";
pub const INTERNAL_SERVER: &str = "FrontEnd/7.0 fe01.corp.local";

/// One CA whose leaves carry both server and client authentication, written as PEM files.
pub struct SipPki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A certificate and its key as PEM files.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

impl SipPki {
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<SipPki> {
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key)?;
        let pki = SipPki {
            dir: dir.join(name),
            ca,
            ca_key,
        };
        std::fs::create_dir_all(&pki.dir)?;
        std::fs::write(pki.ca_path(), pki.ca.pem())?;
        Ok(pki)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A leaf for `names` (DNS SANs), usable as server and as client certificate.
    pub fn issue(&self, stem: &str, names: &[&str]) -> anyhow::Result<Leaf> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or(stem));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.ca, &self.ca_key)?;
        let leaf = Leaf {
            certificate: self.dir.join(format!("{stem}.pem")),
            private_key: self.dir.join(format!("{stem}.key")),
        };
        std::fs::write(&leaf.certificate, cert.pem())?;
        std::fs::write(&leaf.private_key, key.serialize_pem())?;
        Ok(leaf)
    }
}

/// The `[sip]` section of a test edge.
#[derive(Clone, Debug)]
pub struct EdgeSection {
    pub external: SocketAddr,
    /// A plain-TCP listener too (labs).
    pub external_tcp: Option<SocketAddr>,
    pub internal: SocketAddr,
    pub external_host: String,
    pub internal_host: String,
    pub domains: Vec<String>,
    pub external_leaf: Leaf,
    pub internal_leaf: Leaf,
    pub internal_ca: PathBuf,
    /// `token_secret`: a file with the secret routing tokens are sealed with.
    pub token_secret: Option<PathBuf>,
    /// (host, address) in failover order.
    pub next_hops: Vec<(String, SocketAddr)>,
    pub partner_ca: Option<PathBuf>,
    /// (domain, edge host, address).
    pub routes: Vec<(String, String, SocketAddr)>,
    pub dns_servers: Vec<SocketAddr>,
    /// `key = value` lines (TOML values) for `[sip.policy]` and `[sip.limits]`.
    pub policy: Vec<(String, String)>,
    pub limits: Vec<(String, String)>,
}

fn quote(text: &str) -> String {
    format!("{text:?}")
}

fn path(path: &Path) -> String {
    quote(&path.display().to_string())
}

impl EdgeSection {
    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\n[sip]\nexternal = [{}]",
            quote(&self.external.to_string())
        );
        if let Some(secret) = &self.token_secret {
            let _ = writeln!(t, "token_secret = {}", path(secret));
        }
        if let Some(tcp) = self.external_tcp {
            let _ = writeln!(t, "external_tcp = [{}]", quote(&tcp.to_string()));
        }
        let _ = writeln!(
            t,
            "external_host = {}\ninternal_host = {}",
            quote(&self.external_host),
            quote(&self.internal_host)
        );
        let _ = writeln!(t, "internal = {}", quote(&self.internal.to_string()));
        let domains: Vec<String> = self.domains.iter().map(|d| quote(d)).collect();
        let _ = writeln!(t, "domains = [{}]", domains.join(", "));
        let _ = writeln!(
            t,
            "certificate = {}\nprivate_key = {}\ninternal_certificate = {}\ninternal_private_key = {}\ninternal_ca = {}",
            path(&self.external_leaf.certificate),
            path(&self.external_leaf.private_key),
            path(&self.internal_leaf.certificate),
            path(&self.internal_leaf.private_key),
            path(&self.internal_ca),
        );
        for (host, address) in &self.next_hops {
            let _ = writeln!(
                t,
                "\n[[sip.next_hop]]\nhost = {}\naddress = {}",
                quote(host),
                quote(&address.to_string())
            );
        }
        let _ = writeln!(t, "\n[sip.federation]");
        if let Some(ca) = &self.partner_ca {
            let _ = writeln!(t, "partner_ca = {}", path(ca));
        }
        let servers: Vec<String> = self
            .dns_servers
            .iter()
            .map(|s| quote(&s.to_string()))
            .collect();
        let _ = writeln!(t, "dns_servers = [{}]", servers.join(", "));
        for (domain, host, address) in &self.routes {
            let _ = writeln!(
                t,
                "\n[[sip.federation.route]]\ndomain = {}\nhost = {}\naddress = {}",
                quote(domain),
                quote(host),
                quote(&address.to_string())
            );
        }
        for (section, lines) in [("policy", &self.policy), ("limits", &self.limits)] {
            let _ = writeln!(t, "\n[sip.{section}]");
            for (key, value) in lines.iter() {
                let _ = writeln!(t, "{key} = {value}");
            }
        }
        t
    }
}

/// A free TCP port on `ip`.
fn load_leaf(
    leaf: &Leaf,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    crate::certs::certificate_and_key(
        &std::fs::read(&leaf.certificate)?,
        &std::fs::read(&leaf.private_key)?,
    )
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A blocking SIP-over-TLS connection.
pub struct SipConnection {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    framer: Framer,
}

impl SipConnection {
    /// Connects from `local` (an IP of the loopback network, for per-source tests) to `to`,
    /// verifying `server_name` against `ca`; `client` presents a certificate.
    pub fn connect(
        to: SocketAddr,
        local: Option<IpAddr>,
        server_name: &str,
        ca: CertificateDer<'static>,
        client: Option<&Leaf>,
    ) -> anyhow::Result<SipConnection> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match client {
            Some(leaf) => {
                let (certs, key) = load_leaf(leaf)?;
                builder.with_client_auth_cert(certs, key)?
            }
            None => builder.with_no_client_auth(),
        };
        let tcp = connect_from(to, local)?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.set_nodelay(true)?;
        let connection = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from(server_name.to_owned())?,
        )?;
        let mut tls = rustls::StreamOwned::new(connection, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(SipConnection {
            tls,
            framer: Framer::new(Limits::default()),
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.tls.write_all(bytes)?;
        self.tls.flush()?;
        Ok(())
    }

    pub fn send_message(&mut self, message: &Message) -> anyhow::Result<()> {
        self.send(&message.to_bytes())
    }

    /// The next message, or an error on timeout or close.
    pub fn recv(&mut self) -> anyhow::Result<Message> {
        loop {
            match self
                .framer
                .next_frame()
                .map_err(|e| anyhow::anyhow!("unframable: {e}"))?
            {
                Some(Frame::Message(message)) => return Ok(message),
                Some(Frame::Invalid(error)) => bail!("the peer sent an invalid message: {error}"),
                Some(Frame::Ping | Frame::Pong) => continue,
                None => {}
            }
            let mut buffer = [0u8; 16 * 1024];
            let count = self.tls.read(&mut buffer)?;
            if count == 0 {
                bail!("connection closed");
            }
            self.framer.push(&buffer[..count]);
        }
    }

    /// Raw bytes received until a whole message head arrived, `limit` passed or the peer
    /// closed; `true` if it closed.
    pub fn read_until_closed(&mut self, limit: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + limit;
        let mut bytes = Vec::new();
        let _ = self
            .tls
            .sock
            .set_read_timeout(Some(Duration::from_millis(100)));
        while Instant::now() < deadline {
            let mut buffer = [0u8; 4096];
            match self.tls.read(&mut buffer) {
                Ok(0) => return (bytes, true),
                Ok(count) => {
                    bytes.extend_from_slice(&buffer[..count]);
                    if bytes.windows(4).any(|w| w == b"\r\n\r\n") {
                        return (bytes, false);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return (bytes, true),
            }
        }
        (bytes, false)
    }
}

fn connect_from(to: SocketAddr, local: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(ip) = local {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.connect_timeout(&to.into(), Duration::from_secs(3))?;
    Ok(socket.into())
}

/// A request as a test sends it (CRLF line ends, Content-Length filled in).
pub fn request(
    method: &str,
    uri: &str,
    from: &str,
    to: &str,
    call_id: &str,
    extra: &str,
) -> Message {
    let text = format!(
        "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.7:40000;branch=z9hG4bK{call_id}{}\r\nMax-Forwards: 70\r\n\
         From: <{from}>;tag=f{call_id}\r\nTo: <{to}>\r\nCall-ID: {call_id}\r\nCSeq: 1 {method}\r\n\
         Contact: <sip:u@198.51.100.7:40000;transport=tls>\r\n{extra}Content-Length: 0\r\n\r\n",
        rand::random::<u32>()
    );
    Message::parse(text.as_bytes(), &Limits::default()).expect("a test request parses")
}

pub fn status(message: &Message) -> Option<(u16, &str)> {
    match &message.start {
        StartLine::Response { status, reason } => Some((*status, reason.as_str())),
        StartLine::Request { .. } => None,
    }
}

/// A next hop that answers every request (but ACK) with 200 and internal names in Contact,
/// Record-Route and Server; what it received is kept for the test to look at.
pub struct ScriptedNextHop {
    pub address: SocketAddr,
    pub received: Arc<Mutex<Vec<Message>>>,
    /// TLS connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl ScriptedNextHop {
    /// Listens on `address` (port 0 for any) with `leaf`, requiring client certificates from `ca`.
    pub fn start(
        address: SocketAddr,
        leaf: &Leaf,
        ca: CertificateDer<'static>,
    ) -> anyhow::Result<ScriptedNextHop> {
        let (certs, key) = load_leaf(leaf)?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()?;
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)?,
        );
        let listener = TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (received_in, stop_in, connections_in) =
            (received.clone(), stop.clone(), connections.clone());
        std::thread::spawn(move || {
            while !stop_in.load(Ordering::Relaxed) {
                let Ok((tcp, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                connections_in.fetch_add(1, Ordering::Relaxed);
                let (config, received, stop) =
                    (config.clone(), received_in.clone(), stop_in.clone());
                std::thread::spawn(move || {
                    let _ = serve_next_hop(tcp, config, received, stop);
                });
            }
        });
        Ok(ScriptedNextHop {
            address,
            received,
            connections,
            stop,
        })
    }

    /// Requests received with this method.
    pub fn requests(&self, method: &str) -> Vec<Message> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.method() == Some(method))
            .cloned()
            .collect()
    }
}

impl ScriptedNextHop {
    /// Stops listening and closes its connections (within a fraction of a second).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for ScriptedNextHop {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_next_hop(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    received: Arc<Mutex<Vec<Message>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config)?, tcp);
    let mut framer = Framer::new(Limits::default());
    let mut buffer = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match tls.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(count) => framer.push(&buffer[..count]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        while let Some(frame) = framer.next_frame().map_err(|e| anyhow::anyhow!("{e}"))? {
            match frame {
                Frame::Message(message) => {
                    received.lock().unwrap().push(message.clone());
                    if message.method().is_some_and(|m| m != "ACK") {
                        tls.write_all(&answer(&message, 200, "OK").to_bytes())?;
                        tls.flush()?;
                    }
                }
                Frame::Ping => {
                    tls.write_all(b"\r\n")?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The response a front end would send: internal Contact, Server and an internal
/// Record-Route above the edge's.
pub fn answer(request: &Message, status: u16, reason: &str) -> Message {
    let mut text = format!("SIP/2.0 {status} {reason}\r\n");
    for via in request.header_values(&HeaderName::Via) {
        let _ = write!(text, "Via: {via}\r\n");
    }
    let dialog = request.method() != Some("REGISTER");
    if dialog {
        let _ = write!(
            text,
            "Record-Route: <sip:fe01.corp.local:5061;transport=tls;lr>\r\n"
        );
        for rr in request.header_values(&HeaderName::RecordRoute) {
            let _ = write!(text, "Record-Route: {rr}\r\n");
        }
    }
    for name in [HeaderName::From, HeaderName::CallId, HeaderName::CSeq] {
        let _ = write!(
            text,
            "{}: {}\r\n",
            name.as_str(),
            request.header(&name).unwrap_or_default()
        );
    }
    let to = request.header(&HeaderName::To).unwrap_or_default();
    let _ = write!(text, "To: {to};tag=fe01\r\n");
    if dialog {
        let _ = write!(text, "Contact: <{INTERNAL_CONTACT}>\r\n");
    } else if let Some(contact) = request.header(&HeaderName::Contact) {
        let _ = write!(text, "Contact: {contact};expires=3600\r\n");
    }
    let _ = write!(
        text,
        "Server: {INTERNAL_SERVER}\r\nContent-Length: 0\r\n\r\n"
    );
    Message::parse(text.as_bytes(), &Limits::default()).expect("the scripted answer parses")
}

/// One enterprise's side of a test deployment: its internal CA, a scripted next hop, and the
/// `[sip]` section of its edge (external certificate from `public`, the CA partners and
/// clients trust), plus a front-end certificate for requests from inside.
pub struct Site {
    pub domain: String,
    pub pki: SipPki,
    pub next_hop: ScriptedNextHop,
    pub section: EdgeSection,
    pub front_end: Leaf,
}

impl Site {
    pub fn new(dir: &Path, name: &str, domain: &str, public: &SipPki) -> anyhow::Result<Site> {
        let pki = SipPki::new(dir, name)?;
        let next_hop_host = format!("pool.{name}.local");
        let next_hop = ScriptedNextHop::start(
            (IpAddr::from([127, 0, 0, 1]), 0).into(),
            &pki.issue("next-hop", &[&next_hop_host])?,
            pki.ca_der(),
        )?;
        let external_host = format!("sip.{domain}");
        let internal_host = format!("edge-int.{name}.local");
        let localhost = IpAddr::from([127, 0, 0, 1]);
        let section = EdgeSection {
            external: crate::ports::free_tcp_address(localhost)?,
            external_tcp: None,
            internal: crate::ports::free_tcp_address(localhost)?,
            external_leaf: public.issue(&format!("{name}-edge"), &[&external_host])?,
            internal_leaf: pki.issue("edge-internal", &[&internal_host])?,
            external_host,
            internal_host,
            domains: vec![domain.to_owned()],
            internal_ca: pki.ca_path(),
            token_secret: None,
            next_hops: vec![(next_hop_host, next_hop.address)],
            partner_ca: None,
            routes: Vec::new(),
            dns_servers: Vec::new(),
            policy: Vec::new(),
            limits: Vec::new(),
        };
        Ok(Site {
            domain: domain.to_owned(),
            front_end: pki.issue("front-end", &[&format!("fe01.{name}.local")])?,
            pki,
            next_hop,
            section,
        })
    }

    /// A connection to the edge's internal listener with the front end's certificate.
    pub fn internal_client(&self) -> anyhow::Result<SipConnection> {
        SipConnection::connect(
            self.section.internal,
            None,
            &self.section.internal_host,
            self.pki.ca_der(),
            Some(&self.front_end),
        )
    }

    /// A connection to the edge's external listener, as a remote user (no certificate).
    pub fn outside_client(&self, public: &SipPki) -> anyhow::Result<SipConnection> {
        SipConnection::connect(
            self.section.external,
            None,
            &self.section.external_host,
            public.ca_der(),
            None,
        )
    }
}

/// A name server on loopback answering SRV and A queries from a fixed table, for the edge's
/// partner lookups (`[sip.federation] dns_servers`). Unknown names get NXDOMAIN.
pub struct FakeDns {
    pub address: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl FakeDns {
    /// `srv`: (owner name, priority, weight, port, target); `a`: (name, IPv4).
    pub fn start(
        srv: Vec<(String, u16, u16, u16, String)>,
        a: Vec<(String, std::net::Ipv4Addr)>,
    ) -> anyhow::Result<FakeDns> {
        use hickory_proto::op::{Message as Dns, MessageType, ResponseCode};
        use hickory_proto::rr::rdata::{A, SRV};
        use hickory_proto::rr::{Name, RData, Record, RecordType};

        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let address = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_in = stop.clone();
        let same = |a: &Name, b: &str| {
            a.to_ascii()
                .trim_end_matches('.')
                .eq_ignore_ascii_case(b.trim_end_matches('.'))
        };
        std::thread::spawn(move || {
            let mut buffer = [0u8; 1500];
            while !stop_in.load(Ordering::Relaxed) {
                let Ok((count, from)) = socket.recv_from(&mut buffer) else {
                    continue;
                };
                let Ok(query) = Dns::from_vec(&buffer[..count]) else {
                    continue;
                };
                let mut response = Dns::new();
                response
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(query.op_code());
                response
                    .set_recursion_desired(query.recursion_desired())
                    .set_recursion_available(true)
                    .set_authoritative(true);
                for question in query.queries() {
                    response.add_query(question.clone());
                    let name = question.name();
                    match question.query_type() {
                        RecordType::SRV => {
                            for (_, priority, weight, port, target) in
                                srv.iter().filter(|r| same(name, &r.0))
                            {
                                let target =
                                    Name::from_ascii(format!("{target}.")).expect("a DNS name");
                                response.add_answer(Record::from_rdata(
                                    name.clone(),
                                    60,
                                    RData::SRV(SRV::new(*priority, *weight, *port, target)),
                                ));
                            }
                        }
                        RecordType::A => {
                            for (_, ip) in a.iter().filter(|r| same(name, &r.0)) {
                                response.add_answer(Record::from_rdata(
                                    name.clone(),
                                    60,
                                    RData::A(A(*ip)),
                                ));
                            }
                        }
                        _ => {}
                    }
                }
                let known =
                    |n: &Name| srv.iter().any(|r| same(n, &r.0)) || a.iter().any(|r| same(n, &r.0));
                if response.answers().is_empty() && !query.queries().iter().any(|q| known(q.name()))
                {
                    response.set_response_code(ResponseCode::NXDomain);
                }
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, from);
                }
            }
        });
        Ok(FakeDns { address, stop })
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The control policy of the federation tests: remote users on, federation with
/// `partner.example` on or off.
pub fn federation_policy(enabled: bool) -> proto::control::v1::SetAccessPolicyRequest {
    use proto::control::v1::{AccessPolicy, FederationPolicy};
    proto::control::v1::SetAccessPolicyRequest {
        policy: Some(AccessPolicy {
            remote_users_enabled: true,
            federation: Some(FederationPolicy {
                enabled,
                allowed_domains: vec!["partner.example".into()],
                blocked_domains: vec![],
                partner_requests_per_second: 0,
            }),
            anonymous_users_enabled: false,
            internal_peer_networks: vec![],
            bandwidth: None,
        }),
    }
}

/// Two enterprises that federate over static routes: `corp.example`, whose policy comes from
/// a control service, and `partner.example`, whose configuration federates with corp.
/// Change the sites (a sipp next hop, say) before [`Federation::start`].
pub struct Federation {
    pub public: SipPki,
    pub corp: Site,
    pub partner: Site,
}

/// The running federation: the control service with federation on, and both edges.
pub struct FederatedEdges {
    pub control: crate::control::ControlService,
    pub front_end: proto::control::v1::front_end_client::FrontEndClient<tonic::transport::Channel>,
    pub corp_edge: crate::Rampart,
    pub partner_edge: crate::Rampart,
}

impl Federation {
    pub fn new(dir: &Path) -> anyhow::Result<Federation> {
        let public = SipPki::new(dir, "public")?;
        let mut corp = Site::new(dir, "corp", "corp.example", &public)?;
        let mut partner = Site::new(dir, "partner", "partner.example", &public)?;
        corp.section.partner_ca = Some(public.ca_path());
        partner.section.partner_ca = Some(public.ca_path());
        corp.section.routes = vec![(
            "partner.example".into(),
            "sip.partner.example".into(),
            partner.section.external,
        )];
        partner.section.routes = vec![(
            "corp.example".into(),
            "sip.corp.example".into(),
            corp.section.external,
        )];
        partner.section.policy = vec![
            ("federation".into(), "true".into()),
            ("allowed_domains".into(), "[\"corp.example\"]".into()),
        ];
        Ok(Federation {
            public,
            corp,
            partner,
        })
    }

    pub fn start(
        &self,
        dir: &Path,
        rt: &tokio::runtime::Runtime,
    ) -> anyhow::Result<FederatedEdges> {
        let control_pki = crate::control::ControlPki::create(dir)?;
        let localhost = IpAddr::from([127, 0, 0, 1]);
        let control = crate::control::ControlService::start(
            &control_pki,
            &dir.join("control"),
            crate::ports::free_tcp_address(localhost)?,
        )?;
        let mut front_end = rt.block_on(control_pki.front_end(control.address))?;
        rt.block_on(front_end.set_access_policy(federation_policy(true)))?;
        let config = crate::RampartConfig::single(crate::Proto::Udp, false);
        let corp_edge = crate::Rampart::start(
            &config
                .clone()
                .with_control(control_pki.agent_link(control.address))
                .with_section(self.corp.section.to_toml()),
        )?;
        let partner_edge =
            crate::Rampart::start(&config.with_section(self.partner.section.to_toml()))?;
        Ok(FederatedEdges {
            control,
            front_end,
            corp_edge,
            partner_edge,
        })
    }
}
