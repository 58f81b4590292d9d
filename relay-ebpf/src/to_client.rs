//! Peer -> client: a UDP datagram from a peer to an allocation's relay address becomes
//! ChannelData from the TURN server's address to the client (RFC 8656 §12).
//!
//! ```text
//! in:  Eth | IP(peer -> relay)    | UDP(pport -> rport)           | data | trailer
//! out: Eth | IP(server -> client) | UDP(3478 -> cport) | chan len | data
//! ```
//! The head grows by `out IP + 4 - in IP` bytes into the headroom; no padding is added (not
//! needed over UDP), and an Ethernet trailer is cut.

use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext};
use relay_common::{
    PeerChannelValue, Stat,
    checksum::{self, Words},
};

use crate::{
    error::Error,
    family::Family,
    ipv4::Ipv4,
    ipv6::Ipv6,
    maps::{Direction, count_channel, police},
    packet::{CHANNEL_HEADER_LEN, ETH_LEN, UDP_LEN, next_hop_limit, settle, trim_to, write_at},
    rewrite::{Outgoing, Rewrite, checksum_fields, rewrite, write_headers},
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
        (true, true) => Ok(rewrite::<ToClient, In, Ipv4>(ctx.ctx, datagram, binding)),
        (false, false) => Ok(rewrite::<ToClient, In, Ipv6>(ctx.ctx, datagram, binding)),
        _ => Err(Error::BadBinding),
    }
}

/// This direction, for [`rewrite`].
pub struct ToClient;

impl Rewrite for ToClient {
    type Binding = PeerChannelValue;
    const FORWARDED: Stat = Stat::ForwardedToClient;

    #[inline(always)]
    fn police<In: Family>(
        _ctx: &XdpContext,
        datagram: &Datagram,
        binding: &PeerChannelValue,
    ) -> Result<(), Error> {
        police(
            &binding.limit,
            (binding.budget_id, binding.budget_generation),
            binding.counter_id,
            Direction::ToClient,
            datagram.udp_len as usize - UDP_LEN,
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
        let out = Outgoing {
            src: &binding.server,
            dst: &binding.client,
            udp_len: new_udp_len,
        };
        let header: Words<2> = [binding.channel.to_be(), (data_len as u16).to_be()];

        // The checksum first, while the old addresses are in the frame.
        let check = match checksum_fields::<In, Out>(ctx, datagram, &out)? {
            None => 0,
            Some((old, new)) => {
                checksum::udp_to_channel_data(datagram.udp_check, &old, &new, &header)
            }
        };
        // As in `to_peer`: settled before the helper calls.
        let check = settle(check);

        let egress = write_headers::<Out>(
            ctx,
            &binding.next_hop,
            datagram,
            &out,
            ttl,
            check,
            In::HEADER_LEN as i32 - (Out::HEADER_LEN + CHANNEL_HEADER_LEN) as i32,
        )?;
        write_at(ctx, ETH_LEN + Out::HEADER_LEN + UDP_LEN, header)?;
        trim_to(ctx, ETH_LEN + Out::HEADER_LEN + new_udp_len as usize)?;

        let action = egress.send()?;
        count_channel(binding.counter_id, Direction::ToClient, data_len, false);
        Ok(action)
    }
}
