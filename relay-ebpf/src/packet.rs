//! Bounds-checked access to the frame, header layouts, and the frame-resizing helpers.
//!
//! Every packet access goes through [`ptr_at`], which checks the whole object against
//! `data_end` at a constant offset, the shape the verifier accepts. The one variable-offset
//! read (ChannelData padding at the end of a datagram) uses `bpf_xdp_load_bytes`, which checks
//! at run time. After `bpf_xdp_adjust_head`/`_tail` every earlier pointer is invalid; callers
//! re-derive them through [`ptr_at`].

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_load_bytes},
    programs::XdpContext,
};

use crate::error::Error;

pub const ETH_LEN: usize = 14;
pub const UDP_LEN: usize = 8;
/// ChannelData header: channel number and length (RFC 8656 §12.4).
pub const CHANNEL_HEADER_LEN: usize = 4;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_UDP: u8 = 17;

/// Ethernet II header.
///
/// The headers are aligned to 2: XDP frames start at an even address (256 bytes of headroom,
/// plus NET_IP_ALIGN of 0 or 2), and every header starts at an even offset, so the program
/// loads and stores whole 16-bit words instead of single bytes. (The verifier does not
/// require alignment on x86-64 anyway.)
#[repr(C, align(2))]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

#[repr(C, align(2))]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// A pointer to a `T` at `offset` bytes into the frame, if all of it lies before `data_end`.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads a `T` (a header) at `offset`; `err` if the frame is too short.
#[inline(always)]
pub fn read_at<T: Copy>(ctx: &XdpContext, offset: usize, err: Error) -> Result<T, Error> {
    let ptr = ptr_at::<T>(ctx, offset).ok_or(err)?;
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the frame; the headers need at
    // most 2-byte alignment, which frames give (see `EthHdr`).
    Ok(unsafe { *ptr })
}

/// A reference to a `T` (a header) at `offset`, in place; `err` if the frame is too short.
/// Only valid until the frame is changed (`adjust_head`/`adjust_tail`, writes).
#[inline(always)]
pub fn ref_at<T>(ctx: &XdpContext, offset: usize, err: Error) -> Result<&T, Error> {
    let ptr = ptr_at::<T>(ctx, offset).ok_or(err)?;
    // SAFETY: as in `read_at`; the callers drop the reference before changing the frame.
    Ok(unsafe { &*ptr })
}

/// Writes `value` at `offset`. Only called after the rewrite began, so a short frame is
/// [`Error::AfterRewrite`] (it cannot happen: the caller sized the frame for it).
#[inline(always)]
pub fn write_at<T>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), Error> {
    let ptr = ptr_at::<T>(ctx, offset).ok_or(Error::AfterRewrite)?;
    // SAFETY: as in `read_at`.
    unsafe { *ptr = value };
    Ok(())
}

/// Frame length, Ethernet header included.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// Moves the start of the frame by `delta` bytes (positive: drops bytes at the front,
/// negative: grows into the headroom). Fails without changing the frame.
#[inline(always)]
pub fn adjust_head(ctx: &XdpContext, delta: i32) -> Result<(), Error> {
    // SAFETY: the helper checks `delta` against the frame and its headroom.
    let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::AdjustFailed)
    }
}

/// Cuts the frame to `len` bytes if it is longer: ChannelData padding, Ethernet trailer.
#[inline(always)]
pub fn trim_to(ctx: &XdpContext, len: usize) -> Result<(), Error> {
    let have = frame_len(ctx);
    if have <= len {
        return Ok(());
    }
    // At most the 3 padding bytes plus an Ethernet trailer: a few dozen bytes.
    let excess = (have - len) as i32;
    // SAFETY: the helper checks the new end against the frame.
    let rc = unsafe { bpf_xdp_adjust_tail(ctx.ctx, -excess) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::AfterRewrite)
    }
}

/// The 4 bytes that end at `end` (an offset into the frame), read with `bpf_xdp_load_bytes`
/// because `end` is not a constant.
#[inline(always)]
pub fn load_4_before(ctx: &XdpContext, end: usize) -> Result<[u8; 4], Error> {
    let mut buf = [0u8; 4];
    if end < 4 {
        return Err(Error::Malformed);
    }
    // SAFETY: the helper copies at most 4 bytes into `buf` and checks the offset at run time.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            (end - 4) as u32,
            buf.as_mut_ptr().cast(),
            buf.len() as u32,
        )
    };
    if rc == 0 {
        Ok(buf)
    } else {
        Err(Error::Malformed)
    }
}

#[inline(always)]
pub const fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}

/// RFC 8656 (UDP-to-UDP relay, "Time to Live"): preferred behaviour is one less than the
/// incoming value, and a datagram arriving with nothing left is not relayed. Userspace gets
/// those (and uses the alternate behaviour, the default TTL).
#[inline(always)]
pub const fn next_hop_limit(incoming: u8) -> Result<u8, Error> {
    if incoming <= 1 {
        Err(Error::Ttl)
    } else {
        Ok(incoming - 1)
    }
}

/// Returns `value`, computed at this point of the program: it goes through a volatile stack
/// slot, which the compiler may not move across the helper calls that follow. Otherwise LLVM
/// sinks a computation to its use and keeps all its inputs live (spilled) across the calls.
#[inline(always)]
pub fn settle<T: Copy>(value: T) -> T {
    let mut slot = MaybeUninit::<T>::uninit();
    // SAFETY: the slot is written before it is read, both through valid pointers.
    unsafe {
        core::ptr::write_volatile(slot.as_mut_ptr(), value);
        core::ptr::read_volatile(slot.as_ptr())
    }
}
