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

use crate::turn::ports::RelayBinder;

use super::{Shared, udp_socket};

pub(crate) struct RelaySocket {
    pub sender: Arc<UdpSocket>,
    receiver: AbortHandle,
}

pub(crate) struct SocketBinder<'a> {
    relays: &'a mut HashMap<SocketAddr, RelaySocket>,
    shared: &'a Arc<Shared>,
}

impl<'a> SocketBinder<'a> {
    pub(crate) fn new(
        relays: &'a mut HashMap<SocketAddr, RelaySocket>,
        shared: &'a Arc<Shared>,
    ) -> Self {
        SocketBinder { relays, shared }
    }
}

impl RelayBinder for SocketBinder<'_> {
    fn bind(&mut self, addr: SocketAddr, dont_fragment: bool) -> bool {
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
            tokio::spawn(relay_receiver(self.shared.clone(), addr, socket.clone())).abort_handle();
        self.relays.insert(
            addr,
            RelaySocket {
                sender: socket,
                receiver,
            },
        );
        true
    }

    fn release(&mut self, addr: SocketAddr) {
        if let Some(relay) = self.relays.remove(&addr) {
            relay.receiver.abort();
        }
    }
}

/// Datagrams from peers, into the state machine.
pub(crate) async fn relay_receiver(shared: Arc<Shared>, relay: SocketAddr, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                debug!(%relay, %error, "relay receive error");
                continue;
            }
        };
        let route =
            shared.step(|core, _| core.handle_peer_input(relay, peer, &buf[..len], Instant::now()));
        shared.send(route);
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
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
