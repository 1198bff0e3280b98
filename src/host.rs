//! The host side of the NAT: the operating system's sockets, opened as an ordinary process.
//!
//! Everything here is a thin wrapper: non-blocking sockets registered with async-io's reactor.
//! TCP connects are bounded by [`CONNECT_TIMEOUT`]; UDP flows get a socket each, connected to
//! the remote so the kernel filters what comes back; echo goes through unprivileged ICMP
//! sockets (`SOCK_DGRAM`/`IPPROTO_ICMP`), allowed by `net.ipv4.ping_group_range`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::FutureExt;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::core::nat::IcmpMode;

/// How long an outbound TCP connect may take before the client gets "unreachable".
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to `target`, bounded by [`CONNECT_TIMEOUT`]; the stream has `TCP_NODELAY` (the
/// client's own stack already coalesces, hubnat should not delay what it relays).
pub async fn tcp_connect(target: SocketAddr) -> io::Result<Async<TcpStream>> {
    let connect = async { Async::<TcpStream>::connect(target).await };
    let timeout = async {
        Timer::after(CONNECT_TIMEOUT).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
    };
    let stream = connect.or(timeout).await?;
    stream.get_ref().set_nodelay(true)?;
    Ok(stream)
}

/// Makes dropping `stream` send a RST instead of a FIN.
pub fn set_reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// A UDP socket connected to `target`.
pub fn udp_connect(target: SocketAddr) -> io::Result<Async<UdpSocket>> {
    let bind: SocketAddr = match target {
        SocketAddr::V4(_) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => "[::]:0".parse().expect("invariant: literal"),
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(target)?;
    Async::new(socket)
}

/// An unbound UDP socket for DNS queries of one address family.
pub fn udp_any(v6: bool) -> io::Result<Async<UdpSocket>> {
    let bind: SocketAddr = if v6 {
        "[::]:0".parse()
    } else {
        "0.0.0.0:0".parse()
    }
    .expect("invariant: literal");
    Async::new(UdpSocket::bind(bind)?)
}

/// An unprivileged ICMP socket connected to `target`.
pub fn ping_socket(target: Ipv4Addr) -> io::Result<Async<Socket>> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4))?;
    socket.connect(&SockAddr::from(SocketAddrV4::new(target, 0)))?;
    socket.set_nonblocking(true)?;
    Async::new(socket)
}

/// Whether this process may open ICMP sockets; decides the NAT's [`IcmpMode`].
pub fn probe_icmp_mode() -> (IcmpMode, Option<io::Error>) {
    match Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4)) {
        Ok(_) => (IcmpMode::Real, None),
        Err(e) => (IcmpMode::Synthesized, Some(e)),
    }
}

/// Writes an echo request (type 8) with `seq` and `data` into `out`; the kernel fills in the
/// identifier and the checksum of a ping socket.
pub fn echo_request(out: &mut Vec<u8>, seq: u16, data: &[u8]) {
    out.clear();
    out.extend_from_slice(&[8, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(data);
}

/// Raises the soft limit of open files to the hard limit: every NAT session holds a socket.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(raised.rlim_cur);
        }
    }
    Ok(lim.rlim_cur)
}
