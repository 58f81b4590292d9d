//! The media side of a run: flows set up through the relay's normal signalling (Allocate with
//! TURN REST credentials, CreatePermission, ChannelBind), then packets paced at a target rate
//! both ways, client -> relay -> peer as ChannelData and peer -> relay -> client as plain
//! UDP, counted where they arrive.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use rampart_tests::client::TurnClient;
use rampart_tests::netns;
use rampart_turn::channel_data::ChannelData;

use crate::payload::{Direction, HEADER, Header};
use crate::stats::Received;

/// Every flow binds this channel (each flow is an allocation of its own).
pub const CHANNEL: u16 = 0x4000;
/// Socket buffers of the generator's sockets: bursts must not be lost in our own buffers.
const SOCKET_BUFFER: usize = 4 << 20;

/// Where the relay is and how to reach it.
#[derive(Clone, Debug)]
pub struct Target {
    /// The relay's TURN listener (UDP).
    pub server: SocketAddr,
    /// The TURN REST API shared secret.
    pub secret: String,
    /// The client side's address, and its network namespace (None: this one).
    pub client_ip: IpAddr,
    pub client_netns: Option<String>,
    /// The peer side's socket address, and its network namespace.
    pub peer: SocketAddr,
    pub peer_netns: Option<String>,
}

impl Target {
    /// Runs `f` in the client side's namespace (threads it spawns are in it too).
    pub fn on_client_side<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.client_netns {
            Some(ns) => netns::run_in(ns, f),
            None => f(),
        }
    }

    fn on_peer_side<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.peer_netns {
            Some(ns) => netns::run_in(ns, f),
            None => f(),
        }
    }

    /// A client on a fresh socket of the client side.
    pub fn client(&self) -> Result<TurnClient> {
        TurnClient::connect_udp(self.client_ip, self.server)
    }

    /// Allocates on `client` as `user`; the relayed address.
    pub fn allocate(&self, client: &mut TurnClient, user: &str) -> Result<SocketAddr> {
        let (username, password) =
            rampart_tests::rest_credentials(&self.secret, user, Duration::from_secs(3600));
        Ok(client.allocate_with(&username, &password, &[])?.relayed[0])
    }
}

/// The run's clock: nanoseconds since it started, the same for senders and receivers.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Clock {
        Clock(Instant::now())
    }

    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Allocations with a channel to the peer socket, ready for media.
pub struct Flows {
    /// The clients that made the allocations; their sockets carry the media of the socket
    /// generator (after [`Flows::tune_for_media`]).
    clients: Vec<TurnClient>,
    relayed: Vec<SocketAddr>,
    peer: UdpSocket,
    target: Target,
}

impl Flows {
    /// `count` allocations, each with a permission and a channel to the peer.
    pub fn set_up(target: &Target, count: usize) -> Result<Flows> {
        let peer = target
            .on_peer_side(|| UdpSocket::bind(target.peer))
            .with_context(|| format!("binding the peer socket {}", target.peer))?;
        tune(&peer);
        let (clients, relayed) = target.on_client_side(|| -> Result<_> {
            let mut clients = Vec::with_capacity(count);
            let mut relayed = Vec::with_capacity(count);
            for flow in 0..count {
                let mut client = target.client()?;
                let relayed_address = target
                    .allocate(&mut client, &format!("load-{flow}"))
                    .with_context(|| format!("allocating flow {flow}"))?;
                client.create_permission(&[target.peer])?;
                client.channel_bind(CHANNEL, target.peer)?;
                clients.push(client);
                relayed.push(relayed_address);
            }
            Ok((clients, relayed))
        })?;
        Ok(Flows {
            clients,
            relayed,
            peer,
            target: target.clone(),
        })
    }

    /// Refreshes every flow's permission (RFC 8656 §9: 300 s) and channel binding (§12:
    /// 600 s), for runs that outlast them. Only before [`Flows::tune_for_media`]: the clients
    /// wait for their answers on blocking sockets.
    pub fn refresh(&mut self) -> Result<()> {
        let peer = self.target.peer;
        let clients = &mut self.clients;
        self.target.on_client_side(|| -> Result<()> {
            for (flow, client) in clients.iter_mut().enumerate() {
                client
                    .create_permission(&[peer])
                    .and_then(|()| client.channel_bind(CHANNEL, peer))
                    .with_context(|| format!("refreshing flow {flow}"))?;
            }
            Ok(())
        })
    }

    /// Makes the clients' sockets non-blocking with large buffers, for the socket generator's
    /// media (which then owns them: no more signalling on them).
    pub fn tune_for_media(&self) {
        for client in &self.clients {
            if let Some(socket) = client.udp_socket() {
                tune(socket);
            }
        }
    }

    /// The peer's address, where the relays send the flows' media.
    pub fn peer_addr(&self) -> SocketAddr {
        self.target.peer
    }

    fn client_socket(&self, flow: usize) -> Option<&UdpSocket> {
        self.clients.get(flow).and_then(TurnClient::udp_socket)
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Each flow's client address (its socket) and relayed address.
    pub fn addresses(&self) -> Result<Vec<(SocketAddr, SocketAddr)>> {
        self.clients
            .iter()
            .zip(&self.relayed)
            .map(|(client, relayed)| Ok((client.local_addr(), *relayed)))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// Non-blocking, with large buffers (forced past rmem_max/wmem_max when root).
fn tune(socket: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = socket.set_nonblocking(true);
    for force in [true, false] {
        let done = if force {
            setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_ok()
                && setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_ok()
        } else {
            setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER).is_ok()
                && setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER).is_ok()
        };
        if done {
            break;
        }
    }
}

/// The two receiving threads (client side, peer side), counting into [`Received`].
pub struct Receivers {
    counts: [Arc<Mutex<Received>>; 2],
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Receivers {
    pub fn start(flows: &Flows, clock: Clock) -> Result<Receivers> {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = [
            Arc::new(Mutex::new(Received::new(flows.len()))),
            Arc::new(Mutex::new(Received::new(flows.len()))),
        ];
        let clients = (0..flows.len())
            .map(|flow| {
                flows
                    .client_socket(flow)
                    .context("a UDP client")?
                    .try_clone()
                    .context("cloning a client socket")
            })
            .collect::<Result<Vec<_>>>()?;
        let peer = vec![flows.peer.try_clone()?];
        let mut threads = Vec::new();
        for (sockets, count, channel_data) in [
            (clients, counts[0].clone(), true),
            (peer, counts[1].clone(), false),
        ] {
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("receiver".into())
                    .spawn(move || receive(&sockets, &count, channel_data, &stop, clock))?,
            );
        }
        Ok(Receivers {
            counts,
            stop,
            threads,
        })
    }

    /// Starts counting `step` from zero on both sides.
    pub fn reset(&self, step: u32) {
        for count in &self.counts {
            lock(count).reset(step);
        }
    }

    /// Both sides' counts of the current step.
    pub fn total(&self) -> Received {
        let mut total = Received::new(0);
        let client_side = lock(&self.counts[0]);
        total.step = client_side.step;
        total.merge(&client_side);
        total.merge(&lock(&self.counts[1]));
        total
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn lock(count: &Mutex<Received>) -> MutexGuard<'_, Received> {
    count
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits for datagrams on `sockets` and counts them until `stop`.
fn receive(
    sockets: &[UdpSocket],
    count: &Mutex<Received>,
    channel_data: bool,
    stop: &AtomicBool,
    clock: Clock,
) {
    let Ok(epoll) = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) else {
        return;
    };
    for (index, socket) in sockets.iter().enumerate() {
        let _ = epoll.add(
            socket.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, index as u64),
        );
    }
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let ready = epoll.wait(&mut events, 100u16).unwrap_or(0);
        let mut count = lock(count);
        for event in &events[..ready] {
            let Some(socket) = sockets.get(event.data() as usize) else {
                continue;
            };
            loop {
                let len = match socket.recv(&mut buf) {
                    Ok(len) => len,
                    Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                };
                let now = clock.now_ns();
                let payload = if channel_data {
                    match ChannelData::parse(&buf[..len]) {
                        Ok(message) => message.data,
                        Err(_) => {
                            count.record(None, 0, now);
                            continue;
                        }
                    }
                } else {
                    &buf[..len]
                };
                count.record(Header::read(payload), payload.len(), now);
            }
        }
    }
}

/// The shape of the traffic.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Media payload bytes per packet (at least the header, 32).
    pub size: usize,
    /// Packets sent back to back per flow and direction before moving on (1: evenly paced,
    /// audio-like; 8-16: video-like bursts).
    pub burst: usize,
}

/// What one step sent.
pub struct Sent {
    pub sent: u64,
    pub generator_drops: u64,
    pub seconds: f64,
}

/// Sends at `rate` packets per second (both directions together, spread over every flow)
/// for `duration`, paced from this thread.
pub fn send(
    flows: &Flows,
    workload: Workload,
    rate: f64,
    duration: Duration,
    step: u32,
    clock: Clock,
) -> Result<Sent> {
    ensure!(!flows.is_empty(), "no flows");
    let size = workload.size.max(HEADER);
    let burst = workload.burst.max(1) as u64;
    let slots = flows.len() * 2;
    let mut seq = vec![0u64; slots];
    // ChannelData: channel number, length, payload (UDP needs no padding).
    let mut buf = vec![0u8; 4 + size];
    buf[0..2].copy_from_slice(&CHANNEL.to_be_bytes());
    buf[2..4].copy_from_slice(&u16::try_from(size).unwrap_or(u16::MAX).to_be_bytes());
    let (mut sent, mut drops, mut attempts) = (0u64, 0u64, 0u64);
    let mut slot = 0usize;
    let started = Instant::now();
    loop {
        let elapsed = started.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (rate * elapsed.as_secs_f64()) as u64;
        while attempts < due {
            let flow = slot / 2;
            let direction = if slot.is_multiple_of(2) {
                Direction::ToPeer
            } else {
                Direction::ToClient
            };
            for _ in 0..burst {
                Header {
                    step,
                    flow: flow as u32,
                    direction,
                    seq: seq[slot],
                    sent_ns: clock.now_ns(),
                }
                .write(&mut buf[4..]);
                seq[slot] += 1;
                attempts += 1;
                let result = match direction {
                    Direction::ToPeer => match flows.client_socket(flow) {
                        Some(socket) => socket.send(&buf),
                        None => Err(ErrorKind::NotConnected.into()),
                    },
                    Direction::ToClient => flows.peer.send_to(&buf[4..], flows.relayed[flow]),
                };
                match result {
                    Ok(_) => sent += 1,
                    Err(_) => drops += 1,
                }
            }
            slot = (slot + 1) % slots;
        }
        // Ahead of schedule: wait for the next packet's time, coarsely (sleeping costs
        // less CPU than spinning, and the CPU is what is being measured).
        let next = (attempts + 1) as f64 / rate;
        let wait = next - started.elapsed().as_secs_f64();
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait.min(0.001)));
        }
    }
    Ok(Sent {
        sent,
        generator_drops: drops,
        seconds: started.elapsed().as_secs_f64(),
    })
}
