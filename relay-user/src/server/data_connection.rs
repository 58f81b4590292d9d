//! Client data connections of TCP allocations (RFC 6062 §5.4): a stream client connection
//! whose ConnectionBind succeeded stops carrying frames and passes bytes, as they are, to and
//! from the peer connection the loop spliced to it.
//!
//! Memory per spliced pair is fixed: one buffer each way, read into only when the other side
//! has taken the last one (a slow reader stops the copy, which stops reading the sender, whose
//! TCP window then closes), and kernel buffers capped on both sockets
//! ([`PEER_SOCKET_BUFFER`]).

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::batch_io::set_int_option;
use super::relay_loop::{PEER_SOCKET_BUFFER, PeerStream};
use rampart_turn::allocation::RelayedBytes;
use rampart_turn::server::connection_shard;
use rampart_turn::stun::{Class, Message, Method};

/// Bytes a spliced pair holds in userspace each way.
pub(crate) const SPLICE_BUFFER: usize = 16 * 1024;

/// The loop that issued the CONNECTION-ID of a ConnectionBind request, which must serve the
/// connection it arrives on; None for any other frame.
pub(crate) fn connection_bind_loop(frame: &[u8]) -> Option<usize> {
    let message = Message::parse(frame).ok()?;
    if message.class != Class::Request || message.method != Method::CONNECTION_BIND {
        return None;
    }
    message
        .connection_id()
        .map(|id| usize::from(connection_shard(id)))
}

/// Pass bytes between `client` and `peer` until both have closed their sending side, either
/// fails, or the loop closes the peer connection; `early` (bytes the client sent after its
/// ConnectionBind, read with it) go first. Returns what went each way.
pub(crate) async fn splice<S>(client: S, peer: PeerStream, early: &[u8]) -> RelayedBytes
where
    S: AsyncRead + AsyncWrite + AsRawFd + Unpin,
{
    let PeerStream {
        stream: mut peer,
        closed,
    } = peer;
    // Set after the connection is up, this caps what the kernel holds towards a slow client
    // reader; the peer side's was set before connect or listen.
    let capped = i32::try_from(PEER_SOCKET_BUFFER).unwrap_or(i32::MAX);
    let _ = set_int_option(&client, libc::SOL_SOCKET, libc::SO_SNDBUF, capped);
    let _ = set_int_option(&client, libc::SOL_SOCKET, libc::SO_RCVBUF, capped);
    let mut relayed = RelayedBytes::default();
    if !early.is_empty() {
        if peer.write_all(early).await.is_err() {
            return relayed;
        }
        relayed.from_client += early.len() as u64;
    }
    let mut client = Counted::new(client);
    let mut peer = Counted::new(peer);
    tokio::select! {
        () = closed.cancelled() => {}
        _ = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut peer,
            SPLICE_BUFFER,
            SPLICE_BUFFER,
        ) => {}
    }
    relayed.from_client += client.read;
    relayed.to_client += peer.read;
    relayed
}

/// A stream that counts the bytes read from it, so that a splice ended from outside (its
/// allocation gone) still reports what it relayed.
struct Counted<S> {
    inner: S,
    read: u64,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Counted { inner, read: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
