//! Internet checksum arithmetic (RFC 1071) for the XDP program's packet rewrites.
//!
//! The IPv4 header checksum is recomputed from the 20 header bytes ([`ipv4_header`]): the
//! program writes a fresh header anyway and 10 additions are cheap. The UDP checksum covers the
//! whole datagram, so it is updated *incrementally* (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`):
//! start from the complement of the old checksum, subtract every 16-bit word that leaves the
//! checksummed data, add every word that enters it. [`channel_data_to_udp`] and
//! [`udp_to_channel_data`] are the two rewrites the relay does; the tests compare them with a
//! full recomputation over many random datagrams.
//!
//! Ones'-complement arithmetic is done modulo 0xFFFF: subtracting `w` is adding `!w`, and a sum
//! is folded (end-around carry) only at the end. A folded sum of 0 and of 0xFFFF are the same
//! number (+0 and -0); for UDP both come out as the transmitted checksum 0xFFFF, because a
//! computed 0 is sent as 0xFFFF (RFC 768; 0 means "no checksum", which only IPv4 allows).
//!
//! Addresses and headers are taken as [`Words`]: their bytes read as `u16`s in memory order,
//! which is what one 16-bit load from the packet or a map gives. The XDP program thus loads
//! whole words instead of single bytes. Numbers (ports, lengths, checksums) are plain `u16`
//! values. Everything here is `const`-friendly integer code with bounded loops over fixed-size
//! arrays, so the program can call it (inlined) and the verifier sees straight-line code.

/// `N` 16-bit words in memory order: bytes `2i, 2i+1` of the original are
/// `words[i].to_ne_bytes()`. [`words`] and [`bytes`] convert.
pub type Words<const N: usize> = [u16; N];

/// An IP address as [`Words`]: 16 bytes, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`, so
/// the IPv4 address is words 6 and 7).
pub type AddrWords = Words<8>;

/// `bytes` as [`Words`]; `N` must be `2 * M`.
#[inline(always)]
pub const fn words<const N: usize, const M: usize>(bytes: &[u8; N]) -> Words<M> {
    const { assert!(N == 2 * M, "two bytes per word") };
    let mut out = [0u16; M];
    let mut i = 0;
    while i < M {
        out[i] = u16::from_ne_bytes([bytes[2 * i], bytes[2 * i + 1]]);
        i += 1;
    }
    out
}

/// The bytes of `words`; `N` must be `2 * M`.
#[inline(always)]
pub const fn bytes<const M: usize, const N: usize>(words: &Words<M>) -> [u8; N] {
    const { assert!(N == 2 * M, "two bytes per word") };
    let mut out = [0u8; N];
    let mut i = 0;
    while i < M {
        let [a, b] = words[i].to_ne_bytes();
        out[2 * i] = a;
        out[2 * i + 1] = b;
        i += 1;
    }
    out
}

/// An unfolded ones'-complement sum of 16-bit words (as big-endian numbers).
///
/// 64 bits leave room for 2^48 words before the accumulator could overflow; a datagram has at
/// most 2^15.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sum(u64);

impl Sum {
    pub const ZERO: Sum = Sum(0);

    /// The sum an existing checksum field stands for (its complement), to update it.
    #[inline(always)]
    pub const fn of_checksum(check: u16) -> Self {
        Sum(!check as u64)
    }

    /// Adds a 16-bit number (a port, a length, a header word read big-endian).
    #[inline(always)]
    pub const fn add_u16(self, value: u16) -> Self {
        Sum(self.0 + value as u64)
    }

    /// Ones'-complement subtraction: adding the complement.
    #[inline(always)]
    pub const fn sub_u16(self, value: u16) -> Self {
        Sum(self.0 + (!value) as u64)
    }

    /// Adds `words` (memory order).
    #[inline(always)]
    pub const fn add_words(self, words: &[u16]) -> Self {
        let mut sum = self;
        let mut i = 0;
        while i < words.len() {
            sum = sum.add_u16(u16::from_be(words[i]));
            i += 1;
        }
        sum
    }

    /// Subtracts `words` (memory order).
    #[inline(always)]
    pub const fn sub_words(self, words: &[u16]) -> Self {
        let mut sum = self;
        let mut i = 0;
        while i < words.len() {
            sum = sum.sub_u16(u16::from_be(words[i]));
            i += 1;
        }
        sum
    }

    /// The word a single byte contributes at `offset` from an even-aligned origin: the high
    /// half at an even offset, the low half at an odd one (RFC 1071 pads an odd tail with 0).
    #[inline(always)]
    const fn byte_word(byte: u8, offset: usize) -> u16 {
        if offset & 1 == 0 {
            (byte as u16) << 8
        } else {
            byte as u16
        }
    }

    #[inline(always)]
    pub const fn add_byte_at(self, byte: u8, offset: usize) -> Self {
        self.add_u16(Self::byte_word(byte, offset))
    }

    #[inline(always)]
    pub const fn sub_byte_at(self, byte: u8, offset: usize) -> Self {
        self.sub_u16(Self::byte_word(byte, offset))
    }

    /// Adds what the UDP checksum covers of `fields`: the pseudo-header's addresses and length
    /// (RFC 768; RFC 8200 §8.1) and the UDP header's ports and length. The protocol number
    /// (17, the same word in both pseudo-headers) is left out: it never changes.
    #[inline(always)]
    pub const fn add_udp_fields(self, fields: &UdpFields<'_>) -> Self {
        self.add_words(fields.src_ip)
            .add_words(fields.dst_ip)
            .add_u16(fields.udp_len)
            .add_u16(fields.src_port)
            .add_u16(fields.dst_port)
            .add_u16(fields.udp_len)
    }

    /// Subtracts what [`Sum::add_udp_fields`] adds.
    #[inline(always)]
    pub const fn sub_udp_fields(self, fields: &UdpFields<'_>) -> Self {
        self.sub_words(fields.src_ip)
            .sub_words(fields.dst_ip)
            .sub_u16(fields.udp_len)
            .sub_u16(fields.src_port)
            .sub_u16(fields.dst_port)
            .sub_u16(fields.udp_len)
    }

    /// The sum folded to 16 bits (end-around carry). Four folds bring any u64 below 2^16.
    #[inline(always)]
    pub const fn fold(self) -> u16 {
        let mut s = self.0;
        s = (s & 0xffff_ffff) + (s >> 32);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s as u16
    }

    /// The checksum field for this sum (IPv4 header, ICMP...).
    #[inline(always)]
    pub const fn checksum(self) -> u16 {
        !self.fold()
    }

    /// The UDP checksum field for this sum: a computed 0 is sent as 0xFFFF (RFC 768), since 0
    /// means "no checksum".
    #[inline(always)]
    pub const fn udp_checksum(self) -> u16 {
        match !self.fold() {
            0 => 0xffff,
            check => check,
        }
    }
}

/// The parts of a UDP datagram's checksum that a relay rewrite changes.
#[derive(Clone, Copy, Debug)]
pub struct UdpFields<'a> {
    /// Source address as the pseudo-header carries it, in [`Words`]: 2 for IPv4, 8 for IPv6.
    pub src_ip: &'a [u16],
    /// Destination address, as `src_ip` (the same family).
    pub dst_ip: &'a [u16],
    pub src_port: u16,
    pub dst_port: u16,
    /// UDP length: header + payload.
    pub udp_len: u16,
}

/// The UDP checksum after a client's ChannelData datagram (`old`, checksum `old_check`,
/// payload = 4-byte `channel_header` + `data_len` bytes of data + `trailing_len` (<= 3) padding
/// bytes `trailing`) is turned into a plain datagram carrying just the data (`new`).
///
/// The data keeps its position relative to even word boundaries (the header is 4 bytes), so
/// only the fields, the header and the padding bytes are taken out. The caller handles an old
/// checksum of 0 (no checksum) before calling this.
#[inline(always)]
pub const fn channel_data_to_udp(
    old_check: u16,
    old: &UdpFields<'_>,
    new: &UdpFields<'_>,
    channel_header: &Words<2>,
    data_len: usize,
    trailing: &[u8; 3],
    trailing_len: usize,
) -> u16 {
    let mut sum = Sum::of_checksum(old_check)
        .sub_udp_fields(old)
        .add_udp_fields(new)
        .sub_words(channel_header);
    // Padding byte i sits at UDP offset 8 + 4 + data_len + i: same parity as data_len + i.
    let mut i = 0;
    while i < 3 {
        if i < trailing_len {
            sum = sum.sub_byte_at(trailing[i], data_len + i);
        }
        i += 1;
    }
    sum.udp_checksum()
}

/// The UDP checksum after a peer's datagram (`old`, checksum `old_check`) is sent on to the
/// client (`new`) with the 4-byte `channel_header` in front of its payload (no padding: RFC
/// 8656 does not pad ChannelData over UDP). The caller handles an old checksum of 0.
#[inline(always)]
pub const fn udp_to_channel_data(
    old_check: u16,
    old: &UdpFields<'_>,
    new: &UdpFields<'_>,
    channel_header: &Words<2>,
) -> u16 {
    Sum::of_checksum(old_check)
        .sub_udp_fields(old)
        .add_udp_fields(new)
        .add_words(channel_header)
        .udp_checksum()
}

/// Whether `check` is what a sender that left the UDP checksum to offload (CHECKSUM_PARTIAL,
/// e.g. a local process sending over veth) puts in the field: the folded pseudo-header sum
/// (addresses, protocol, UDP length), which the hardware or the stack completes later. Such a
/// field is not a checksum of the datagram, so updating it incrementally would send a wrong
/// one. A complete checksum equals this by chance one time in 65536; then the frame merely
/// takes the userspace path.
#[inline(always)]
pub const fn is_offload_partial(check: u16, src_ip: &[u16], dst_ip: &[u16], udp_len: u16) -> bool {
    Sum::ZERO
        .add_words(src_ip)
        .add_words(dst_ip)
        .add_u16(17)
        .add_u16(udp_len)
        .fold()
        == check
}

/// The checksum of a 20-byte IPv4 header (no options) given as [`Words`], its checksum field
/// (word 5) counted as zero.
#[inline(always)]
pub const fn ipv4_header(header: &Words<10>) -> u16 {
    Sum::ZERO
        .add_words(header)
        .sub_u16(u16::from_be(header[5]))
        .checksum()
}

/// Whether a received IPv4 header's checksum is right: the sum over all of it, checksum field
/// included, is -0 (0xFFFF) (RFC 1071 §1).
#[inline(always)]
pub const fn ipv4_header_is_valid(header: &Words<10>) -> bool {
    // The words are added as they lie in memory, without swapping each: a ones'-complement
    // sum commutes with swapping bytes (RFC 1071 §2(B)), and 0xFFFF is its own swap. The XDP
    // program checks every IPv4 frame it forwards.
    let mut sum = 0u64;
    let mut i = 0;
    while i < header.len() {
        sum += header[i] as u64;
        i += 1;
    }
    Sum(sum).fold() == 0xffff
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// The reference: RFC 1071 over the pseudo-header and the whole datagram, computed from
    /// scratch, with the checksum field taken as 0 and a computed 0 sent as 0xFFFF.
    fn full_udp_checksum(src: &[u8], dst: &[u8], udp: &[u8]) -> u16 {
        assert_eq!(src.len(), dst.len());
        let mut bytes = Vec::new();
        bytes.extend_from_slice(src);
        bytes.extend_from_slice(dst);
        if src.len() == 4 {
            bytes.extend_from_slice(&[0, 17]);
            bytes.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        } else {
            bytes.extend_from_slice(&(udp.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, 17]);
        }
        let mut datagram = udp.to_vec();
        datagram[6] = 0;
        datagram[7] = 0;
        bytes.extend_from_slice(&datagram);
        if bytes.len() % 2 == 1 {
            bytes.push(0);
        }
        let mut sum: u32 = 0;
        for word in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        match !(sum as u16) {
            0 => 0xffff,
            check => check,
        }
    }

    /// splitmix64: a tiny deterministic generator, so every run tests the same packets.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
        fn ip(&mut self, ipv4: bool) -> [u8; 16] {
            let mut ip = [0u8; 16];
            for b in &mut ip {
                *b = self.next() as u8;
            }
            if ipv4 {
                ip[..12].copy_from_slice(&crate::IPV4_MAPPED_PREFIX);
            }
            ip
        }
    }

    /// One side of a rewrite: addresses, ports, and the UDP payload.
    struct Side {
        ipv4: bool,
        src: [u8; 16],
        dst: [u8; 16],
        src_port: u16,
        dst_port: u16,
    }

    impl Side {
        fn random(rng: &mut Rng) -> Self {
            let ipv4 = rng.below(2) == 0;
            Side {
                ipv4,
                src: rng.ip(ipv4),
                dst: rng.ip(ipv4),
                src_port: rng.next() as u16,
                dst_port: rng.next() as u16,
            }
        }
        fn words(&self) -> (AddrWords, AddrWords) {
            (words(&self.src), words(&self.dst))
        }
        fn addr<'a>(&self, ip: &'a [u8; 16]) -> &'a [u8] {
            if self.ipv4 { &ip[12..] } else { &ip[..] }
        }
        fn datagram(&self, payload: &[u8]) -> Vec<u8> {
            let len = (8 + payload.len()) as u16;
            let mut udp = Vec::new();
            udp.extend_from_slice(&self.src_port.to_be_bytes());
            udp.extend_from_slice(&self.dst_port.to_be_bytes());
            udp.extend_from_slice(&len.to_be_bytes());
            udp.extend_from_slice(&[0, 0]);
            udp.extend_from_slice(payload);
            let check = self.checksum(&udp);
            udp[6..8].copy_from_slice(&check.to_be_bytes());
            udp
        }
        fn checksum(&self, udp: &[u8]) -> u16 {
            full_udp_checksum(self.addr(&self.src), self.addr(&self.dst), udp)
        }
        fn fields<'a>(&self, words: &'a (AddrWords, AddrWords), udp_len: usize) -> UdpFields<'a> {
            let from = if self.ipv4 { 6 } else { 0 };
            UdpFields {
                src_ip: &words.0[from..],
                dst_ip: &words.1[from..],
                src_port: self.src_port,
                dst_port: self.dst_port,
                udp_len: udp_len as u16,
            }
        }
    }

    fn channel_header(channel: u16, len: usize) -> [u8; 4] {
        let [c0, c1] = channel.to_be_bytes();
        let [l0, l1] = (len as u16).to_be_bytes();
        [c0, c1, l0, l1]
    }

    /// Client -> peer: the incremental checksum of the stripped datagram equals a full one.
    fn check_channel_data_to_udp(old: &Side, new: &Side, channel: u16, data: &[u8], pad: &[u8]) {
        assert!(pad.len() <= 3);
        let header = channel_header(channel, data.len());
        let mut payload = header.to_vec();
        payload.extend_from_slice(data);
        payload.extend_from_slice(pad);
        let before = old.datagram(&payload);
        let old_check = u16::from_be_bytes([before[6], before[7]]);
        let after = new.datagram(data);
        let expected = u16::from_be_bytes([after[6], after[7]]);

        let mut trailing = [0u8; 3];
        trailing[..pad.len()].copy_from_slice(pad);
        let (old_words, new_words) = (old.words(), new.words());
        let got = channel_data_to_udp(
            old_check,
            &old.fields(&old_words, before.len()),
            &new.fields(&new_words, after.len()),
            &words(&header),
            data.len(),
            &trailing,
            pad.len(),
        );
        assert_eq!(
            got,
            expected,
            "channel_data_to_udp: v4 {}->{}, data {} bytes, pad {:?}, old check {old_check:#06x}",
            old.ipv4,
            new.ipv4,
            data.len(),
            pad
        );
    }

    /// Peer -> client: the incremental checksum of the prefixed datagram equals a full one.
    fn check_udp_to_channel_data(old: &Side, new: &Side, channel: u16, data: &[u8]) {
        let before = old.datagram(data);
        let old_check = u16::from_be_bytes([before[6], before[7]]);
        let header = channel_header(channel, data.len());
        let mut payload = header.to_vec();
        payload.extend_from_slice(data);
        let after = new.datagram(&payload);
        let expected = u16::from_be_bytes([after[6], after[7]]);
        let (old_words, new_words) = (old.words(), new.words());
        let got = udp_to_channel_data(
            old_check,
            &old.fields(&old_words, before.len()),
            &new.fields(&new_words, after.len()),
            &words(&header),
        );
        assert_eq!(
            got,
            expected,
            "udp_to_channel_data: v4 {}->{}, data {} bytes, old check {old_check:#06x}",
            old.ipv4,
            new.ipv4,
            data.len()
        );
    }

    #[test]
    fn incremental_equals_full_recompute_on_random_datagrams() {
        let mut rng = Rng(0x5eed_2a3b_4c5d_6e7f);
        for _ in 0..20_000 {
            let old = Side::random(&mut rng);
            let new = Side::random(&mut rng);
            let channel = 0x4000 + rng.below(0x4000) as u16;
            // Mostly media-sized, sometimes tiny, every parity.
            let len = if rng.below(4) == 0 {
                rng.below(8)
            } else {
                rng.below(1500)
            } as usize;
            let data = rng.bytes(len);
            let pad_len = rng.below(4) as usize;
            let pad = rng.bytes(pad_len);
            check_channel_data_to_udp(&old, &new, channel, &data, &pad);
            check_udp_to_channel_data(&old, &new, channel, &data);
        }
    }

    #[test]
    fn odd_lengths_with_every_padding() {
        let mut rng = Rng(7);
        for ipv4_old in [true, false] {
            for ipv4_new in [true, false] {
                for len in 0..=9 {
                    for pad_len in 0..=3 {
                        let mut old = Side::random(&mut rng);
                        old.ipv4 = ipv4_old;
                        old.src = rng.ip(ipv4_old);
                        old.dst = rng.ip(ipv4_old);
                        let mut new = Side::random(&mut rng);
                        new.ipv4 = ipv4_new;
                        new.src = rng.ip(ipv4_new);
                        new.dst = rng.ip(ipv4_new);
                        let data = rng.bytes(len);
                        // Non-zero padding: it must be taken out of the sum, not assumed 0.
                        let pad = vec![0xa5; pad_len];
                        check_channel_data_to_udp(&old, &new, 0x4001, &data, &pad);
                        check_udp_to_channel_data(&old, &new, 0x7fff, &data);
                    }
                }
            }
        }
    }

    /// Sets the last two data bytes (at an even UDP offset) so that `side`'s datagram
    /// carrying `prefix ++ data` sums to -0, i.e. computes to checksum 0, sent as 0xFFFF.
    fn force_zero_sum(side: &Side, prefix: &[u8], data: &mut [u8]) {
        let n = data.len();
        assert!(n >= 2 && (prefix.len() + n).is_multiple_of(2));
        data[n - 2] = 0;
        data[n - 1] = 0;
        let mut payload = prefix.to_vec();
        payload.extend_from_slice(data);
        let udp = side.datagram(&payload);
        // The computed checksum c is ~S; adding the word c makes the sum 0xFFFF.
        let c = u16::from_be_bytes([udp[6], udp[7]]);
        data[n - 2..].copy_from_slice(&c.to_be_bytes());
        let udp = side.datagram(&{
            let mut p = prefix.to_vec();
            p.extend_from_slice(data);
            p
        });
        assert_eq!(u16::from_be_bytes([udp[6], udp[7]]), 0xffff);
    }

    #[test]
    fn old_checksum_0xffff_and_new_checksum_zero() {
        let mut rng = Rng(0xffff);
        for ipv4_old in [true, false] {
            for ipv4_new in [true, false] {
                let mut old = Side::random(&mut rng);
                old.ipv4 = ipv4_old;
                old.src = rng.ip(ipv4_old);
                old.dst = rng.ip(ipv4_old);
                let mut new = Side::random(&mut rng);
                new.ipv4 = ipv4_new;
                new.src = rng.ip(ipv4_new);
                new.dst = rng.ip(ipv4_new);

                // The incoming datagram carries 0xFFFF (its sum is -0).
                let mut data = rng.bytes(64);
                force_zero_sum(&old, &channel_header(0x4000, 64), &mut data);
                check_channel_data_to_udp(&old, &new, 0x4000, &data, &[]);
                let mut data = rng.bytes(64);
                force_zero_sum(&old, &[], &mut data);
                check_udp_to_channel_data(&old, &new, 0x4000, &data);

                // The outgoing datagram computes to 0 and must carry 0xFFFF.
                let mut data = rng.bytes(64);
                force_zero_sum(&new, &[], &mut data);
                check_channel_data_to_udp(&old, &new, 0x4000, &data, &[1, 2]);
                let mut data = rng.bytes(64);
                force_zero_sum(&new, &channel_header(0x4000, 64), &mut data);
                check_udp_to_channel_data(&old, &new, 0x4000, &data);
            }
        }
    }

    #[test]
    fn fold_keeps_the_residue() {
        assert_eq!(Sum::ZERO.fold(), 0);
        assert_eq!(Sum(0xffff).fold(), 0xffff);
        assert_eq!(Sum(0x1_0000).fold(), 1);
        assert_eq!(Sum(u64::MAX).fold(), 0xffff);
        assert_eq!(Sum(0x1_fffe).fold(), 0xffff);
        assert_eq!(
            Sum::of_checksum(0xffff).sub_u16(1).add_u16(1).fold(),
            0xffff
        );
    }

    #[test]
    fn ipv4_header_checksum_known_vector() {
        // A classic example header: 192.168.0.1 -> 192.168.0.199, UDP, checksum 0xb861.
        let mut header: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header(&words(&header)), 0xb861);
        assert!(!ipv4_header_is_valid(&words(&header)));
        header[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(ipv4_header_is_valid(&words(&header)));
        // The field's own value does not change the computed checksum.
        assert_eq!(ipv4_header(&words(&header)), 0xb861);
        header[15] ^= 1;
        assert!(!ipv4_header_is_valid(&words(&header)));
    }

    #[test]
    fn words_and_bytes_round_trip() {
        let b: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        let w: AddrWords = words(&b);
        assert_eq!(w[1].to_ne_bytes(), [34, 51]);
        assert_eq!(u16::from_be(w[1]), 34 * 256 + 51);
        assert_eq!(bytes::<8, 16>(&w), b);
    }
    #[test]
    fn offload_partial_fields_are_recognised_and_complete_ones_are_not() {
        let src = words::<4, 2>(&[10, 201, 1, 2]);
        let dst = words::<4, 2>(&[10, 201, 1, 1]);
        let udp_len = 8 + 5;
        let partial = Sum::ZERO
            .add_words(&src)
            .add_words(&dst)
            .add_u16(17)
            .add_u16(udp_len)
            .fold();
        assert!(is_offload_partial(partial, &src, &dst, udp_len));
        let udp = [
            0x9c, 0x40, 0x0d, 0x96, 0, 13, 0, 0, b'h', b'e', b'l', b'l', b'o',
        ];
        let complete = full_udp_checksum(&[10, 201, 1, 2], &[10, 201, 1, 1], &udp);
        assert!(!is_offload_partial(complete, &src, &dst, udp_len));
    }
}
