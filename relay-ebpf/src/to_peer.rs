//! Client -> peer: a ChannelData datagram from a client to the TURN server's address becomes a
//! plain UDP datagram from the allocation's relay address to the peer (RFC 8656 §12).
//!
//! ```text
//! in:  Eth | IP(client -> server) | UDP(cport -> 3478) | chan len | data | pad(0-3) | trailer
//! out: Eth | IP(relay -> peer)    | UDP(rport -> pport)           | data
//! ```
//! The head moves by `in IP + 4 - out IP` bytes, the tail is cut after the data, and the data
//! never moves.

use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext};
use relay_common::{
    ClientChannelValue, Stat,
    checksum::{self, Words},
};

use crate::{
    error::Error,
    family::Family,
    ipv4::Ipv4,
    ipv6::Ipv6,
    maps::{Direction, count_channel, police, polices},
    packet::{
        CHANNEL_HEADER_LEN, ETH_LEN, UDP_LEN, load_4_before, next_hop_limit, read_at, settle,
        trim_to,
    },
    rewrite::{Outgoing, Rewrite, checksum_fields, rewrite, write_headers},
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
        (true, true) => Ok(rewrite::<ToPeer, In, Ipv4>(ctx.ctx, datagram, binding)),
        (false, false) => Ok(rewrite::<ToPeer, In, Ipv6>(ctx.ctx, datagram, binding)),
        _ => Err(Error::BadBinding),
    }
}

/// This direction, for [`rewrite`].
pub struct ToPeer;

impl Rewrite for ToPeer {
    type Binding = ClientChannelValue;
    const FORWARDED: Stat = Stat::ForwardedToPeer;

    /// On the length field as sent: a frame the rewrite then refuses goes to userspace, where
    /// it is charged again (see `maps::police`).
    #[inline(always)]
    fn police<In: Family>(
        ctx: &XdpContext,
        datagram: &Datagram,
        binding: &ClientChannelValue,
    ) -> Result<(), Error> {
        if !polices(&binding.limit) {
            return Ok(());
        }
        let header: Words<2> = read_at(ctx, ETH_LEN + UDP_LEN + In::HEADER_LEN, Error::Malformed)?;
        // No more than the datagram holds: a length field claiming more (which the rewrite
        // refuses) must not spend what the bytes sent did not.
        let carried = (datagram.udp_len as usize).saturating_sub(UDP_LEN + CHANNEL_HEADER_LEN);
        police(
            &binding.limit,
            (binding.budget_id, binding.budget_generation),
            binding.counter_id,
            Direction::ToPeer,
            (u16::from_be(header[1]) as usize).min(carried),
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
        let out = Outgoing {
            src: &binding.relay,
            dst: &binding.peer,
            udp_len: (UDP_LEN + data_len) as u16,
        };

        // The checksum first, while the old addresses are in the frame; only the result has to
        // survive the helper calls below.
        let check = match checksum_fields::<In, Out>(ctx, datagram, &out)? {
            None => 0,
            Some((old, new)) => {
                // The padding is the last `trailing` bytes of the datagram, whose sum must go
                // too.
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
                checksum::channel_data_to_udp(
                    datagram.udp_check,
                    &old,
                    &new,
                    &header,
                    data_len,
                    &pad,
                    trailing,
                )
            }
        };
        // Computed here, not next to its use: the words it sums must not stay live (spilled to
        // the stack) across the helper calls below.
        let check = settle(check);

        let egress = write_headers::<Out>(
            ctx,
            &binding.next_hop,
            datagram,
            &out,
            ttl,
            check,
            (In::HEADER_LEN + CHANNEL_HEADER_LEN) as i32 - Out::HEADER_LEN as i32,
        )?;
        trim_to(ctx, ETH_LEN + Out::HEADER_LEN + out.udp_len as usize)?;

        let action = egress.send()?;
        count_channel(binding.counter_id, Direction::ToPeer, data_len, false);
        Ok(action)
    }
}
