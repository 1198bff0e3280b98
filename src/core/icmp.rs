//! ICMP for the virtual host itself: echo requests to its address get an echo reply with the
//! same identifier, sequence number and data. (Echo to outside hosts is the NAT's.)

use std::net::Ipv4Addr;

use hubnat_backend::FrameBatch;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{EthernetAddress, Icmpv4Packet, Icmpv4Repr};

use super::{frame, HostSettings};

/// Handles an ICMP packet addressed to the virtual host. Returns `Some(queued)` when it was an
/// echo request (`queued`: the reply fit the transmit queue); `None` for other ICMP messages
/// (ignored).
pub fn handle_echo(
    payload: &[u8],
    host: &HostSettings,
    src_mac: EthernetAddress,
    src_ip: Ipv4Addr,
    tx: &mut FrameBatch,
) -> Result<Option<bool>, smoltcp::wire::Error> {
    let packet = Icmpv4Packet::new_checked(payload)?;
    let repr = Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default())?;
    let Icmpv4Repr::EchoRequest {
        ident,
        seq_no,
        data,
    } = repr
    else {
        return Ok(None);
    };
    let reply = Icmpv4Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    Ok(Some(frame::push_icmp(
        tx, host.mac, src_mac, host.ip, src_ip, &reply,
    )))
}
