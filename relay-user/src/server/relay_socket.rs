//! Relay sockets: one UDP socket per relayed transport address, bound when the state machine
//! allocates and closed when it releases.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use rampart_turn::server::{PEER_HEADROOM, PEER_TAILROOM};

use super::{Shared, udp_socket};

/// The largest UDP payload over IPv6 (65535 less the UDP header; IPv4's is smaller).
const MAX_DATAGRAM: usize = 65527;

pub(crate) struct RelaySocket {
    pub sender: Arc<UdpSocket>,
    receiver: AbortHandle,
}

/// Bind the relay socket at `addr` and start receiving on it; false when the port is taken
/// (the core then tries another).
pub(crate) fn bind(
    relays: &mut HashMap<SocketAddr, RelaySocket>,
    shared: &Arc<Shared>,
    addr: SocketAddr,
    dont_fragment: bool,
) -> bool {
    let socket = match udp_socket(addr) {
        Ok(socket) => socket,
        Err(error) => {
            debug!(%addr, %error, "relay port unavailable");
            return false;
        }
    };
    if dont_fragment && let Err(error) = set_dont_fragment(&*socket, addr.is_ipv6()) {
        warn!(%addr, %error, "cannot set DONT-FRAGMENT on relay socket");
        return false;
    }
    let receiver =
        tokio::spawn(relay_receiver(shared.clone(), addr, socket.clone())).abort_handle();
    relays.insert(
        addr,
        RelaySocket {
            sender: socket,
            receiver,
        },
    );
    true
}

pub(crate) fn release(relays: &mut HashMap<SocketAddr, RelaySocket>, addr: SocketAddr) {
    if let Some(relay) = relays.remove(&addr) {
        relay.receiver.abort();
    }
}

/// Datagrams from peers, into the state machine, received with room around them for the
/// header the client's copy gets (framed in place).
pub(crate) async fn relay_receiver(shared: Arc<Shared>, relay: SocketAddr, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; PEER_HEADROOM + MAX_DATAGRAM + PEER_TAILROOM];
    let mut sends = Vec::new();
    loop {
        let received = socket
            .recv_from(&mut buf[PEER_HEADROOM..PEER_HEADROOM + MAX_DATAGRAM])
            .await;
        let (len, peer) = match received {
            Ok(received) => received,
            Err(error) => {
                debug!(%relay, %error, "relay receive error");
                continue;
            }
        };
        shared.step(&mut sends, |core| {
            core.handle_peer_input(relay, peer, &mut buf, len, Instant::now());
        });
        shared.send(&mut sends, &buf);
    }
}

/// RFC 8656 §14.8 DONT-FRAGMENT: datagrams to the peer leave with DF set (path MTU
/// discovery "do"), so oversized ones fail instead of being fragmented.
fn set_dont_fragment(socket: &impl AsRawFd, ipv6: bool) -> std::io::Result<()> {
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
    // SAFETY: a valid socket fd, an int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
