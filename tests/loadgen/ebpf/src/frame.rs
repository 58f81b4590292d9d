//! The frames: an injected one written in full, a received one's stamp found and read.
//!
//! Only IPv4 without options: the load test's topology is IPv4. Every access is checked
//! against `data_end` at a constant offset, the shape the verifier accepts.

use core::mem::size_of;

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext};
use loadgen_common::{
    InjectConfig, InjectFlow, MAGIC, STAMP_DIRECTION, STAMP_FLOW, STAMP_LEN, STAMP_SENT_NS,
    STAMP_SEQ, STAMP_STEP, TO_PEER,
};
use relay_common::checksum::Sum;

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const UDP_LEN: usize = 8;
const CHANNEL_HEADER_LEN: usize = 4;
/// Where the payload starts: after Ethernet, IPv4 and UDP.
const PAYLOAD: usize = ETH_LEN + IPV4_LEN + UDP_LEN;
const ETH_P_IPV4: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
/// Don't Fragment, as a relay's sockets send.
const DF: u16 = 0x4000;
const TTL: u8 = 64;

/// What a stamp says (host byte order).
pub struct Stamp {
    pub step: u32,
    pub flow: u32,
    pub direction: u8,
    pub seq: u64,
    pub sent_ns: u64,
}

pub struct TooShort;

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, TooShort> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return Err(TooShort);
    }
    Ok((start + offset) as *mut T)
}

/// Writes `value` (host order) big-endian at `offset`; unaligned is fine on the targets XDP
/// runs on, and the verifier allows it for packet data.
#[inline(always)]
fn put<T: BigEndian>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), TooShort> {
    let ptr = ptr_at::<T>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the whole value lies inside the frame.
    unsafe { ptr.write_unaligned(value.to_be()) };
    Ok(())
}

#[inline(always)]
fn get<T: BigEndian>(ctx: &XdpContext, offset: usize) -> Result<T, TooShort> {
    let ptr = ptr_at::<T>(ctx, offset)?;
    // SAFETY: as in `put`.
    Ok(T::from_be(unsafe { ptr.read_unaligned() }))
}

trait BigEndian: Copy {
    fn to_be(self) -> Self;
    fn from_be(value: Self) -> Self;
}

macro_rules! big_endian {
    ($($t:ty),*) => {$(
        impl BigEndian for $t {
            #[inline(always)]
            fn to_be(self) -> Self {
                <$t>::to_be(self)
            }
            #[inline(always)]
            fn from_be(value: Self) -> Self {
                <$t>::from_be(value)
            }
        }
    )*};
}
big_endian!(u8, u16, u32, u64);

#[inline(always)]
fn put_mac(ctx: &XdpContext, offset: usize, mac: &[u8; 6]) -> Result<(), TooShort> {
    let ptr = ptr_at::<[u8; 6]>(ctx, offset)?;
    // SAFETY: as in `put`.
    unsafe { *ptr = *mac };
    Ok(())
}

/// Writes the whole frame up to the end of the stamp, both checksums included; a plain UDP
/// frame is cut 4 bytes short of the (ChannelData-sized) template.
#[inline(always)]
pub fn write_frame(
    ctx: &XdpContext,
    config: &InjectConfig,
    flow: &InjectFlow,
    stamp: &Stamp,
) -> Result<(), TooShort> {
    if stamp.direction == TO_PEER {
        write::<true>(ctx, config, flow, stamp)
    } else {
        // SAFETY: the helper checks the new end against the frame.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(CHANNEL_HEADER_LEN as i32)) } != 0 {
            return Err(TooShort);
        }
        write::<false>(ctx, config, flow, stamp)?;
        // The template's payload is zero; here its first 4 bytes after the stamp are where
        // a ChannelData frame's stamp ends, so a page last used for one holds bytes of it.
        // (A payload of just the stamp has nothing there.)
        let _ = put(ctx, PAYLOAD + STAMP_LEN, 0u32);
        Ok(())
    }
}

#[inline(always)]
fn write<const CHANNEL_DATA: bool>(
    ctx: &XdpContext,
    config: &InjectConfig,
    flow: &InjectFlow,
    stamp: &Stamp,
) -> Result<(), TooShort> {
    let stamp_at = if CHANNEL_DATA {
        PAYLOAD + CHANNEL_HEADER_LEN
    } else {
        PAYLOAD
    };
    // The whole frame up to the stamp's end must be there (the template's length).
    ptr_at::<[u8; STAMP_LEN]>(ctx, stamp_at)?;
    let payload_len = (config.payload_len & 0xffff) as u16;
    let udp_len = UDP_LEN as u16
        + payload_len
        + if CHANNEL_DATA {
            CHANNEL_HEADER_LEN as u16
        } else {
            0
        };
    let total_len = IPV4_LEN as u16 + udp_len;
    let src = u32::from_be_bytes(flow.src_ip);
    let dst = u32::from_be_bytes(flow.dst_ip);

    put_mac(ctx, 0, &flow.dst_mac)?;
    put_mac(ctx, 6, &flow.src_mac)?;
    put(ctx, 12, ETH_P_IPV4)?;

    let ip = ETH_LEN;
    let ttl_protocol = u16::from_be_bytes([TTL, IPPROTO_UDP]);
    let ip_check = add_u32(add_u32(Sum::ZERO, src), dst)
        .add_u16(0x4500)
        .add_u16(total_len)
        .add_u16(DF)
        .add_u16(ttl_protocol)
        .checksum();
    put(ctx, ip, 0x4500u16)?;
    put(ctx, ip + 2, total_len)?;
    put(ctx, ip + 4, 0u16)?;
    put(ctx, ip + 6, DF)?;
    put(ctx, ip + 8, ttl_protocol)?;
    put(ctx, ip + 10, ip_check)?;
    put(ctx, ip + 12, src)?;
    put(ctx, ip + 16, dst)?;

    // Pseudo-header (RFC 768): addresses, protocol, length.
    let mut sum = add_u32(add_u32(Sum::ZERO, src), dst)
        .add_u16(u16::from(IPPROTO_UDP))
        .add_u16(udp_len)
        // The UDP header.
        .add_u16(flow.src_port)
        .add_u16(flow.dst_port)
        .add_u16(udp_len);
    if CHANNEL_DATA {
        sum = sum.add_u16(flow.channel).add_u16(payload_len);
    }
    // The stamp; the payload after it is zero (2^16 = 1 in ones' complement, so a wider
    // sum goes in as its two halves).
    sum = add_u32(sum, MAGIC);
    sum = add_u32(sum, stamp.step);
    sum = add_u32(sum, stamp.flow);
    sum = sum.add_u16(u16::from(stamp.direction) << 8);
    sum = add_u32(add_u32(sum, (stamp.seq >> 32) as u32), stamp.seq as u32);
    sum = add_u32(
        add_u32(sum, (stamp.sent_ns >> 32) as u32),
        stamp.sent_ns as u32,
    );

    let udp = ETH_LEN + IPV4_LEN;
    put(ctx, udp, flow.src_port)?;
    put(ctx, udp + 2, flow.dst_port)?;
    put(ctx, udp + 4, udp_len)?;
    put(ctx, udp + 6, sum.udp_checksum())?;
    if CHANNEL_DATA {
        put(ctx, PAYLOAD, flow.channel)?;
        put(ctx, PAYLOAD + 2, payload_len)?;
    }
    put(ctx, stamp_at, MAGIC)?;
    put(ctx, stamp_at + STAMP_STEP, stamp.step)?;
    put(ctx, stamp_at + STAMP_FLOW, stamp.flow)?;
    put(
        ctx,
        stamp_at + STAMP_DIRECTION,
        u32::from(stamp.direction) << 24,
    )?;
    put(ctx, stamp_at + STAMP_SEQ, stamp.seq)?;
    put(ctx, stamp_at + STAMP_SENT_NS, stamp.sent_ns)
}

#[inline(always)]
fn add_u32(sum: Sum, value: u32) -> Sum {
    sum.add_u16((value >> 16) as u16).add_u16(value as u16)
}

/// The stamp of an IPv4 UDP frame carrying one, as plain UDP payload or as ChannelData data.
#[inline(always)]
pub fn find_stamp(ctx: &XdpContext) -> Option<Stamp> {
    if get::<u16>(ctx, 12).ok()? != ETH_P_IPV4 {
        return None;
    }
    let version_ihl: u8 = get(ctx, ETH_LEN).ok()?;
    let protocol: u8 = get(ctx, ETH_LEN + 9).ok()?;
    if version_ihl != 0x45 || protocol != IPPROTO_UDP {
        return None;
    }
    let at = if get::<u32>(ctx, PAYLOAD).ok()? == MAGIC {
        PAYLOAD
    } else if get::<u32>(ctx, PAYLOAD + CHANNEL_HEADER_LEN).ok()? == MAGIC {
        PAYLOAD + CHANNEL_HEADER_LEN
    } else {
        return None;
    };
    read_stamp(ctx, at).ok()
}

#[inline(always)]
fn read_stamp(ctx: &XdpContext, at: usize) -> Result<Stamp, TooShort> {
    Ok(Stamp {
        step: get(ctx, at + STAMP_STEP)?,
        flow: get(ctx, at + STAMP_FLOW)?,
        direction: get(ctx, at + STAMP_DIRECTION)?,
        seq: get(ctx, at + STAMP_SEQ)?,
        sent_ns: get(ctx, at + STAMP_SENT_NS)?,
    })
}

#[inline(always)]
pub fn swap_macs(ctx: &XdpContext) -> Result<(), TooShort> {
    let eth = ptr_at::<[[u8; 6]; 2]>(ctx, 0)?;
    // SAFETY: `ptr_at` checked that both addresses lie inside the frame.
    unsafe { (*eth).swap(0, 1) };
    Ok(())
}
