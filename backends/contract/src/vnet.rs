//! The `virtio_net_hdr` that Linux puts before each frame on a packet socket with
//! `PACKET_VNET_HDR` and on a TAP device with `IFF_VNET_HDR`, and the checksum arithmetic of
//! the offloads it describes.
//!
//! A frame a local process sent may hold only a partial checksum (`NEEDS_CSUM`: the
//! pseudo-header sum, to be completed from `csum_start` on) and may be a TCP "super-frame" of
//! up to 64 KiB of payload (`gso_type`, cut into `gso_size` payload bytes per segment by
//! whoever puts it on a wire). Backends use this to take such frames in ([`finish_checksum`])
//! and, where the kernel segments for them, to hand such frames out.

/// The length of the `virtio_net_hdr` the kernel puts before each frame (no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

/// `flags`: the checksum from `csum_start` on is partial.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type`: not a super-frame.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: a TCP/IPv4 super-frame.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type` bit: ECN was negotiated (CWR handling as in TSO).
pub const GSO_ECN: u8 = 0x80;

/// A `virtio_net_hdr` as the kernel writes it for a packet socket or a TAP device with
/// `IFF_VNET_HDR` (host byte order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// [`F_NEEDS_CSUM`] and others.
    pub flags: u8,
    /// [`GSO_NONE`], [`GSO_TCPV4`], … possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers (a hint; not relied upon).
    pub hdr_len: u16,
    /// Payload bytes per segment of a super-frame.
    pub gso_size: u16,
    /// Where the partial checksum's coverage starts (from the Ethernet header).
    pub csum_start: u16,
    /// Where the checksum field is, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the first [`VNET_HDR_LEN`] bytes; `None` if there are fewer.
    pub fn parse(bytes: &[u8]) -> Option<VnetHdr> {
        let b = bytes.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// The header as the kernel reads it.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// The ones'-complement sum of `data` (as big-endian 16-bit words) added to `sum`; the result
/// is not folded but stays well inside a `u32`.
///
/// The ones'-complement sum does not depend on byte order (RFC 1071, 2.B), so the bulk is added
/// as native 32-bit words into a 64-bit accumulator (no carry handling inside the loop, which the
/// compiler can vectorise), then folded and put in network order; a 64 KiB super-frame takes a
/// few microseconds this way, where a 16-bit loop took most of a core at 8 Gbit/s.
pub fn sum_words(sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(4);
    let mut wide: u64 = 0;
    for c in &mut chunks {
        wide += u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
    }
    let mut folded = (wide & 0xffff_ffff) + (wide >> 32);
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    let mut total = u32::from(u16::from_be(folded as u16)) + (sum & 0xffff) + (sum >> 16);
    let rest = chunks.remainder();
    if rest.len() >= 2 {
        total += u32::from(u16::from_be_bytes([rest[0], rest[1]]));
    }
    if rest.len() % 2 == 1 {
        total += u32::from(rest[rest.len() - 1]) << 8;
    }
    total
}

/// Folds a sum to 16 bits and complements it.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Completes a partial checksum in place. Returns false (and changes nothing) when the
/// offsets do not fit the frame.
pub fn finish_checksum(frame: &mut [u8], csum_start: usize, csum_offset: usize) -> bool {
    let field = csum_start + csum_offset;
    if csum_start >= frame.len() || field + 2 > frame.len() {
        return false;
    }
    let sum = fold(sum_words(0, &frame[csum_start..]));
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

/// The folded, *not* complemented, pseudo-header sum of the TCP/IPv4 segment whose IPv4
/// header starts at `l3` in `frame`: what a partial (`NEEDS_CSUM`) TCP checksum field holds.
/// `None` if the frame is too short for the headers.
pub fn tcp_pseudo_header_sum(frame: &[u8], l3: usize) -> Option<u16> {
    let ihl = usize::from(frame.get(l3)? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([
        *frame.get(l3 + 2)?,
        *frame.get(l3 + 3)?,
    ]));
    let tcp_len = total.checked_sub(ihl)?;
    let addrs = frame.get(l3 + 12..l3 + 20)?;
    let sum = sum_words(0, addrs) + 6 + tcp_len as u32;
    Some(!fold(sum))
}

/// What a received frame's header left to do, once done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// A TCP/IPv4 super-frame (handed on whole: the core takes a TCP segment of any length).
    pub super_frame: bool,
    /// A TCP/IPv4 frame with a partial checksum, left partial: nothing to verify (see
    /// [`FrameBatch::set_last_checksum_verified`](crate::FrameBatch::set_last_checksum_verified)).
    pub checksum_verified: bool,
}

/// Does what a received frame's header says is left to do: completes a partial checksum, except
/// a TCP/IPv4 one, which stays partial and is reported as needing no check (the core takes it
/// so; summing 64 KiB only for the core to sum it again was most of the cost of a super-frame).
/// `None` for what the core cannot take (another kind of super-frame, a checksum that does not
/// fit the frame).
pub fn finish_offloads(hdr: &VnetHdr, frame: &mut [u8]) -> Option<Received> {
    let (start, offset) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
    let mut checksum_verified = false;
    if hdr.flags & F_NEEDS_CSUM != 0 {
        if is_tcp_checksum_of_ipv4(frame, start, offset) {
            checksum_verified = true;
        } else if !finish_checksum(frame, start, offset) {
            return None;
        }
    }
    let super_frame = match hdr.gso_type & !GSO_ECN {
        GSO_NONE => false,
        GSO_TCPV4 => true,
        _ => return None,
    };
    Some(Received {
        super_frame,
        checksum_verified,
    })
}

/// Whether the checksum at `start` + `offset` is the TCP checksum of an IPv4 frame.
fn is_tcp_checksum_of_ipv4(frame: &[u8], start: usize, offset: usize) -> bool {
    tcp_ipv4_l4(frame) == Some(start) && offset == 16 && start + offset + 2 <= frame.len()
}

/// Where the TCP header of a TCP/IPv4 frame starts (from the Ethernet header); `None` for a
/// frame of another kind, or too short for its IPv4 header's first byte.
fn tcp_ipv4_l4(frame: &[u8]) -> Option<usize> {
    let l3 = crate::ETHERNET_HEADER_LEN;
    if frame.get(12..14)? != [0x08, 0x00] || frame.get(l3 + 9)? != &6 {
        return None;
    }
    Some(l3 + usize::from(frame[l3] & 0x0f) * 4)
}

/// The `virtio_net_hdr` for a frame to send, and for a super-frame its headers with the TCP
/// checksum field made partial (the frame itself is borrowed, not changed).
/// No allocation per frame: the headers fit a fixed buffer.
pub struct VnetPrefix {
    /// The header itself.
    pub hdr: VnetHdr,
    headers: [u8; MAX_HEADERS],
    headers_len: usize,
}

/// The longest Ethernet, IPv4 and TCP headers: 14 + 60 + 60 bytes.
const MAX_HEADERS: usize = crate::ETHERNET_HEADER_LEN + 60 + 60;

impl VnetPrefix {
    /// The empty header, for a frame that fits.
    pub fn plain() -> VnetPrefix {
        VnetPrefix {
            hdr: VnetHdr::default(),
            headers: [0; MAX_HEADERS],
            headers_len: 0,
        }
    }

    /// The super-frame's headers as they go out (empty for a frame that fits).
    pub fn headers(&self) -> &[u8] {
        &self.headers[..self.headers_len]
    }
}

/// The prefix for `frame`: empty for a frame that fits `wire_max`; for a longer TCP/IPv4
/// segment (with `offload`), a GSO header that cuts it into segments that fit. `None` for a
/// longer frame of any other kind.
pub fn vnet_prefix(frame: &[u8], wire_max: usize, offload: bool) -> Option<VnetPrefix> {
    if frame.len() <= wire_max {
        return Some(VnetPrefix::plain());
    }
    if !offload {
        return None;
    }
    let l3 = crate::ETHERNET_HEADER_LEN;
    let l4 = tcp_ipv4_l4(frame)?;
    let ihl = l4 - l3;
    let thl = usize::from(frame.get(l4 + 12)? >> 4) * 4;
    let hdr_len = l4 + thl;
    let gso_size = wire_max.checked_sub(hdr_len)?;
    if ihl < 20 || thl < 20 || frame.len() <= hdr_len || gso_size == 0 {
        return None;
    }
    let mut headers = [0; MAX_HEADERS];
    headers[..hdr_len].copy_from_slice(&frame[..hdr_len]);
    let pseudo = tcp_pseudo_header_sum(frame, l3)?;
    headers[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    Some(VnetPrefix {
        hdr: VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: hdr_len as u16,
            gso_size: gso_size as u16,
            csum_start: l4 as u16,
            csum_offset: 16,
        },
        headers,
        headers_len: hdr_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header of a TCP/IPv4 super-frame with 20-byte IPv4 and 32-byte TCP headers.
    fn tso_header() -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    #[test]
    fn a_header_reads_back_as_written() {
        let h = tso_header();
        assert_eq!(VnetHdr::parse(&h.to_bytes()), Some(h));
        assert_eq!(VnetHdr::parse(&[0; 9]), None);
    }

    #[test]
    fn the_word_sum_matches_the_sum_of_big_endian_words() {
        // The plain definition: 16-bit big-endian words, an odd last byte padded with zero.
        fn reference(sum: u32, data: &[u8]) -> u16 {
            let mut s = u64::from(sum);
            for c in data.chunks(2) {
                s += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            !(s as u16)
        }
        let mut data = vec![0u8; 70_000];
        let mut x: u32 = 0x1234_5678;
        for b in &mut data {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (x >> 24) as u8;
        }
        let ones = vec![0xffu8; 65_536];
        for (start, len) in [
            (0, 0),
            (0, 1),
            (1, 2),
            (3, 3),
            (5, 7),
            (1, 1501),
            (2, 65_535),
            (0, 70_000),
        ] {
            for seed in [0, 0x1_fffe, 0xffff_ffff >> 1] {
                let d = &data[start..start + len];
                assert_eq!(
                    fold(sum_words(seed, d)),
                    reference(seed, d),
                    "start {start} len {len}"
                );
            }
        }
        assert_eq!(fold(sum_words(0, &ones)), reference(0, &ones));
    }

    #[test]
    fn a_partial_checksum_finished_is_the_full_checksum() {
        // Ethernet + IPv4 (20) + TCP (20) + 5 bytes, with its full checksum computed by hand
        // the slow way, then replaced by the pseudo-header sum and finished.
        let mut f = vec![0u8; 14 + 20 + 20 + 5];
        f[14] = 0x45;
        f[16..18].copy_from_slice(&45u16.to_be_bytes());
        f[23] = 6;
        f[26..30].copy_from_slice(&[192, 168, 30, 10]);
        f[30..34].copy_from_slice(&[10, 77, 0, 2]);
        f[46] = 0x50;
        f[54..].copy_from_slice(b"hello");
        let pseudo = sum_words(0, &f[26..34]) + 6 + 25;
        let full = fold(sum_words(pseudo, &f[34..]));
        let partial = tcp_pseudo_header_sum(&f, 14).unwrap();
        f[50..52].copy_from_slice(&partial.to_be_bytes());
        assert!(finish_checksum(&mut f, 34, 16));
        assert_eq!(u16::from_be_bytes([f[50], f[51]]), full);
    }

    /// An Ethernet + IPv4 + TCP frame with `payload` bytes and a 12-byte TCP option block.
    fn tcp_frame(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 32 + payload];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        let total = (20 + 32 + payload) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 77, 0, 2]);
        f[30..34].copy_from_slice(&[192, 168, 30, 10]);
        f[46] = 8 << 4;
        f
    }

    #[test]
    fn frames_that_fit_go_with_an_empty_header() {
        let p = vnet_prefix(&tcp_frame(1000), 1514, true).unwrap();
        assert_eq!(p.hdr, VnetHdr::default());
        assert!(p.headers().is_empty());
    }

    #[test]
    fn a_long_tcp_segment_is_marked_for_the_kernel_to_cut() {
        let frame = tcp_frame(60_000);
        let p = vnet_prefix(&frame, 1514, true).unwrap();
        assert_eq!(p.hdr.gso_type, GSO_TCPV4);
        assert_eq!(p.hdr.flags, F_NEEDS_CSUM);
        assert_eq!(p.hdr.hdr_len, 14 + 20 + 32);
        // Each cut segment fills the MTU: 1500 less 20 of IPv4 and 32 of TCP.
        assert_eq!(p.hdr.gso_size, 1448);
        assert_eq!((p.hdr.csum_start, p.hdr.csum_offset), (34, 16));
        // The checksum field holds the pseudo-header sum; the frame itself is unchanged.
        let field = u16::from_be_bytes([p.headers()[50], p.headers()[51]]);
        assert_eq!(Some(field), tcp_pseudo_header_sum(&frame, 14));
        assert_eq!(&p.headers()[..50], &frame[..50]);
    }

    #[test]
    fn a_long_frame_of_another_kind_or_without_offload_is_refused() {
        let mut udp = tcp_frame(3000);
        udp[23] = 17;
        assert!(vnet_prefix(&udp, 1514, true).is_none());
        assert!(vnet_prefix(&tcp_frame(3000), 1514, false).is_none());
    }

    #[test]
    fn a_received_tcp_super_frame_is_kept_whole_with_its_checksum_vouched_for() {
        let mut frame = tcp_frame(5000);
        let partial = tcp_pseudo_header_sum(&frame, 14).unwrap();
        frame[50..52].copy_from_slice(&partial.to_be_bytes());
        let before = frame.clone();
        let hdr = tso_header();
        let received = finish_offloads(&hdr, &mut frame);
        assert_eq!(
            received,
            Some(Received {
                super_frame: true,
                checksum_verified: true
            })
        );
        assert_eq!(frame, before, "a TCP checksum is left partial");
        let udp_gso = VnetHdr {
            gso_type: 5,
            ..VnetHdr::default()
        };
        assert_eq!(finish_offloads(&udp_gso, &mut frame), None);
    }

    #[test]
    fn a_partial_checksum_of_another_protocol_is_finished() {
        // The same bytes as UDP (protocol 17, checksum at offset 6): finished, not vouched for.
        let mut frame = tcp_frame(100);
        frame[23] = 17;
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..VnetHdr::default()
        };
        let received = finish_offloads(&hdr, &mut frame).unwrap();
        assert!(!received.super_frame && !received.checksum_verified);
        let field = u16::from_be_bytes([frame[40], frame[41]]);
        assert_eq!(
            field,
            fold(sum_words(
                0,
                &{
                    let mut f = frame.clone();
                    f[40..42].fill(0);
                    f
                }[34..]
            ))
        );
        // Offsets past the frame: nothing the core can take.
        let bad = VnetHdr {
            csum_offset: 2000,
            ..hdr
        };
        assert_eq!(finish_offloads(&bad, &mut frame), None);
    }
}
