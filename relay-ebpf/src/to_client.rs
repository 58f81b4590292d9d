//! Peer -> client: a UDP datagram from a peer to an allocation's relay address becomes
//! ChannelData from the TURN server's address to the client (RFC 8656 §12).
//!
//! ```text
//! in:  Eth | IP(peer -> relay)    | UDP(pport -> rport)           | data | trailer
//! out: Eth | IP(server -> client) | UDP(3478 -> cport) | chan len | data
//! ```
//! The head grows by `out IP + 4 - in IP` bytes into the headroom; no padding is added (not
//! needed over UDP), and an Ethernet trailer is cut.

use aya_ebpf::{
    bindings::xdp_md, helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext,
};
use relay_common::{
    PeerChannelValue, Stat,
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
        CHANNEL_HEADER_LEN, ETH_LEN, EthHdr, UDP_LEN, UdpHdr, adjust_head, next_hop_limit, settle,
        trim_to, write_at,
    },
    udp::Datagram,
};

/// Forwards a peer's datagram that matched a peer binding, choosing the output family from it.
/// `Ok` is the XDP action of a frame already counted; `Err` is for the caller to count.
#[inline(always)]
pub fn forward<In: Family>(
    ctx: &XdpContext,
    datagram: &Datagram,
    binding: &PeerChannelValue,
) -> Result<u32, Error> {
    // The coarse clock (CLOCK_MONOTONIC as of the last tick, a few ms behind at most) costs a
    // fraction of a clocksource read per packet; expiries are minutes apart.
    // SAFETY: no preconditions.
    if binding.expires_ns <= unsafe { bpf_ktime_get_coarse_ns() } {
        return Err(Error::Expired);
    }
    match (binding.server.is_ipv4(), binding.client.is_ipv4()) {
        (true, true) => Ok(rewrite::<In, Ipv4>(ctx.ctx, datagram, binding)),
        (false, false) => Ok(rewrite::<In, Ipv6>(ctx.ctx, datagram, binding)),
        _ => Err(Error::BadBinding),
    }
}

/// One direction x family pair as a BPF function of its own (see `to_peer::rewrite`).
#[inline(never)]
fn rewrite<In: Family, Out: Family>(
    ctx: *mut xdp_md,
    datagram: &Datagram,
    binding: &PeerChannelValue,
) -> u32 {
    let ctx = XdpContext::new(ctx);
    finish(
        try_rewrite::<In, Out>(&ctx, datagram, binding),
        Stat::ForwardedToClient,
        datagram.frame_len,
    )
}

#[inline(always)]
fn try_rewrite<In: Family, Out: Family>(
    ctx: &XdpContext,
    datagram: &Datagram,
    binding: &PeerChannelValue,
) -> Result<u32, Error> {
    let udp_len = datagram.udp_len;
    let data_len = udp_len as usize - UDP_LEN;
    let new_udp_len = udp_len as usize + CHANNEL_HEADER_LEN;
    if Out::HEADER_LEN + new_udp_len > u16::MAX as usize {
        // Cannot be expressed in the IP length field: userspace reports it.
        return Err(Error::FragNeeded);
    }
    let new_udp_len = new_udp_len as u16;
    let ttl = next_hop_limit(datagram.ttl)?;
    let old_check = datagram.udp_check;
    if old_check == 0 {
        if !In::IPV4 {
            return Err(Error::Malformed);
        }
        if !Out::IPV4 {
            return Err(Error::ChecksumZeroV6);
        }
    }

    let (server, client) = (&binding.server, &binding.client);
    let header: Words<2> = [binding.channel.to_be(), (data_len as u16).to_be()];

    // The checksum first, while the old addresses are in the frame.
    let check = if old_check == 0 {
        0
    } else {
        let (old_src, old_dst) = In::pseudo_addrs(ctx)?;
        if checksum::is_offload_partial(old_check, old_src, old_dst, udp_len) {
            return Err(Error::ChecksumPartial);
        }
        checksum::udp_to_channel_data(
            old_check,
            &UdpFields {
                src_ip: old_src,
                dst_ip: old_dst,
                src_port: datagram.src_port,
                dst_port: datagram.dst_port,
                udp_len,
            },
            &UdpFields {
                src_ip: pseudo::<Out>(endpoint_words(server)),
                dst_ip: pseudo::<Out>(endpoint_words(client)),
                src_port: server.port,
                dst_port: client.port,
                udp_len: new_udp_len,
            },
            &header,
        )
    };

    // Computed here, not next to its use: the words it sums must not stay live (spilled to
    // the stack) across the helper calls below.
    let check = settle(check);

    let egress = egress::lookup::<Out>(
        ctx,
        &binding.next_hop,
        &Route {
            src: endpoint_dwords(server),
            dst: endpoint_dwords(client),
            src_port: server.port,
            dst_port: client.port,
            tos: datagram.tos,
            ip_len: Out::HEADER_LEN as u16 + new_udp_len,
        },
    )?;

    // Nothing was written so far; from here on a failure drops the frame.
    adjust_head(
        ctx,
        In::HEADER_LEN as i32 - (Out::HEADER_LEN + CHANNEL_HEADER_LEN) as i32,
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
            src: endpoint_words(server),
            dst: endpoint_words(client),
            tos: datagram.tos,
            ttl,
            payload_len: new_udp_len,
        },
    )?;
    write_at(
        ctx,
        ETH_LEN + Out::HEADER_LEN,
        UdpHdr {
            src_port: server.port.to_be_bytes(),
            dst_port: client.port.to_be_bytes(),
            len: new_udp_len.to_be_bytes(),
            check: check.to_be_bytes(),
        },
    )?;
    write_at(
        ctx,
        ETH_LEN + Out::HEADER_LEN + UDP_LEN,
        [binding.channel.to_be(), (data_len as u16).to_be()],
    )?;
    trim_to(ctx, ETH_LEN + Out::HEADER_LEN + new_udp_len as usize)?;

    let action = egress.send()?;
    count_channel(binding.counter_id, Direction::ToClient, data_len);
    Ok(action)
}
