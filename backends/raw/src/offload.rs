//! Finishing what a local sender's offloads left undone: checksums and TCP segmentation.
//!
//! # Theory of operation
//!
//! A frame that a process on *this* host sent through a veth or a bridge reaches a packet
//! socket as the kernel holds it, not as a wire would carry it: with transmit checksum offload
//! its TCP or UDP checksum holds only the pseudo-header sum (`CHECKSUM_PARTIAL`), and with TSO
//! or GSO it is one "super-frame" carrying up to 64 KiB of TCP payload. A TAP device never shows
//! such frames (the kernel finishes them first), and hubnat's core, like any host on a wire,
//! cannot use them.
//!
//! With `PACKET_VNET_HDR` on the socket, the kernel puts a `virtio_net_hdr` in front of every
//! frame it delivers, which says exactly what is left to do (`NEEDS_CSUM` with where the
//! checksum starts and where it goes; the GSO type and segment size). This module does it:
//!
//! * [`finish_checksum`] completes a partial checksum in place, the way the kernel's
//!   `skb_checksum_help` does: the ones'-complement sum from `csum_start` to the end, folded,
//!   complemented, stored at `csum_start + csum_offset`.
//! * [`TcpSegmenter`] cuts a TCP/IPv4 super-frame into frames of `gso_size` payload bytes, each
//!   with the headers copied and fixed: IPv4 total length, identification (+1 per segment) and
//!   header checksum; TCP sequence number, flags (CWR only on the first, FIN and PSH only on
//!   the last) and a full checksum. It keeps the super-frame and its position, so a batch that
//!   fills up half-way is continued by the next receive (cancel-safe: nothing is lost).
//!
//! Other GSO types (TCP over IPv6, UDP) are not cut; the backend drops and counts them.
//! Nothing here allocates after the segmenter's buffer has grown to the largest super-frame.

pub use hubnat_backend::vnet::{
    finish_checksum, VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, VNET_HDR_LEN,
};
use hubnat_backend::vnet::{fold, sum_words};
use hubnat_backend::FrameBatch;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a super-frame cannot be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// Not Ethernet + IPv4 + TCP, or a header is cut short.
    #[error("not a well-formed TCP/IPv4 frame")]
    Malformed,
    /// A segment would not fit in a frame of the segment's size (or `gso_size` is 0).
    #[error("segment size {0} does not fit the MTU")]
    TooBig(usize),
}

/// Cuts TCP/IPv4 super-frames into wire-sized frames. See the module documentation.
#[derive(Debug, Default)]
pub struct TcpSegmenter {
    frame: Vec<u8>,
    /// Offsets in `frame`: the IPv4 header, the TCP header, the payload, its end.
    l3: usize,
    l4: usize,
    payload: usize,
    end: usize,
    gso_size: usize,
    /// The next payload byte to send, relative to `payload`.
    next: usize,
    index: u16,
    active: bool,
}

impl TcpSegmenter {
    /// An idle segmenter.
    pub fn new() -> Self {
        Self::default()
    }

    /// True while segments of the last super-frame are left to emit.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Takes a super-frame (Ethernet header first) to cut into segments of `gso_size` payload
    /// bytes, none longer than `max_frame` bytes. Any unfinished earlier super-frame is
    /// dropped.
    pub fn start(
        &mut self,
        frame: &[u8],
        gso_size: usize,
        max_frame: usize,
    ) -> Result<(), SegmentError> {
        self.active = false;
        let bad = SegmentError::Malformed;
        let ethertype = |at: usize| {
            frame
                .get(at..at + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
        };
        let l3 = match ethertype(12).ok_or(bad)? {
            ETHERTYPE_IPV4 => 14,
            ETHERTYPE_VLAN if ethertype(16) == Some(ETHERTYPE_IPV4) => 18,
            _ => return Err(bad),
        };
        let ip = frame.get(l3..l3 + 20).ok_or(bad)?;
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != IPPROTO_TCP {
            return Err(bad);
        }
        let l4 = l3 + ihl;
        let doff = usize::from(frame.get(l4 + 12).ok_or(bad)? >> 4) * 4;
        let payload = l4 + doff;
        if doff < 20 || payload > frame.len() {
            return Err(bad);
        }
        // The IPv4 total length bounds the payload (a frame may carry padding); 0 is allowed
        // for very large super-frames.
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let end = if total == 0 {
            frame.len()
        } else {
            (l3 + total).min(frame.len())
        };
        if end < payload {
            return Err(bad);
        }
        if gso_size == 0 || payload + gso_size > max_frame {
            return Err(SegmentError::TooBig(gso_size));
        }
        self.frame.clear();
        self.frame.extend_from_slice(&frame[..end]);
        *self = TcpSegmenter {
            frame: std::mem::take(&mut self.frame),
            l3,
            l4,
            payload,
            end,
            gso_size,
            next: 0,
            index: 0,
            active: true,
        };
        Ok(())
    }

    /// Appends segments to `batch` until the super-frame is done or the batch is full.
    /// Returns how many were appended.
    pub fn emit(&mut self, batch: &mut FrameBatch) -> usize {
        let mut pushed = 0;
        while self.active && !batch.is_full() {
            let data_len = self.end - self.payload;
            let start = self.next;
            let n = self.gso_size.min(data_len - start);
            let last = start + n >= data_len;
            let (l3, l4, hdrs) = (self.l3, self.l4, self.payload);
            let src = &self.frame;
            let index = self.index;
            batch.push_built(hdrs + n, |out| {
                out[..hdrs].copy_from_slice(&src[..hdrs]);
                out[hdrs..].copy_from_slice(&src[hdrs + start..hdrs + start + n]);
                // IPv4: length, identification, header checksum.
                let ip_len = (hdrs - l3 + n) as u16;
                out[l3 + 2..l3 + 4].copy_from_slice(&ip_len.to_be_bytes());
                let id = u16::from_be_bytes([src[l3 + 4], src[l3 + 5]]).wrapping_add(index);
                out[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
                out[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
                let ip_sum = fold(sum_words(0, &out[l3..l4]));
                out[l3 + 10..l3 + 12].copy_from_slice(&ip_sum.to_be_bytes());
                // TCP: sequence number, flags, checksum.
                let seq = u32::from_be_bytes([src[l4 + 4], src[l4 + 5], src[l4 + 6], src[l4 + 7]])
                    .wrapping_add(start as u32);
                out[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
                if !last {
                    out[l4 + 13] &= !(TCP_FIN | TCP_PSH);
                }
                if index > 0 {
                    out[l4 + 13] &= !TCP_CWR;
                }
                out[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
                let tcp_len = (hdrs - l4 + n) as u32;
                let mut sum = sum_words(0, &out[l3 + 12..l3 + 20]); // source and destination
                sum += u32::from(IPPROTO_TCP) + tcp_len;
                let tcp_sum = fold(sum_words(sum, &out[l4..]));
                out[l4 + 16..l4 + 18].copy_from_slice(&tcp_sum.to_be_bytes());
            });
            pushed += 1;
            self.index = self.index.wrapping_add(1);
            self.next = start + n;
            if last {
                self.active = false;
            }
        }
        pushed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
        Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
        UdpRepr,
    };

    const SRC: Ipv4Address = Ipv4Address::new(192, 168, 30, 10);
    const DST: Ipv4Address = Ipv4Address::new(10, 77, 0, 2);

    /// An Ethernet + IPv4 + TCP frame with `payload`, checksums correct, the given control.
    fn tcp_frame(payload: &[u8], control: TcpControl, push: bool) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: 40000,
            dst_port: 8080,
            control,
            seq_number: TcpSeqNumber(0xffff_ff00u32 as i32),
            ack_number: Some(TcpSeqNumber(77)),
            window_len: 512,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: SRC,
            dst_addr: DST,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut f = vec![0u8; 14 + ip.buffer_len() + tcp.buffer_len()];
        EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            dst_addr: EthernetAddress([0, 0xac, 0, 0, 0, 1]),
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
        let mut ipp = Ipv4Packet::new_unchecked(&mut f[14..]);
        ip.emit(&mut ipp, &ChecksumCapabilities::default());
        ipp.set_ident(1000);
        ipp.fill_checksum();
        let mut tp = TcpPacket::new_unchecked(&mut f[34..]);
        tcp.emit(
            &mut tp,
            &IpAddress::Ipv4(SRC),
            &IpAddress::Ipv4(DST),
            &ChecksumCapabilities::default(),
        );
        tp.set_psh(push);
        tp.fill_checksum(&IpAddress::Ipv4(SRC), &IpAddress::Ipv4(DST));
        f
    }

    #[test]
    fn a_partial_checksum_is_finished_like_the_kernel_does() {
        let mut f = tcp_frame(b"hello, partial checksum!", TcpControl::Psh, true);
        let good = f.clone();
        // CHECKSUM_PARTIAL: the field holds the (uncomplemented) pseudo-header sum.
        let tcp_len = (f.len() - 34) as u32;
        let mut pseudo = sum_words(0, &f[26..34]) + 6 + tcp_len;
        while pseudo > 0xffff {
            pseudo = (pseudo & 0xffff) + (pseudo >> 16);
        }
        f[50..52].copy_from_slice(&(pseudo as u16).to_be_bytes());
        assert_ne!(f, good);
        assert!(finish_checksum(&mut f, 34, 16));
        assert_eq!(f, good);
        assert!(
            !finish_checksum(&mut f, 34, 100),
            "a field past the end is refused"
        );
    }

    #[test]
    fn a_udp_partial_checksum_too() {
        let payload = b"dns?";
        let udp = UdpRepr {
            src_port: 5353,
            dst_port: 53,
        };
        let mut f = vec![0u8; 14 + 20 + 8 + payload.len()];
        let ip = Ipv4Repr {
            src_addr: SRC,
            dst_addr: DST,
            next_header: IpProtocol::Udp,
            payload_len: 8 + payload.len(),
            hop_limit: 64,
        };
        ip.emit(
            &mut Ipv4Packet::new_unchecked(&mut f[14..]),
            &ChecksumCapabilities::default(),
        );
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut f[34..]),
            &IpAddress::Ipv4(SRC),
            &IpAddress::Ipv4(DST),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        );
        let good = f.clone();
        let mut pseudo = sum_words(0, &f[26..34]) + 17 + (8 + payload.len()) as u32;
        while pseudo > 0xffff {
            pseudo = (pseudo & 0xffff) + (pseudo >> 16);
        }
        f[40..42].copy_from_slice(&(pseudo as u16).to_be_bytes());
        assert!(finish_checksum(&mut f, 34, 6));
        assert_eq!(f, good);
    }

    #[test]
    fn a_super_frame_is_cut_into_valid_segments() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let sup = tcp_frame(&payload, TcpControl::Fin, true);
        let mut seg = TcpSegmenter::new();
        seg.start(&sup, 1448, 1514).expect("segmentable");
        // A small batch fills up half-way; the rest comes out next time.
        let mut batch = FrameBatch::new(4, 1514);
        assert_eq!(seg.emit(&mut batch), 4);
        assert!(seg.is_active());
        let mut frames: Vec<Vec<u8>> = batch.iter().map(<[u8]>::to_vec).collect();
        let mut batch = FrameBatch::new(64, 1514);
        assert_eq!(seg.emit(&mut batch), 3);
        assert!(!seg.is_active());
        frames.extend(batch.iter().map(<[u8]>::to_vec));

        let mut data = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            assert!(f.len() <= 1514, "segment {i} is {} bytes", f.len());
            let ip = Ipv4Packet::new_checked(&f[14..]).expect("ipv4");
            assert!(ip.verify_checksum(), "IP checksum of segment {i}");
            assert_eq!(ip.ident(), 1000 + i as u16);
            assert_eq!(usize::from(ip.total_len()), f.len() - 14);
            let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
            assert!(
                tcp.verify_checksum(&IpAddress::Ipv4(SRC), &IpAddress::Ipv4(DST)),
                "TCP checksum of segment {i}"
            );
            assert_eq!(
                tcp.seq_number(),
                TcpSeqNumber(0xffff_ff00u32 as i32) + data.len()
            );
            let last = i == frames.len() - 1;
            assert_eq!(
                (tcp.fin(), tcp.psh()),
                (last, last),
                "FIN and PSH only on the last"
            );
            assert_eq!(tcp.ack_number(), TcpSeqNumber(77));
            data.extend_from_slice(tcp.payload());
        }
        assert_eq!(data, payload);
    }

    #[test]
    fn what_cannot_be_cut_is_refused() {
        let sup = tcp_frame(&[1u8; 3000], TcpControl::None, false);
        let mut seg = TcpSegmenter::new();
        assert_eq!(seg.start(&sup, 1500, 1514), Err(SegmentError::TooBig(1500)));
        assert_eq!(seg.start(&sup, 0, 1514), Err(SegmentError::TooBig(0)));
        assert_eq!(
            seg.start(&sup[..40], 1000, 1514),
            Err(SegmentError::Malformed)
        );
        let mut udp = sup.clone();
        udp[23] = 17;
        assert_eq!(seg.start(&udp, 1000, 1514), Err(SegmentError::Malformed));
        assert!(!seg.is_active());
    }

    #[test]
    fn the_vnet_header_parses_in_host_order() {
        let mut b = [0u8; 10];
        b[0] = F_NEEDS_CSUM;
        b[1] = GSO_TCPV4 | GSO_ECN;
        b[2..4].copy_from_slice(&66u16.to_ne_bytes());
        b[4..6].copy_from_slice(&1448u16.to_ne_bytes());
        b[6..8].copy_from_slice(&34u16.to_ne_bytes());
        b[8..10].copy_from_slice(&16u16.to_ne_bytes());
        let h = VnetHdr::parse(&b).expect("parse");
        assert_eq!(
            (
                h.flags,
                h.gso_type,
                h.hdr_len,
                h.gso_size,
                h.csum_start,
                h.csum_offset
            ),
            (1, 0x81, 66, 1448, 34, 16)
        );
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }
}
