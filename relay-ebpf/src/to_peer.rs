//! Client -> peer: a ChannelData datagram from a client to the TURN server's address becomes a
//! plain UDP datagram from the allocation's relay address to the peer (RFC 8656 §12).
//!
//! ```text
//! in:  Eth | IP(client -> server) | UDP(cport -> 3478) | chan len | data | pad(0-3) | trailer
//! out: Eth | IP(relay -> peer)    | UDP(rport -> pport)           | data
//! ```
//! The head moves by `in IP + 4 - out IP` bytes, the tail is cut after the data, and the data
//! never moves.

use aya_ebpf::{
    bindings::xdp_md, helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext,
};
use relay_common::{
    ClientChannelValue, Stat,
    checksum::{self, UdpFields, Words},
};

use crate::{
    egress::{self, Route},
    error::{Error, finish},
    family::{Family, IpOut, endpoint_dwords, endpoint_words, pseudo},
    ipv4::Ipv4,
    ipv6::Ipv6,
    maps::{Direction, count_channel},
    packet::{
        CHANNEL_HEADER_LEN, ETH_LEN, EthHdr, UDP_LEN, UdpHdr, adjust_head, load_4_before,
        next_hop_limit, read_at, settle, trim_to, write_at,
    },
    udp::Datagram,
};

/// Forwards ChannelData that matched a client binding, choosing the output family from it.
/// `Ok` is the XDP action of a frame already counted; `Err` is for the caller to count.
#[inline(always)]
pub fn forward<In: Family>(
    ctx: &XdpContext,
    datagram: &Datagram,
    binding: &ClientChannelValue,
) -> Result<u32, Error> {
    // The coarse clock (CLOCK_MONOTONIC as of the last tick, a few ms behind at most) costs a
    // fraction of a clocksource read per packet; expiries are minutes apart.
    // SAFETY: no preconditions.
    if binding.expires_ns <= unsafe { bpf_ktime_get_coarse_ns() } {
        return Err(Error::Expired);
    }
    match (binding.relay.is_ipv4(), binding.peer.is_ipv4()) {
        (true, true) => Ok(rewrite::<In, Ipv4>(ctx.ctx, datagram, binding)),
        (false, false) => Ok(rewrite::<In, Ipv6>(ctx.ctx, datagram, binding)),
        _ => Err(Error::BadBinding),
    }
}

/// One direction x family pair as a BPF function of its own, so that each combination has its
/// own stack frame (one function holding all eight would exceed the 512-byte BPF stack).
#[inline(never)]
fn rewrite<In: Family, Out: Family>(
    ctx: *mut xdp_md,
    datagram: &Datagram,
    binding: &ClientChannelValue,
) -> u32 {
    let ctx = XdpContext::new(ctx);
    finish(
        try_rewrite::<In, Out>(&ctx, datagram, binding),
        Stat::ForwardedToPeer,
        datagram.frame_len,
    )
}

#[inline(always)]
fn try_rewrite<In: Family, Out: Family>(
    ctx: &XdpContext,
    datagram: &Datagram,
    binding: &ClientChannelValue,
) -> Result<u32, Error> {
    let udp_len = datagram.udp_len;
    let header: Words<2> = read_at(ctx, ETH_LEN + In::HEADER_LEN + UDP_LEN, Error::Malformed)?;
    // RFC 8656 §12: the length field counts the data only; over UDP up to 3 padding bytes may
    // follow. A longer field or more trailing bytes is userspace's to reject.
    let payload_len = udp_len as usize - UDP_LEN;
    let data_len = u16::from_be(header[1]) as usize;
    if CHANNEL_HEADER_LEN + data_len > payload_len {
        return Err(Error::ChannelLength);
    }
    let trailing = payload_len - CHANNEL_HEADER_LEN - data_len;
    if trailing > 3 {
        return Err(Error::ChannelLength);
    }
    let ttl = next_hop_limit(datagram.ttl)?;
    let old_check = datagram.udp_check;
    if old_check == 0 {
        if !In::IPV4 {
            // IPv6 requires a UDP checksum (RFC 8200 §8.1); the stack drops this.
            return Err(Error::Malformed);
        }
        if !Out::IPV4 {
            return Err(Error::ChecksumZeroV6);
        }
    }

    let (relay, peer) = (&binding.relay, &binding.peer);
    let new_udp_len = (UDP_LEN + data_len) as u16;

    // The checksum first, while the old addresses are in the frame; only the result has to
    // survive the helper calls below.
    let check = if old_check == 0 {
        // IPv4 to IPv4 without a checksum: keep none.
        0
    } else {
        // The padding is the last `trailing` bytes of the datagram, whose sum must go too.
        let mut pad = [0u8; 3];
        if trailing > 0 {
            let udp_end = ETH_LEN + In::HEADER_LEN + udp_len as usize;
            let last = load_4_before(ctx, udp_end)?;
            pad = match trailing {
                1 => [last[3], 0, 0],
                2 => [last[2], last[3], 0],
                _ => [last[1], last[2], last[3]],
            };
        }
        let (old_src, old_dst) = In::pseudo_addrs(ctx)?;
        if checksum::is_offload_partial(old_check, old_src, old_dst, udp_len) {
            return Err(Error::ChecksumPartial);
        }
        checksum::channel_data_to_udp(
            old_check,
            &UdpFields {
                src_ip: old_src,
                dst_ip: old_dst,
                src_port: datagram.src_port,
                dst_port: datagram.dst_port,
                udp_len,
            },
            &UdpFields {
                src_ip: pseudo::<Out>(endpoint_words(relay)),
                dst_ip: pseudo::<Out>(endpoint_words(peer)),
                src_port: relay.port,
                dst_port: peer.port,
                udp_len: new_udp_len,
            },
            &header,
            data_len,
            &pad,
            trailing,
        )
    };

    // Computed here, not next to its use: the words it sums must not stay live (spilled to
    // the stack) across the helper calls below.
    let check = settle(check);

    let egress = egress::lookup::<Out>(
        ctx,
        &binding.next_hop,
        &Route {
            src: endpoint_dwords(relay),
            dst: endpoint_dwords(peer),
            src_port: relay.port,
            dst_port: peer.port,
            tos: datagram.tos,
            ip_len: Out::HEADER_LEN as u16 + new_udp_len,
        },
    )?;

    // Nothing was written so far; from here on a failure drops the frame.
    adjust_head(
        ctx,
        (In::HEADER_LEN + CHANNEL_HEADER_LEN) as i32 - Out::HEADER_LEN as i32,
    )?;
    write_at(
        ctx,
        0,
        EthHdr {
            dst: egress.dst_mac,
            src: egress.src_mac,
            ether_type: Out::ETHER_TYPE.to_be_bytes(),
        },
    )?;
    Out::write(
        ctx,
        &IpOut {
            src: endpoint_words(relay),
            dst: endpoint_words(peer),
            tos: datagram.tos,
            ttl,
            payload_len: new_udp_len,
        },
    )?;
    write_at(
        ctx,
        ETH_LEN + Out::HEADER_LEN,
        UdpHdr {
            src_port: relay.port.to_be_bytes(),
            dst_port: peer.port.to_be_bytes(),
            len: new_udp_len.to_be_bytes(),
            check: check.to_be_bytes(),
        },
    )?;
    trim_to(ctx, ETH_LEN + Out::HEADER_LEN + new_udp_len as usize)?;

    let action = egress.send()?;
    count_channel(binding.counter_id, Direction::ToPeer, data_len);
    Ok(action)
}
