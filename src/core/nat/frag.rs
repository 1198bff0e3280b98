//! IPv4 reassembly of the fragments clients send, so that a datagram bigger than the MTU can
//! still be carried (UDP to a host socket, TCP into smoltcp, ICMP echo).
//!
//! Bounded: at most [`MAX_DATAGRAMS`] datagrams are reassembled at once, at most
//! [`MAX_PER_SOURCE`] of them from one source address, each at most 65535 bytes, each given
//! [`TIMEOUT`] to complete. Room is made at the expense of whoever takes the most: a source at
//! its share loses its own oldest datagram; when the table is full, the source holding the
//! most loses its oldest. One client sending fragment after fragment therefore cannot push
//! out another client's datagram. Overlapping
//! fragments are accepted (the later bytes win), as Linux does.

use std::net::Ipv4Addr;

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{IpProtocol, Ipv4Packet};

/// Datagrams in reassembly at once.
pub const MAX_DATAGRAMS: usize = 64;
/// Datagrams in reassembly at once from one source address.
pub const MAX_PER_SOURCE: usize = 8;
/// Time for all fragments of a datagram to arrive.
pub const TIMEOUT: Duration = Duration::from_secs(30);
const MAX_LEN: usize = 65535;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpProtocol,
    ident: u16,
}

#[derive(Debug)]
struct Datagram {
    key: Key,
    started: Instant,
    /// The first fragment's header, once seen.
    header: Option<Vec<u8>>,
    payload: Vec<u8>,
    /// Received payload ranges, sorted, merged.
    ranges: Vec<(usize, usize)>,
    /// Payload length, known from the last fragment.
    total: Option<usize>,
}

impl Datagram {
    fn add_range(&mut self, start: usize, end: usize) {
        self.ranges.push((start, end));
        self.ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.ranges = merged;
    }

    fn complete(&self) -> bool {
        match (self.total, &self.header) {
            (Some(total), Some(_)) => self.ranges.first() == Some(&(0, total)),
            _ => false,
        }
    }
}

/// The reassembler.
#[derive(Debug, Default)]
pub struct Reassembler {
    datagrams: Vec<Datagram>,
    /// Fragments dropped: malformed, too big, timed out, evicted.
    pub dropped: u64,
}

impl Reassembler {
    /// Adds a fragment (a whole IPv4 packet, checked by the caller). When it completes a
    /// datagram, the reassembled packet (header without fragmentation, fresh checksum) is
    /// written to `out` and `true` is returned.
    pub fn add(&mut self, packet: &Ipv4Packet<&[u8]>, now: Instant, out: &mut Vec<u8>) -> bool {
        self.expire(now);
        let key = Key {
            src: packet.src_addr(),
            dst: packet.dst_addr(),
            protocol: packet.next_header(),
            ident: packet.ident(),
        };
        let offset = usize::from(packet.frag_offset());
        let data = packet.payload();
        let end = offset + data.len();
        if end > MAX_LEN - usize::from(packet.header_len())
            || (packet.more_frags() && data.len() % 8 != 0)
        {
            self.dropped += 1;
            return false;
        }
        let index = match self.datagrams.iter().position(|d| d.key == key) {
            Some(i) => i,
            None => {
                let src = key.src;
                let mine = self.datagrams.iter().filter(|d| d.key.src == src).count();
                let victim = if mine >= MAX_PER_SOURCE {
                    Some(src)
                } else if self.datagrams.len() >= MAX_DATAGRAMS {
                    self.largest_source()
                } else {
                    None
                };
                if let Some(victim) = victim {
                    // The table is in arrival order: the first of a source is its oldest.
                    if let Some(i) = self.datagrams.iter().position(|d| d.key.src == victim) {
                        self.datagrams.remove(i);
                        self.dropped += 1;
                    }
                }
                self.datagrams.push(Datagram {
                    key,
                    started: now,
                    header: None,
                    payload: Vec::new(),
                    ranges: Vec::new(),
                    total: None,
                });
                self.datagrams.len() - 1
            }
        };
        let d = &mut self.datagrams[index];
        if d.payload.len() < end {
            d.payload.resize(end, 0);
        }
        d.payload[offset..end].copy_from_slice(data);
        d.add_range(offset, end);
        if offset == 0 {
            let raw: &[u8] = packet.as_ref();
            d.header = Some(raw[..usize::from(packet.header_len())].to_vec());
        }
        if !packet.more_frags() {
            d.total = Some(end);
        }
        if !d.complete() {
            return false;
        }
        let d = self.datagrams.swap_remove(index);
        let header = d
            .header
            .expect("invariant: complete datagrams have a header");
        let total = d
            .total
            .expect("invariant: complete datagrams have a length");
        out.clear();
        out.extend_from_slice(&header);
        out.extend_from_slice(&d.payload[..total]);
        let mut p = Ipv4Packet::new_unchecked(&mut out[..]);
        p.set_total_len((header.len() + total) as u16);
        p.set_more_frags(false);
        p.set_frag_offset(0);
        p.fill_checksum();
        true
    }

    /// The source address with the most datagrams in reassembly.
    fn largest_source(&self) -> Option<Ipv4Addr> {
        let mut counts: Vec<(Ipv4Addr, usize)> = Vec::new();
        for d in &self.datagrams {
            match counts.iter_mut().find(|(src, _)| *src == d.key.src) {
                Some((_, n)) => *n += 1,
                None => counts.push((d.key.src, 1)),
            }
        }
        counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(src, _)| src)
    }

    /// Drops datagrams that ran out of time.
    pub fn expire(&mut self, now: Instant) {
        let before = self.datagrams.len();
        self.datagrams.retain(|d| d.started + TIMEOUT > now);
        self.dropped += (before - self.datagrams.len()) as u64;
    }

    /// When the oldest datagram runs out of time.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.datagrams.iter().map(|d| d.started + TIMEOUT).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::Ipv4Repr;

    /// Splits `payload` into IPv4 fragments of `chunk` payload bytes.
    pub fn fragments(payload: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < payload.len() {
            let end = (offset + chunk).min(payload.len());
            let repr = Ipv4Repr {
                src_addr: Ipv4Addr::new(192, 168, 30, 10),
                dst_addr: Ipv4Addr::new(10, 0, 0, 1),
                next_header: IpProtocol::Udp,
                payload_len: end - offset,
                hop_limit: 64,
            };
            let mut buf = vec![0u8; 20 + end - offset];
            let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
            repr.emit(&mut p, &ChecksumCapabilities::default());
            p.set_ident(0x1234);
            p.set_dont_frag(false);
            p.set_more_frags(end < payload.len());
            p.set_frag_offset(offset as u16);
            p.payload_mut().copy_from_slice(&payload[offset..end]);
            p.fill_checksum();
            out.push(buf);
            offset = end;
        }
        out
    }

    #[test]
    fn reassembles_out_of_order_fragments() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut frags = fragments(&payload, 1480);
        frags.reverse();
        let mut r = Reassembler::default();
        let mut out = Vec::new();
        let now = Instant::from_secs(1);
        let mut done = false;
        for f in &frags {
            done = r.add(&Ipv4Packet::new_checked(&f[..]).unwrap(), now, &mut out);
        }
        assert!(done);
        let p = Ipv4Packet::new_checked(&out[..]).unwrap();
        assert!(p.verify_checksum());
        assert!(!p.more_frags());
        assert_eq!(p.payload(), &payload[..]);
    }

    #[test]
    fn incomplete_datagrams_time_out_and_the_table_is_bounded() {
        let payload = vec![7u8; 3000];
        let frags = fragments(&payload, 1480);
        let mut r = Reassembler::default();
        let mut out = Vec::new();
        assert!(!r.add(
            &Ipv4Packet::new_checked(&frags[0][..]).unwrap(),
            Instant::from_secs(0),
            &mut out
        ));
        assert_eq!(r.next_deadline(), Some(Instant::from_secs(0) + TIMEOUT));
        r.expire(Instant::from_secs(31));
        assert_eq!(r.dropped, 1);
        // The rest arrives too late: never completes.
        for f in &frags[1..] {
            assert!(!r.add(
                &Ipv4Packet::new_checked(&f[..]).unwrap(),
                Instant::from_secs(31),
                &mut out
            ));
        }
        for i in 0..(MAX_DATAGRAMS as u16 + 5) {
            let mut f = frags[0].clone();
            let mut p = Ipv4Packet::new_unchecked(&mut f[..]);
            p.set_ident(i);
            p.fill_checksum();
            r.add(
                &Ipv4Packet::new_checked(&f[..]).unwrap(),
                Instant::from_secs(40),
                &mut out,
            );
        }
        assert!(r.datagrams.len() <= MAX_DATAGRAMS);
    }

    /// `frag` with another source address and identification.
    fn from(frag: &[u8], src: Ipv4Addr, ident: u16) -> Vec<u8> {
        let mut f = frag.to_vec();
        let mut p = Ipv4Packet::new_unchecked(&mut f[..]);
        p.set_src_addr(src);
        p.set_ident(ident);
        p.fill_checksum();
        f
    }

    #[test]
    fn one_source_cannot_push_out_another_sources_datagram() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let frags = fragments(&payload, 1480);
        let (victim, flooder) = (
            Ipv4Addr::new(192, 168, 30, 10),
            Ipv4Addr::new(192, 168, 30, 66),
        );
        let mut r = Reassembler::default();
        let mut out = Vec::new();
        let now = Instant::from_secs(1);
        let add = |r: &mut Reassembler, f: &[u8], out: &mut Vec<u8>| {
            r.add(&Ipv4Packet::new_checked(f).unwrap(), now, out)
        };
        assert!(!add(&mut r, &from(&frags[0], victim, 1), &mut out));
        // The flooder starts datagram after datagram and never ends one.
        for ident in 0..1000 {
            add(&mut r, &from(&frags[0], flooder, ident), &mut out);
        }
        let flooders = r.datagrams.iter().filter(|d| d.key.src == flooder).count();
        assert_eq!(flooders, MAX_PER_SOURCE, "held to its share");
        // The victim's datagram is still there and completes.
        let mut done = false;
        for f in &frags[1..] {
            done = add(&mut r, &from(f, victim, 1), &mut out);
        }
        assert!(done, "the other source's datagram survived the flood");
        assert_eq!(
            Ipv4Packet::new_checked(&out[..]).unwrap().payload(),
            &payload[..]
        );
        // Many sources fill the table: the largest one pays, not the newcomer.
        let mut r = Reassembler::default();
        for n in 0..(MAX_DATAGRAMS as u8) {
            let src = Ipv4Addr::new(192, 168, 30, 100 + n / 4);
            add(&mut r, &from(&frags[0], src, u16::from(n)), &mut out);
        }
        assert_eq!(r.datagrams.len(), MAX_DATAGRAMS);
        add(&mut r, &from(&frags[0], victim, 9), &mut out);
        assert!(r.datagrams.iter().any(|d| d.key.src == victim));
        assert_eq!(r.datagrams.len(), MAX_DATAGRAMS);
    }
}
