//! ARP: the virtual host answers requests for its own address, and only for it.
//!
//! Answering for other addresses would steal other hosts' traffic on a shared segment, and a
//! DHCP client that probes its offered address (RFC 5227, sender address 0.0.0.0) would find
//! it "in use" and decline it. Every ARP packet also teaches the neighbour table where its
//! sender is, except one that claims the virtual host's own address from another MAC (ARP
//! spoofing: it is neither answered nor learnt, and the caller counts and reports it).

use std::net::Ipv4Addr;

use hubnat_backend::FrameBatch;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, ETHERNET_HEADER_LEN,
};

/// What an ARP packet asked of the virtual host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOutcome {
    /// A request for our address: answered.
    Answered,
    /// A packet about someone else (or a reply): nothing to send.
    NotForUs,
    /// A request for our address, but the transmit queue was full: no answer.
    QueueFull,
    /// The sender claims our address from another MAC: not answered, not learnt.
    Spoofed(EthernetAddress),
}

/// Parses an ARP payload; returns the sender to learn (if it has an address) and whether the
/// request was for us, in which case the reply is appended to `tx`.
pub fn handle(
    payload: &[u8],
    our_mac: EthernetAddress,
    our_ip: Ipv4Addr,
    tx: &mut FrameBatch,
) -> Result<(ArpOutcome, Option<(Ipv4Addr, EthernetAddress)>), smoltcp::wire::Error> {
    let packet = ArpPacket::new_checked(payload)?;
    let ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = ArpRepr::parse(&packet)?
    else {
        return Err(smoltcp::wire::Error);
    };
    if source_protocol_addr == our_ip && source_hardware_addr != our_mac {
        return Ok((ArpOutcome::Spoofed(source_hardware_addr), None));
    }
    let learn = (!source_protocol_addr.is_unspecified() && source_hardware_addr.is_unicast())
        .then_some((source_protocol_addr, source_hardware_addr));
    if operation != ArpOperation::Request || target_protocol_addr != our_ip {
        return Ok((ArpOutcome::NotForUs, learn));
    }
    // A probe (sender 0.0.0.0) for our own address is answered too: it tells the prober that
    // the address is taken, which is true.
    let reply = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: our_mac,
        source_protocol_addr: our_ip,
        target_hardware_addr: source_hardware_addr,
        target_protocol_addr: source_protocol_addr,
    };
    let pushed = tx.push_built(ETHERNET_HEADER_LEN + reply.buffer_len(), |buf| {
        let eth = EthernetRepr {
            src_addr: our_mac,
            dst_addr: source_hardware_addr,
            ethertype: EthernetProtocol::Arp,
        };
        let mut frame = EthernetFrame::new_unchecked(&mut *buf);
        eth.emit(&mut frame);
        reply.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    });
    let outcome = if pushed {
        ArpOutcome::Answered
    } else {
        ArpOutcome::QueueFull
    };
    Ok((outcome, learn))
}
