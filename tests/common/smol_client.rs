//! A client host made of smoltcp (its DHCPv4 client and ICMP sockets), attached to a port of
//! hubnat's in-memory hub. Nobody on this project wrote that DHCP client: it judges the server.

use std::net::Ipv4Addr;

use hubnat_hub::MemoryPort;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{dhcpv4, icmp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, Ipv4Address,
    Ipv4Cidr,
};

/// A smoltcp device over a memory hub port.
pub struct PortDevice {
    pub port: MemoryPort,
    buf: Vec<u8>,
}

pub struct Rx(Vec<u8>);
pub struct Tx<'a>(&'a MemoryPort);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.try_send(&buf);
        r
    }
}

impl Device for PortDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(Rx, Tx<'_>)> {
        if self.port.try_recv(&mut self.buf) {
            Some((Rx(std::mem::take(&mut self.buf)), Tx(&self.port)))
        } else {
            None
        }
    }

    fn transmit(&mut self, _t: Instant) -> Option<Tx<'_>> {
        Some(Tx(&self.port))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// What the client got from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    pub address: Ipv4Cidr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub lease_secs: Option<u32>,
    pub domain: Option<String>,
}

pub struct SmolClient {
    pub mac: EthernetAddress,
    pub device: PortDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    dhcp: SocketHandle,
    icmp: SocketHandle,
    pub got: Option<Got>,
}

impl SmolClient {
    pub fn new(port: MemoryPort, mac: [u8; 6], now: Instant) -> Self {
        let mac = EthernetAddress(mac);
        let mut device = PortDevice {
            port,
            buf: Vec::new(),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(mac));
        config.random_seed = u64::from_le_bytes([
            mac.0[0], mac.0[1], mac.0[2], mac.0[3], mac.0[4], mac.0[5], 7, 9,
        ]);
        let iface = Interface::new(config, &mut device, now);
        let mut sockets = SocketSet::new(Vec::new());
        let mut dhcp = dhcpv4::Socket::new();
        // Retry DISCOVER quickly: a test waits for a pool slot to free up.
        let mut retry = dhcpv4::RetryConfig::default();
        retry.discover_timeout = smoltcp::time::Duration::from_millis(300);
        dhcp.set_retry_config(retry);
        // smoltcp asks for 1, 3 and 6 by default; ask for the domain name (15) too.
        dhcp.set_parameter_request_list(&[1, 3, 6, 15]);
        // Keep the ACK so the test can read every option, not just the ones smoltcp parses.
        dhcp.set_receive_packet_buffer(Box::leak(vec![0u8; 1500].into_boxed_slice()));
        let dhcp = sockets.add(dhcp);
        let icmp_rx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 2048]);
        let icmp_tx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 2048]);
        let mut icmp_socket = icmp::Socket::new(icmp_rx, icmp_tx);
        icmp_socket
            .bind(icmp::Endpoint::Ident(0x4242))
            .expect("bind icmp");
        let icmp = sockets.add(icmp_socket);
        SmolClient {
            mac,
            device,
            iface,
            sockets,
            dhcp,
            icmp,
            got: None,
        }
    }

    /// Polls the stack; returns true when the DHCP client has (just) been configured.
    pub fn poll(&mut self, now: Instant) -> bool {
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        let event = self.sockets.get_mut::<dhcpv4::Socket>(self.dhcp).poll();
        match event {
            Some(dhcpv4::Event::Configured(cfg)) => {
                let mut lease_secs = None;
                let mut domain = None;
                if let Some(packet) = &cfg.packet {
                    for opt in packet.options() {
                        match opt.kind {
                            51 if opt.data.len() == 4 => {
                                lease_secs = Some(u32::from_be_bytes(opt.data.try_into().unwrap()))
                            }
                            15 => domain = Some(String::from_utf8_lossy(opt.data).into_owned()),
                            _ => {}
                        }
                    }
                }
                let got = Got {
                    address: cfg.address,
                    router: cfg.router,
                    dns: cfg.dns_servers.iter().copied().collect(),
                    server: cfg.server.address,
                    lease_secs,
                    domain,
                };
                self.iface.update_ip_addrs(|addrs| {
                    addrs.clear();
                    addrs.push(IpCidr::Ipv4(cfg.address)).unwrap();
                });
                if let Some(router) = cfg.router {
                    self.iface
                        .routes_mut()
                        .add_default_ipv4_route(router)
                        .unwrap();
                }
                self.got = Some(got);
                true
            }
            Some(dhcpv4::Event::Deconfigured) => {
                self.got = None;
                self.iface.update_ip_addrs(|a| a.clear());
                false
            }
            None => false,
        }
    }

    /// Adds a TCP socket connecting from `local_port` to `remote`.
    pub fn tcp_connect(&mut self, remote: std::net::SocketAddrV4, local_port: u16) -> SocketHandle {
        use smoltcp::socket::tcp;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; 256 * 1024]),
            tcp::SocketBuffer::new(vec![0u8; 256 * 1024]),
        );
        socket
            .connect(
                self.iface.context(),
                (IpAddress::Ipv4(*remote.ip()), remote.port()),
                local_port,
            )
            .expect("tcp connect");
        self.sockets.add(socket)
    }

    /// The TCP socket `handle`.
    pub fn tcp(&mut self, handle: SocketHandle) -> &mut smoltcp::socket::tcp::Socket<'static> {
        self.sockets.get_mut::<smoltcp::socket::tcp::Socket>(handle)
    }

    /// Queues an echo request to `dst`.
    pub fn send_ping(&mut self, dst: Ipv4Address, seq: u16) {
        let socket = self.sockets.get_mut::<icmp::Socket>(self.icmp);
        let repr = Icmpv4Repr::EchoRequest {
            ident: 0x4242,
            seq_no: seq,
            data: b"hubnat-ping",
        };
        let buf = socket
            .send(repr.buffer_len(), IpAddress::Ipv4(dst))
            .expect("icmp send buffer");
        let mut pkt = Icmpv4Packet::new_unchecked(buf);
        repr.emit(&mut pkt, &smoltcp::phy::ChecksumCapabilities::default());
    }

    /// Takes an echo reply, if one arrived: (from, seq).
    pub fn take_pong(&mut self) -> Option<(IpAddress, u16)> {
        let socket = self.sockets.get_mut::<icmp::Socket>(self.icmp);
        let (payload, from) = socket.recv().ok()?;
        let pkt = Icmpv4Packet::new_checked(payload).ok()?;
        match Icmpv4Repr::parse(&pkt, &Default::default()).ok()? {
            Icmpv4Repr::EchoReply { seq_no, data, .. } if data == b"hubnat-ping" => {
                Some((from, seq_no))
            }
            _ => None,
        }
    }
}

/// Polls every client until each is configured; panics naming the first one without a lease
/// after `limit`. Returns what each got, in order.
pub fn acquire_all(clients: &mut [&mut SmolClient], limit: std::time::Duration) -> Vec<Got> {
    let deadline = std::time::Instant::now() + limit;
    while clients.iter().any(|c| c.got.is_none()) {
        if std::time::Instant::now() >= deadline {
            let c = clients
                .iter()
                .find(|c| c.got.is_none())
                .expect("invariant: one is missing");
            panic!("client {} got no lease within {limit:?}", c.mac);
        }
        for c in clients.iter_mut() {
            c.poll(Instant::now());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    clients
        .iter()
        .map(|c| c.got.clone().expect("invariant: configured"))
        .collect()
}

/// Polls `client` until it is configured, or panics after `limit`.
pub fn acquire(client: &mut SmolClient, limit: std::time::Duration) -> Got {
    acquire_all(&mut [client], limit).remove(0)
}

/// Polls `client` for `period` and says whether it got configured.
pub fn try_acquire(client: &mut SmolClient, period: std::time::Duration) -> Option<Got> {
    let deadline = std::time::Instant::now() + period;
    while std::time::Instant::now() < deadline {
        client.poll(Instant::now());
        if client.got.is_some() {
            return client.got.clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    None
}
