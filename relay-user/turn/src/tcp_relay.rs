//! TCP allocations (RFC 6062): the client asks, over its control connection, for connections
//! to peers (Connect) and hears of peers that connected to its relayed address
//! (ConnectionAttempt); each peer connection is then joined to a new client connection
//! (ConnectionBind), after which the shell passes bytes between the two as they are. The core
//! keeps each peer connection's state and deadlines; sockets, connecting and the byte relay
//! are the shell's.

use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::RngCore;
use tracing::{debug, info, warn};

use super::{Authenticated, Output, ReplyTo, Server, Timer, canonical_socket};
use crate::stun::{Attribute, Class, Message, MessageBuilder, Method, TransactionId};
use crate::{FiveTuple, Transport};
use std::cmp::Reverse;

/// RFC 6062 §6.2.1 CONNECTION-ID: opaque to clients. Its top byte is the issuing server's
/// shard ([`connection_shard`]).
pub type ConnectionId = u32;

/// RFC 6062 §5.2: a Connect fails with 447 when the connection is not up in this time (at
/// least 30 s), and a peer connection not bound to a client data connection within 30 s of
/// its CONNECTION-ID being issued is closed (§5.2, §5.3).
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
pub const CONNECTION_BIND_TIMEOUT: Duration = Duration::from_secs(30);
/// Random picks of a free CONNECTION-ID before giving up (24 random bits per shard: a
/// collision is rare, a run of them means the shard is nearly full).
const ID_TRIES: usize = 16;

/// The shard that issued `id`: where the shell sends the ConnectionBind that names it.
pub fn connection_shard(id: ConnectionId) -> u8 {
    (id >> 24) as u8
}

/// One peer connection of a TCP allocation.
pub(super) struct PeerConnection {
    allocation: FiveTuple,
    /// The relayed address it was made on (a dual allocation has two).
    relay: SocketAddr,
    peer: SocketAddr,
    state: ConnectionState,
    /// When the state's timer fires (connect or bind timeout); None once bound.
    deadline: Option<Instant>,
}

enum ConnectionState {
    /// The shell is connecting to the peer; the Connect is answered when it is done.
    Connecting { reply: ReplyTo, auth: Authenticated },
    /// Up, its CONNECTION-ID given to the client, waiting for the ConnectionBind. The shell
    /// does not read it meanwhile: what the peer sends waits in the kernel's receive buffer,
    /// whose window closes when it is full (§5.3's "buffer ... and adjust the window").
    AwaitingBind,
    /// Joined to a client data connection.
    Bound { data: FiveTuple },
}

impl Server {
    /// Connect (RFC 6062 §5.2) on `five_tuple`'s own allocation. Answers at once (Some) or
    /// once the shell has connected (None).
    pub(super) fn handle_connect(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        auth: Authenticated,
        now: Instant,
    ) -> Option<Vec<u8>> {
        let Some(peer) = request.xor_peer_addresses().next().map(canonical_socket) else {
            return Some(self.error(request, 400, &[], Some(&auth)));
        };
        let allocation = self
            .allocations
            .get(&five_tuple)
            .expect("checked by caller");
        // A UDP allocation has no listener to connect from (coturn answers the same).
        if !allocation.tcp {
            return Some(self.error(request, 403, &[], Some(&auth)));
        }
        if let Err(reason) = self.config.peer_policy.check_socket(peer) {
            self.stats.forbidden_peers += 1;
            warn!(client = %five_tuple.client, user = %auth.username, %peer, %reason, "connect refused");
            return Some(self.error(request, 403, &[], Some(&auth)));
        }
        // A connection cannot be held like a permission: without consent it is refused.
        if !self.consent_to_connect(five_tuple, peer.ip(), now) {
            self.stats.consent_refused_connections += 1;
            info!(client = %five_tuple.client, user = %auth.username, %peer, "connect refused: no internal party has agreed");
            return Some(self.error(request, 403, &[], Some(&auth)));
        }
        let allocation = self
            .allocations
            .get(&five_tuple)
            .expect("checked by caller");
        let Some(relay) = allocation.relay_for(&peer).map(|r| r.bound) else {
            return Some(self.error(request, 443, &[], Some(&auth)));
        };
        if allocation.peer_connections.contains_key(&peer) {
            return Some(self.error(request, 446, &[], Some(&auth)));
        }
        if allocation.peer_connections.len() >= self.config.peer_connections_per_allocation {
            self.stats.capacity_rejections += 1;
            debug!(client = %five_tuple.client, %peer, "connect refused: peer connections per allocation");
            return Some(self.error(request, 508, &[], Some(&auth)));
        }
        let Some(id) = self.new_connection_id() else {
            self.stats.capacity_rejections += 1;
            return Some(self.error(request, 508, &[], Some(&auth)));
        };
        let reply = ReplyTo::from(request);
        self.insert_peer_connection(
            id,
            (five_tuple, relay),
            peer,
            ConnectionState::Connecting { reply, auth },
            now + PEER_CONNECT_TIMEOUT,
        );
        self.out
            .0
            .push_back(Output::ConnectPeer { id, relay, peer });
        None
    }

    /// The shell's answer to [`Output::ConnectPeer`]. True when the core keeps the
    /// connection (the shell holds it, unread, until spliced or closed); false when the shell
    /// must close it (the Connect failed, timed out or its allocation is gone).
    pub fn handle_connect_result(
        &mut self,
        id: ConnectionId,
        connected: bool,
        now: Instant,
    ) -> bool {
        let Some(connection) = self.peer_connections.get_mut(&id) else {
            return false;
        };
        if !matches!(connection.state, ConnectionState::Connecting { .. }) {
            return false;
        }
        let allocation = connection.allocation;
        let peer = connection.peer;
        if !connected {
            self.fail_connect(id);
            return false;
        }
        let ConnectionState::Connecting { reply, auth } =
            std::mem::replace(&mut connection.state, ConnectionState::AwaitingBind)
        else {
            unreachable!("matched above");
        };
        let deadline = now + CONNECTION_BIND_TIMEOUT;
        connection.deadline = Some(deadline);
        self.timers
            .push(Reverse((deadline, Timer::PeerConnection(id))));
        self.stats.peer_connections_connected += 1;
        debug!(client = %allocation.client, %peer, id, "peer connection up");
        let response = self.success(reply, &[Attribute::ConnectionId(id)], Some(&auth));
        self.reply(allocation, response);
        true
    }

    /// A TCP peer connected to relayed address `relay` (RFC 6062 §5.3). Some(id) when it is
    /// accepted (the shell holds it, unread, as `id`); None when the shell must close it: no
    /// allocation, no permission for the peer's address, the peer policy or the cap.
    pub fn handle_peer_connection(
        &mut self,
        relay: SocketAddr,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<ConnectionId> {
        let peer = canonical_socket(peer);
        let allocation = self
            .by_relay
            .get(&relay)
            .and_then(|five_tuple| self.allocations.get(five_tuple))
            .filter(|allocation| allocation.tcp);
        let Some(allocation) = allocation else {
            self.stats.peer_connections_refused += 1;
            return None;
        };
        let five_tuple = allocation.five_tuple;
        // A held permission may have its consent by now (the parties changed).
        if allocation.holds(peer.ip()) {
            self.consent_came(five_tuple, peer.ip(), now);
        }
        let allocation = self.allocations.get(&five_tuple).expect("looked up above");
        // §5.3: only a peer with a permission; and ours: the peer policy and the cap.
        let refusal = if let Err(reason) = self.config.peer_policy.check_socket(peer) {
            self.stats.forbidden_peers += 1;
            Some(reason.to_string())
        } else if !allocation.has_permission(peer.ip(), now) {
            self.stats.no_permission_dropped += 1;
            Some("no permission".to_owned())
        } else if allocation.holds(peer.ip()) {
            // Its permission waits for consent.
            self.stats.consent_refused_connections += 1;
            Some("no internal party has agreed".to_owned())
        } else if allocation.peer_connections.contains_key(&peer) {
            Some("a connection with this peer exists".to_owned())
        } else if allocation.peer_connections.len() >= self.config.peer_connections_per_allocation {
            self.stats.capacity_rejections += 1;
            Some("peer connections per allocation".to_owned())
        } else {
            None
        };
        let id = match refusal {
            None => self.new_connection_id(),
            Some(reason) => {
                debug!(client = %five_tuple.client, %peer, reason, "peer connection refused");
                None
            }
        };
        let Some(id) = id else {
            self.stats.peer_connections_refused += 1;
            return None;
        };
        self.insert_peer_connection(
            id,
            (five_tuple, relay),
            peer,
            ConnectionState::AwaitingBind,
            now + CONNECTION_BIND_TIMEOUT,
        );
        self.stats.peer_connections_accepted += 1;
        let mut transaction_id = [0u8; 12];
        self.rng.fill_bytes(&mut transaction_id);
        let mut indication = MessageBuilder::new(
            Class::Indication,
            Method::CONNECTION_ATTEMPT,
            TransactionId(transaction_id),
        );
        indication.add(&Attribute::XorPeerAddress(peer));
        indication.add(&Attribute::ConnectionId(id));
        if let Some(software) = &self.config.software {
            indication.add(&Attribute::Software(software));
        }
        debug!(client = %five_tuple.client, %peer, id, "peer connection accepted");
        self.reply(five_tuple, indication.finish());
        Some(id)
    }

    /// ConnectionBind (RFC 6062 §5.4) on a new client connection: with the credentials of
    /// the allocation whose peer connection it names, it becomes that connection's client
    /// data connection. The response goes out before the splice.
    pub(super) fn handle_connection_bind(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        auth: &Authenticated,
    ) {
        match self.connection_bind(five_tuple, request, auth) {
            Ok(id) => {
                let response = self.success(request, &[], Some(auth));
                self.reply(five_tuple, response);
                self.out.0.push_back(Output::SpliceConnection {
                    id,
                    client: five_tuple,
                });
            }
            Err(code) => {
                let response = self.error(request, code, &[], Some(auth));
                self.reply(five_tuple, response);
            }
        }
    }

    fn connection_bind(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        auth: &Authenticated,
    ) -> Result<ConnectionId, u16> {
        // Only a fresh stream connection becomes a data connection (as coturn: not one that
        // holds an allocation or is already bound).
        if five_tuple.transport == Transport::Udp
            || self.allocations.contains_key(&five_tuple)
            || self.pending.contains_key(&five_tuple)
            || self.data_connections.contains_key(&five_tuple)
        {
            return Err(400);
        }
        let id = request.connection_id().ok_or(400u16)?;
        let connection = self.peer_connections.get_mut(&id).ok_or(400u16)?;
        if !matches!(connection.state, ConnectionState::AwaitingBind) {
            return Err(400);
        }
        let owner = self.allocations.get(&connection.allocation).ok_or(400u16)?;
        // §5.4: the same credentials as the control connection.
        if *owner.username != *auth.username {
            return Err(441);
        }
        connection.state = ConnectionState::Bound { data: five_tuple };
        connection.deadline = None;
        self.data_connections.insert(five_tuple, id);
        self.stats.peer_connections_bound += 1;
        info!(
            client = %connection.allocation.client,
            data = %five_tuple.client,
            peer = %connection.peer,
            id,
            "peer connection bound"
        );
        Ok(id)
    }

    /// Count what a spliced peer connection relayed (bytes the shell passed on its own), and
    /// credit it to its allocation if both are still there: call before
    /// [`Server::client_closed`] for the data connection. The allocation usually went first
    /// (its control connection closed, which closed its peer connections).
    pub fn credit_data_connection(&mut self, data: &FiveTuple, bytes: super::RelayedBytes) {
        self.stats.to_peer_bytes += bytes.from_client;
        self.stats.to_client_bytes += bytes.to_client;
        let allocation = self
            .data_connections
            .get(data)
            .and_then(|id| self.peer_connections.get(id))
            .and_then(|connection| self.allocations.get_mut(&connection.allocation));
        if let Some(allocation) = allocation {
            allocation.relayed.from_client += bytes.from_client;
            allocation.relayed.to_client += bytes.to_client;
        }
    }

    /// A connect or bind deadline of `id`, set for `at`, passed.
    pub(super) fn expire_peer_connection(&mut self, id: ConnectionId, at: Instant) {
        let Some(connection) = self.peer_connections.get(&id) else {
            return;
        };
        if connection.deadline != Some(at) {
            return;
        }
        match connection.state {
            ConnectionState::Connecting { .. } => {
                debug!(client = %connection.allocation.client, peer = %connection.peer, id, "connect timed out");
                self.fail_connect(id);
            }
            ConnectionState::AwaitingBind => {
                debug!(client = %connection.allocation.client, peer = %connection.peer, id, "no ConnectionBind in time");
                self.stats.peer_connections_unbound_expired += 1;
                self.close_peer_connection(id);
            }
            ConnectionState::Bound { .. } => {}
        }
    }

    /// The Connect of `id` gets 447 and the connection is forgotten.
    fn fail_connect(&mut self, id: ConnectionId) {
        let Some(connection) = self.remove_peer_connection(id) else {
            return;
        };
        self.out.0.push_back(Output::ClosePeerConnection { id });
        self.stats.peer_connections_failed += 1;
        if let ConnectionState::Connecting { reply, auth } = connection.state {
            let response = self.error(reply, 447, &[], Some(&auth));
            self.reply(connection.allocation, response);
        }
    }

    /// Forget peer connection `id` and have the shell close it.
    /// A Connect still under way is answered with 447 (its control connection may live on:
    /// a Refresh to 0 or a revocation ended the allocation).
    pub(super) fn close_peer_connection(&mut self, id: ConnectionId) {
        let Some(connection) = self.remove_peer_connection(id) else {
            return;
        };
        self.out.0.push_back(Output::ClosePeerConnection { id });
        if let ConnectionState::Connecting { reply, auth } = connection.state {
            self.stats.peer_connections_failed += 1;
            let response = self.error(reply, 447, &[], Some(&auth));
            self.reply(connection.allocation, response);
        }
    }

    /// Every peer connection of `allocation` (RFC 6062 §5.5: they end with it).
    pub(super) fn close_peer_connections(&mut self, allocation: &crate::allocation::Allocation) {
        for id in allocation.peer_connections.values() {
            self.close_peer_connection(*id);
        }
    }

    /// The peer connections made on `relay`, one of `five_tuple`'s relayed addresses that is
    /// going away (one family of a dual allocation): their sockets hold its port.
    pub(super) fn close_peer_connections_on(&mut self, five_tuple: FiveTuple, relay: SocketAddr) {
        let Some(allocation) = self.allocations.get(&five_tuple) else {
            return;
        };
        let on_relay: Vec<ConnectionId> = allocation
            .peer_connections
            .values()
            .copied()
            .filter(|id| {
                self.peer_connections
                    .get(id)
                    .is_some_and(|c| c.relay == relay)
            })
            .collect();
        for id in on_relay {
            self.close_peer_connection(id);
        }
    }

    fn remove_peer_connection(&mut self, id: ConnectionId) -> Option<PeerConnection> {
        let connection = self.peer_connections.remove(&id)?;
        if let Some(allocation) = self.allocations.get_mut(&connection.allocation) {
            allocation.peer_connections.remove(&connection.peer);
        }
        if let ConnectionState::Bound { data } = connection.state {
            self.data_connections.remove(&data);
        }
        Some(connection)
    }

    fn insert_peer_connection(
        &mut self,
        id: ConnectionId,
        (allocation, relay): (FiveTuple, SocketAddr),
        peer: SocketAddr,
        state: ConnectionState,
        deadline: Instant,
    ) {
        if let Some(owner) = self.allocations.get_mut(&allocation) {
            owner.peer_connections.insert(peer, id);
        }
        self.peer_connections.insert(
            id,
            PeerConnection {
                allocation,
                relay,
                peer,
                state,
                deadline: Some(deadline),
            },
        );
        self.timers
            .push(Reverse((deadline, Timer::PeerConnection(id))));
    }

    /// A CONNECTION-ID of this shard not in use, unique among this server's connections.
    pub(super) fn new_connection_id(&mut self) -> Option<ConnectionId> {
        for _ in 0..ID_TRIES {
            let id = (u32::from(self.connection_shard) << 24) | (self.rng.next_u32() & 0x00FF_FFFF);
            if let Entry::Vacant(_) = self.peer_connections.entry(id) {
                return Some(id);
            }
        }
        None
    }
}
