//! The host side of the NAT: the operating system's sockets, opened as an ordinary process.
//!
//! Everything here is a thin wrapper: non-blocking sockets for the driver's reactor
//! ([`hubnat_backend::rt`]).
//! TCP connects are bounded by [`CONNECT_TIMEOUT`]; UDP flows get a socket each, connected to
//! the remote so the kernel filters what comes back, with their ICMP errors queued on them
//! (`IP_RECVERR`) for the client; echo goes through unprivileged ICMP sockets
//! (`SOCK_DGRAM`/`IPPROTO_ICMP`), allowed by `net.ipv4.ping_group_range`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use futures_lite::FutureExt;
use hubnat_backend::rt::{Io, Timer};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::core::nat::IcmpMode;

/// How long an outbound TCP connect may take before the client gets "unreachable".
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to `target`, bounded by [`CONNECT_TIMEOUT`]; the stream has `TCP_NODELAY` (the
/// client's own stack already coalesces, hubnat should not delay what it relays).
pub async fn tcp_connect(target: SocketAddr) -> io::Result<Io<TcpStream>> {
    let timeout = async {
        Timer::after(CONNECT_TIMEOUT).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
    };
    let stream = hubnat_backend::rt::tcp_connect(target).or(timeout).await?;
    stream.get_ref().set_nodelay(true)?;
    Ok(stream)
}

/// Makes dropping `stream` send a RST instead of a FIN.
pub fn set_reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// A UDP socket connected to `target`, with `IP_RECVERR` (`IPV6_RECVERR`): every ICMP error
/// about what it sent is queued on it, host and network unreachable included, which a UDP
/// socket reports only with that option (without it, only port unreachable). Read them with
/// [`udp_take_error`]: the socket stays readable until its error queue is empty.
pub fn udp_connect(target: SocketAddr) -> io::Result<Io<UdpSocket>> {
    let bind: SocketAddr = match target {
        SocketAddr::V4(_) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => "[::]:0".parse().expect("invariant: literal"),
    };
    let socket = UdpSocket::bind(bind)?;
    let (level, name) = match target {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_RECVERR),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVERR),
    };
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on an open socket with a pointer to a local int and its size.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.connect(target)?;
    Io::new(socket)
}

/// The next error on the error queue of a socket from [`udp_connect`] (the errno of an ICMP
/// error such as EHOSTUNREACH, or of a local one), or `None` when the queue is empty. Clears
/// the socket's pending error once the queue is empty, so that the errors read here are not
/// read again from `recv`.
pub fn udp_take_error(socket: &UdpSocket) -> Option<io::Error> {
    // Room for one cmsghdr with a sock_extended_err and the offender's sockaddr_in6.
    let mut control = [0u64; 16];
    let mut data = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers); the pointers set below point
    // to locals that outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg on an open socket with a msghdr whose buffers are valid for their sizes.
    let n = unsafe {
        libc::recvmsg(
            socket.as_raw_fd(),
            &mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        // Empty (EAGAIN), or nothing to read at all: clear what `recv` would report again.
        let _ = socket.take_error();
        return None;
    }
    // SAFETY: the kernel filled `msg.msg_control` with `msg_controllen` bytes of cmsgs; the
    // CMSG_* macros stay within them, and a sock_extended_err is read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if (c.cmsg_level, c.cmsg_type) == (libc::IPPROTO_IP, libc::IP_RECVERR)
                || (c.cmsg_level, c.cmsg_type) == (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
            {
                let ee: libc::sock_extended_err =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                return Some(io::Error::from_raw_os_error(ee.ee_errno as i32));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // A queued entry without its cmsg (the control buffer was too small): say what we can.
    Some(io::Error::other("an error queued on the socket"))
}

/// A fresh UDP socket for one DNS query to `upstream`: on a port of its own (the kernel picks
/// it at random from the ephemeral range), connected to the upstream so that the kernel drops
/// datagrams from anyone else. A blind spoofer must guess the port as well as the query's id.
pub fn dns_query_socket(upstream: SocketAddr) -> io::Result<Io<UdpSocket>> {
    let bind: SocketAddr = match upstream {
        SocketAddr::V4(_) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => "[::]:0".parse().expect("invariant: literal"),
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(upstream)?;
    Io::new(socket)
}

/// An unprivileged ICMP socket connected to `target`.
pub fn ping_socket(target: Ipv4Addr) -> io::Result<Io<Socket>> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4))?;
    socket.connect(&SockAddr::from(SocketAddrV4::new(target, 0)))?;
    socket.set_nonblocking(true)?;
    Io::new(socket)
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

/// The process's resident memory, bytes (`/proc/self/statm`).
pub fn resident_memory() -> io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::other("/proc/self/statm has no resident size"))?;
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    Ok(pages * page)
}

/// Gives the allocator's free heap memory back to the system (glibc's `malloc_trim`): after
/// many sessions end, their small allocations are free but stay in the heap, resident, until
/// then. Costs a walk of the heap; call it when much has just been freed.
pub fn give_back_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The size from which glibc's malloc gives every allocation its own mapping; see
/// [`fix_mmap_threshold`].
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`], for the whole process, so that every
/// TCP session buffer (`nat.tcp_buffer`, 1 MiB by default) is a mapping of its own: its pages
/// cost memory only once data has been written to them, and all of it goes back to the system
/// when the session ends. Left to itself, glibc raises the threshold as large blocks are freed,
/// and then serves the buffers from its heap, zeroing (so touching) every byte up front and
/// keeping the memory after the sessions end: 2,000 sessions with a few bytes each took 533
/// MiB instead of 17. `hubnat run` calls it first; an embedder may too.
pub fn fix_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter; M_MMAP_THRESHOLD takes a size.
    // (With another C library this is a no-op returning 0.)
    let threshold = libc::c_int::try_from(MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX);
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, threshold) };
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

/// The host's own addresses: every address of every interface of this network namespace,
/// loopback addresses excluded (the NAT's loopback rule covers them), sorted. The NAT refuses
/// them as destinations unless `nat.allow_host_addresses`; an error leaves the list empty.
pub fn own_addresses() -> io::Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs with a valid pointer to a local; on success the list is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed; `ifa_addr`
        // is null or points to a sockaddr of the family it names, which fixes its size.
        unsafe {
            let ifa = &*cur;
            let sa = ifa.ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in>());
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in6>());
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: the list getifaddrs returned, freed once; nothing points into it any more.
    unsafe { libc::freeifaddrs(list) };
    out.retain(|ip| !ip.is_loopback() && !ip.is_unspecified());
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_leave_out_the_loopback() {
        let own = own_addresses().expect("getifaddrs");
        assert!(own.iter().all(|ip| !ip.is_loopback()), "{own:?}");
        assert!(own.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
    }
}
