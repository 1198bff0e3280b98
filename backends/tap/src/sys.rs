//! Interface configuration through the classic `SIOC*IF*` ioctls, and the kernel's name rules.
//!
//! The ioctls go through an `AF_INET` datagram socket opened for the purpose and closed right
//! after. A socket belongs to the network namespace of the *thread* that creates it, which is
//! also the namespace the TAP device was created in when the same thread opened it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The kernel's limit on interface names, terminating NUL included (`IFNAMSIZ`).
const IFNAMSIZ: usize = libc::IFNAMSIZ;

/// Checks `name` against the kernel's `dev_valid_name` rules, so that a bad name fails with
/// a clear message instead of being truncated silently (tun-tap copies at most 15 bytes).
///
/// Returns the reason the name is refused.
pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the name is empty");
    }
    if name.len() >= IFNAMSIZ {
        return Err("the name is longer than 15 bytes (the kernel's IFNAMSIZ limit)");
    }
    if name == "." || name == ".." {
        return Err("the name may not be \".\" or \"..\"");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err("the name may not contain '/', ':', NUL or whitespace");
    }
    Ok(())
}

/// An `ifreq` with `ifr_name` set to `name` and the union zeroed.
///
/// `name` must have passed [`check_name`] (it fits with its terminating NUL).
fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers, sockaddrs and a
    // pointer); all-zero bytes are a valid value of every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req
        .ifr_name
        .iter_mut()
        .zip(name.as_bytes().iter().take(IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

/// A throw-away `AF_INET` datagram socket to issue interface ioctls on.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Issues `request` on `sock` with `req`.
fn ifreq_ioctl(sock: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every request used here reads and/or writes one `struct ifreq`, and `req` points
    // to a valid, exclusively borrowed one. `as _` adapts to the libc's request type (musl
    // takes a c_int).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets the MTU of interface `name` (`SIOCSIFMTU`), unless it has it already
/// (`SIOCGIFMTU`): a persistent device made for an ordinary user (`ip tuntap add ... user U`)
/// and configured by root can then be used without CAP_NET_ADMIN.
pub(crate) fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let mtu = libc::c_int::try_from(mtu)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "MTU out of range"))?;
    let sock = control_socket()?;
    let mut req = ifreq_for(name);
    ifreq_ioctl(&sock, libc::SIOCGIFMTU, &mut req)?;
    // SAFETY: SIOCGIFMTU succeeded, so the kernel wrote ifru_mtu.
    if unsafe { req.ifr_ifru.ifru_mtu } == mtu {
        return Ok(());
    }
    req.ifr_ifru.ifru_mtu = mtu;
    ifreq_ioctl(&sock, libc::SIOCSIFMTU, &mut req)
}

/// Sets `IFF_UP` on interface `name`, keeping its other flags (`SIOCGIFFLAGS` then
/// `SIOCSIFFLAGS`).
pub(crate) fn set_up(name: &str) -> io::Result<()> {
    let sock = control_socket()?;
    let mut req = ifreq_for(name);
    ifreq_ioctl(&sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS succeeded, so the kernel wrote ifru_flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ifreq_ioctl(&sock, libc::SIOCSIFFLAGS, &mut req)
}

/// Opens `/dev/net/tun` and attaches it to the TAP device `name` (created if missing) with
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: each frame read or written is preceded by a
/// `virtio_net_hdr`. Returns the descriptor and the device's name (the kernel's choice for a
/// `%d` in `name`). `name` must have passed [`check_name`].
pub(crate) fn open_vnet(name: &str) -> io::Result<(OwnedFd, String)> {
    // SAFETY: open(2) with a NUL-terminated path; no memory-safety preconditions.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq_for(name);
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is valid and exclusive.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETIFF as _,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let name: String = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8 as char)
        .collect();
    Ok((fd, name))
}

/// Tells the kernel which offloads the reader of `fd` handles (`TUNSETOFFLOAD`): with
/// `TUN_F_CSUM | TUN_F_TSO4`, frames may come with partial checksums and as TCP/IPv4
/// super-frames.
pub(crate) fn set_offload(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags).
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD as _,
            flags as libc::c_ulong,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::check_name;

    #[test]
    fn names_follow_the_kernel_rules() {
        assert!(check_name("hubnat0").is_ok());
        assert!(check_name("tap%d").is_ok());
        assert!(check_name("abcdefghijklmno").is_ok()); // 15 bytes
        assert!(check_name("abcdefghijklmnop").is_err()); // 16 bytes
        assert!(check_name("").is_err());
        assert!(check_name(".").is_err());
        assert!(check_name("..").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("a:b").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("a\0b").is_err());
    }
}
