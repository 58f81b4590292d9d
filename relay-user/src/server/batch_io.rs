//! Datagrams in and out in batches: `recvmmsg(2)` fills the free ones of [`BATCH`] buffers in
//! one call (several sockets may fill one batch), `sendmmsg(2)` sends a run of datagrams from
//! one socket in one call. Every buffer, address
//! and header array is allocated once per relay loop, so a batch costs no heap allocation.
//!
//! Why not quinn-udp: it sends one destination per call (a relay's datagrams go to many), and
//! its socket setup turns on DF and GRO for every socket, which RFC 8656's DONT-FRAGMENT
//! semantics (DF only when the client asked) and per-datagram framing would have to undo.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{SockAddr, SockAddrStorage};

/// Datagrams per system call. Past 32 the gain flattens out (coturn's and quinn's measurements
/// agree), and the batch's buffers stay small enough to keep in cache.
pub(crate) const BATCH: usize = 32;

/// Room for one control message holding a `sockaddr_in6` (`CMSG_SPACE(28)` is 48), as
/// `u64`s so that it is aligned as a `cmsghdr`.
const CONTROL_WORDS: usize = 8;

/// `BATCH` receive buffers, each with `headroom` free bytes before the datagram and `tailroom`
/// after it (the TURN core frames peer datagrams in place).
pub(crate) struct RecvBatch {
    buffers: Vec<Box<[u8]>>,
    /// With [`RecvBatch::with_destinations`]: each datagram's control message, and the
    /// original destination read from it (`IP_ORIGDSTADDR`, `IPV6_ORIGDSTADDR`).
    destinations: Option<Box<Destinations>>,
    capacity: usize,
    /// Buffers received into since the last clear.
    filled: usize,
    lens: [usize; BATCH],
    sources: [Option<SocketAddr>; BATCH],
    names: [SockAddrStorage; BATCH],
    iovecs: [libc::iovec; BATCH],
    headers: [libc::mmsghdr; BATCH],
}

impl RecvBatch {
    /// Buffers that hold a datagram of up to `capacity` bytes after `headroom`, with
    /// `tailroom` more after it.
    pub(crate) fn new(headroom: usize, capacity: usize, tailroom: usize) -> Self {
        RecvBatch {
            buffers: (0..BATCH)
                .map(|_| vec![0u8; headroom + capacity + tailroom].into_boxed_slice())
                .collect(),
            destinations: None,
            capacity,
            filled: 0,
            lens: [0; BATCH],
            sources: [None; BATCH],
            names: std::array::from_fn(|_| SockAddrStorage::zeroed()),
            // SAFETY: all-zero iovec and mmsghdr are valid (null pointers, zero lengths); each
            // is filled in before the kernel sees it.
            iovecs: unsafe { std::mem::zeroed() },
            headers: unsafe { std::mem::zeroed() },
        }
    }

    /// Also read each datagram's original destination, from sockets that have
    /// `IP_RECVORIGDSTADDR` or `IPV6_RECVORIGDSTADDR` set: a socket that receives for many
    /// addresses (see `rampart_xdp::gathering`).
    pub(crate) fn with_destinations(mut self) -> Self {
        self.destinations = Some(Box::new(Destinations {
            controls: [[0; CONTROL_WORDS]; BATCH],
            addresses: [None; BATCH],
        }));
        self
    }

    /// Buffers not yet received into since the last [`RecvBatch::clear`].
    pub(crate) fn free(&self) -> usize {
        BATCH - self.filled
    }

    /// Make every buffer free again (what was queued from them has been sent).
    pub(crate) fn clear(&mut self) {
        self.filled = 0;
    }

    /// Receive as many datagrams from `fd` (non-blocking) as there are free buffers, at
    /// offset `headroom` of each; returns the range of buffer indices filled. No datagram is
    /// `WouldBlock`. Truncated datagrams (larger than the buffers) are counted in `truncated`
    /// and have no [`RecvBatch::datagram`].
    pub(crate) fn recv(
        &mut self,
        fd: RawFd,
        headroom: usize,
        truncated: &mut u64,
    ) -> io::Result<Range<usize>> {
        let first = self.filled;
        for i in first..BATCH {
            self.iovecs[i] = libc::iovec {
                iov_base: self.buffers[i][headroom..].as_mut_ptr().cast(),
                iov_len: self.capacity,
            };
            let namelen = self.names[i].size_of();
            self.headers[i] = one_datagram(
                (&raw mut self.names[i]).cast(),
                namelen,
                &mut self.iovecs[i],
            );
            if let Some(destinations) = &mut self.destinations {
                let control = &mut destinations.controls[i];
                self.headers[i].msg_hdr.msg_control = control.as_mut_ptr().cast();
                self.headers[i].msg_hdr.msg_controllen = size_of_val(control);
            }
        }
        // SAFETY: `headers[first..]` are valid mmsghdrs whose name and iovec pointers point
        // into buffers owned by `self`, which outlive the call.
        let received = unsafe {
            libc::recvmmsg(
                fd,
                self.headers[first..].as_mut_ptr(),
                (BATCH - first) as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let filled = first..first + received as usize;
        for i in filled.clone() {
            let header = &self.headers[i];
            let truncated_here = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            if truncated_here {
                *truncated += 1;
            }
            self.lens[i] = header.msg_len as usize;
            let name = std::mem::replace(&mut self.names[i], SockAddrStorage::zeroed());
            // SAFETY: the kernel wrote the datagram's source address there, of this length.
            let source = unsafe { SockAddr::new(name, header.msg_hdr.msg_namelen) }.as_socket();
            self.sources[i] = source.filter(|_| !truncated_here);
            if let Some(destinations) = &mut self.destinations {
                destinations.addresses[i] = original_destination(&header.msg_hdr);
            }
        }
        self.filled = filled.end;
        Ok(filled)
    }

    /// Datagram `i` of the last receive: its buffer, its length (at the headroom it was
    /// received at) and its source; None when it was truncated or from no IP address.
    pub(crate) fn datagram(&mut self, i: usize) -> Option<(&mut [u8], usize, SocketAddr)> {
        let source = self.sources[i]?;
        Some((&mut self.buffers[i], self.lens[i], source))
    }

    pub(crate) fn buffer(&self, i: usize) -> &[u8] {
        &self.buffers[i]
    }

    /// The original destination of datagram `i` (with [`RecvBatch::with_destinations`]).
    pub(crate) fn destination(&self, i: usize) -> Option<SocketAddr> {
        self.destinations.as_ref()?.addresses[i]
    }
}

struct Destinations {
    controls: [[u64; CONTROL_WORDS]; BATCH],
    addresses: [Option<SocketAddr>; BATCH],
}

/// The address in the `IP_ORIGDSTADDR` or `IPV6_ORIGDSTADDR` control message of a received
/// datagram, without flow information or scope (as relay addresses are kept).
fn original_destination(header: &libc::msghdr) -> Option<SocketAddr> {
    // SAFETY: `header` is as `recvmmsg` left it: its control pointer and the length the kernel
    // wrote describe one buffer of ours, and the CMSG_* macros stay within that length.
    unsafe {
        let mut message = libc::CMSG_FIRSTHDR(header);
        while !message.is_null() {
            let data = libc::CMSG_DATA(message);
            match ((*message).cmsg_level, (*message).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_ORIGDSTADDR) => {
                    let address = std::ptr::read_unaligned(data.cast::<libc::sockaddr_in>());
                    return Some(SocketAddr::from((
                        u32::from_be(address.sin_addr.s_addr).to_be_bytes(),
                        u16::from_be(address.sin_port),
                    )));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_ORIGDSTADDR) => {
                    let address = std::ptr::read_unaligned(data.cast::<libc::sockaddr_in6>());
                    return Some(SocketAddr::from((
                        address.sin6_addr.s6_addr,
                        u16::from_be(address.sin6_port),
                    )));
                }
                _ => message = libc::CMSG_NXTHDR(header, message),
            }
        }
    }
    None
}

/// The header of one datagram: its address at `name`, its bytes in the one buffer `iovec`
/// names, no control messages.
fn one_datagram(
    name: *mut libc::c_void,
    namelen: libc::socklen_t,
    iovec: &mut libc::iovec,
) -> libc::mmsghdr {
    // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
    let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
    header.msg_hdr.msg_name = name;
    header.msg_hdr.msg_namelen = namelen;
    header.msg_hdr.msg_iov = iovec;
    header.msg_hdr.msg_iovlen = 1;
    header
}

/// Set an `int` socket option (those socket2 does not name).
pub(crate) fn set_int_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid socket fd, an int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Datagrams queued for one socket, sent with as few `sendmmsg` calls as they need.
pub(crate) struct SendBatch {
    names: Vec<SockAddr>,
    iovecs: [libc::iovec; BATCH],
    headers: [libc::mmsghdr; BATCH],
}

impl SendBatch {
    pub(crate) fn new() -> Self {
        SendBatch {
            names: Vec::with_capacity(BATCH),
            // SAFETY: as in `RecvBatch::new`.
            iovecs: unsafe { std::mem::zeroed() },
            headers: unsafe { std::mem::zeroed() },
        }
    }

    /// Send `datagrams` (destination, bytes) from `fd`, [`BATCH`] per call. UDP is best
    /// effort: a datagram the kernel refuses (full socket buffer, unreachable destination)
    /// is dropped and counted in the result, and the rest still go.
    pub(crate) fn send<'a>(
        &mut self,
        fd: RawFd,
        datagrams: impl ExactSizeIterator<Item = (SocketAddr, &'a [u8])>,
    ) -> u64 {
        let mut failed = 0;
        let mut datagrams = datagrams.peekable();
        while datagrams.peek().is_some() {
            self.names.clear();
            let mut count = 0;
            for (to, bytes) in datagrams.by_ref().take(BATCH) {
                self.names.push(SockAddr::from(to));
                self.iovecs[count] = libc::iovec {
                    iov_base: bytes.as_ptr().cast_mut().cast(),
                    iov_len: bytes.len(),
                };
                count += 1;
            }
            for i in 0..count {
                self.headers[i] = one_datagram(
                    self.names[i].as_ptr().cast_mut().cast(),
                    self.names[i].len(),
                    &mut self.iovecs[i],
                );
            }
            let mut sent = 0;
            while sent < count {
                // SAFETY: headers[sent..count] are valid and point at names and payloads that
                // live until the call returns; the kernel only reads them.
                let rc = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.headers[sent..].as_mut_ptr(),
                        (count - sent) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if rc <= 0 {
                    // The first datagram of the rest failed: drop it, go on with the next.
                    failed += 1;
                    sent += 1;
                } else {
                    sent += rc as usize;
                }
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    #[test]
    fn a_batch_goes_out_in_one_call_and_comes_back_in_one_call() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver.set_nonblocking(true).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = receiver.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let mut out = SendBatch::new();
        let failed = out.send(
            sender.as_raw_fd(),
            payloads.iter().map(|p| (to, p.as_slice())),
        );
        assert_eq!(failed, 0);
        let mut batch = RecvBatch::new(8, 2048, 3);
        let mut truncated = 0;
        let mut seen = Vec::new();
        for _ in 0..100 {
            if batch.free() == 0 {
                batch.clear();
            }
            match batch.recv(receiver.as_raw_fd(), 8, &mut truncated) {
                Ok(filled) => {
                    for i in filled {
                        let (buffer, len, source) = batch.datagram(i).unwrap();
                        assert_eq!(source, sender.local_addr().unwrap());
                        seen.push(buffer[8..8 + len].to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if seen.len() == payloads.len() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(seen, payloads, "every datagram, in order, at the headroom");
        assert_eq!(truncated, 0);
    }

    #[test]
    fn original_destinations_are_read_from_the_control_messages() {
        for ip in ["127.0.0.1", "::1"] {
            let Ok(receiver) = UdpSocket::bind((ip, 0)) else {
                continue; // no IPv6 loopback on this host
            };
            receiver.set_nonblocking(true).unwrap();
            let (level, option) = if receiver.local_addr().unwrap().is_ipv6() {
                (libc::IPPROTO_IPV6, libc::IPV6_RECVORIGDSTADDR)
            } else {
                (libc::IPPROTO_IP, libc::IP_RECVORIGDSTADDR)
            };
            set_int_option(&receiver, level, option, 1).unwrap();
            let sender = UdpSocket::bind((ip, 0)).unwrap();
            let to = receiver.local_addr().unwrap();
            sender.send_to(b"first", to).unwrap();
            sender.send_to(b"second", to).unwrap();
            let mut batch = RecvBatch::new(0, 64, 0).with_destinations();
            let mut received = 0..0;
            for _ in 0..100 {
                match batch.recv(receiver.as_raw_fd(), 0, &mut 0) {
                    Ok(filled) => received.end = filled.end,
                    Err(_) if received.len() == 2 => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
            assert_eq!(received, 0..2);
            assert_eq!(batch.destination(0), Some(to));
            assert_eq!(batch.destination(1), Some(to));
        }
    }

    #[test]
    fn oversized_datagrams_are_counted_and_skipped() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver.set_nonblocking(true).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender
            .send_to(&[1; 100], receiver.local_addr().unwrap())
            .unwrap();
        sender
            .send_to(&[2; 10], receiver.local_addr().unwrap())
            .unwrap();
        let mut batch = RecvBatch::new(0, 64, 0);
        let mut truncated = 0;
        let mut received = 0..0;
        for _ in 0..100 {
            match batch.recv(receiver.as_raw_fd(), 0, &mut truncated) {
                Ok(filled) => received.end = filled.end,
                Err(_) if received.len() == 2 => break,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        assert_eq!(truncated, 1);
        assert!(
            batch.datagram(0).is_none(),
            "the oversized one has no datagram"
        );
        let (buffer, len, _) = batch.datagram(1).expect("the small one");
        assert_eq!(&buffer[..len], &[2; 10]);
    }
}
