//! A bridge from a Linux TAP device to a hub socket, so that a network namespace (or anything
//! else behind a TAP device) can join a hubnat segment served by the `hub` backend.
//!
//! ```text
//! tap_to_hub TAPNAME /path/to/hub.sock
//! ```
//!
//! It creates the TAP device `TAPNAME` (in the network namespace it runs in; needs
//! CAP_NET_ADMIN), connects to the Unix socket, and copies frames both ways in QEMU's
//! `-netdev stream` framing: a 4-byte big-endian length, then the Ethernet frame. Setting the
//! device's MTU and bringing it up is left to the caller (`ip link set TAPNAME mtu M up`).
//! `scripts/bench.sh` uses it to measure hubnat's hub backend (the `hubnat-hub` contender).
//!
//! Two threads, one per direction, with blocking I/O:
//!
//! * TAP → hub: one `read` returns one frame, so the thread reads every frame that is ready
//!   (the descriptor is non-blocking) into one buffer, each after its length prefix, and sends
//!   the buffer with one `write_all` when the TAP has nothing more or the buffer is full.
//! * hub → TAP: reads what the socket has into a buffer, cuts whole frames out of it (a frame
//!   may arrive in several reads), writes each to the TAP device, and keeps the unfinished tail.
//!
//! It ends when either side ends: the hub closes the socket (exit 0), the TAP device goes
//! away or an I/O error happens (exit 1), or the hub sends a length that cannot be a frame
//! (exit 1, with a message). Each frame is copied once more per direction than with hubnat's
//! own TAP backend, and crosses one more process: that is the price of the bridge.

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};

/// An Ethernet header.
const ETH_HEADER: usize = 14;
/// The longest frame: the largest MTU a TAP device takes (65535 − 14) plus the header, as the
/// hub accepts (`hubnat_hub::MAX_WIRE_FRAME` allows 65535 + 14).
const MAX_FRAME: usize = 65_535 + ETH_HEADER;
/// How many framed bytes the TAP → hub thread gathers before one socket write.
const GATHER: usize = 256 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: tap_to_hub TAPNAME /path/to/hub.sock");
        std::process::exit(2);
    }
    let (name, path) = (&args[1], &args[2]);
    let tap = Arc::new(
        open_tap(name).unwrap_or_else(|e| die(&format!("cannot open TAP device {name}: {e}"))),
    );
    let sock = UnixStream::connect(path)
        .unwrap_or_else(|e| die(&format!("cannot connect to {path}: {e}")));
    let sock2 = sock
        .try_clone()
        .unwrap_or_else(|e| die(&format!("cannot clone the socket: {e}")));
    eprintln!("tap_to_hub: {name} <-> {path}");

    // Whichever direction ends first ends the process; its result is the exit status.
    let (done, ended) = mpsc::channel::<Result<(), String>>();
    let (t, d) = (tap.clone(), done.clone());
    std::thread::spawn(move || {
        d.send(tap_to_socket(&t, sock).map_err(|e| format!("TAP -> hub: {e}")))
    });
    std::thread::spawn(move || done.send(socket_to_tap(&tap, sock2)));
    match ended.recv() {
        Ok(Ok(())) => {
            eprintln!("tap_to_hub: the hub closed the connection");
            std::process::exit(0)
        }
        Ok(Err(e)) => die(&e),
        Err(_) => die("both directions ended without a word"),
    }
}

fn die(msg: &str) -> ! {
    eprintln!("tap_to_hub: {msg}");
    std::process::exit(1)
}

/// Creates (or attaches to) the TAP device `name`: plain Ethernet frames (`IFF_NO_PI`), a
/// non-blocking descriptor. The device disappears when the descriptor is closed.
fn open_tap(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "the name must have 1 to 15 bytes",
        ));
    }
    // SAFETY: a NUL-terminated path and plain flags.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req` is.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETIFF as _,
            &mut req as *mut libc::ifreq,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Waits until `fd` is ready for `events` (POLLIN or POLLOUT); an error if it never will be.
fn wait_fd(fd: &File, events: libc::c_short) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
            && p.revents & events == 0
        {
            return Err(io::Error::other("the TAP device is gone"));
        }
        return Ok(());
    }
}

/// TAP → hub: frames, each after its 4-byte big-endian length, gathered into few writes.
fn tap_to_socket(tap: &File, mut sock: UnixStream) -> io::Result<()> {
    let mut out = vec![0u8; GATHER + 4 + MAX_FRAME];
    let mut len = 0; // framed bytes waiting in `out`
    loop {
        // Read the next frame straight after its (not yet written) length prefix.
        match (&*tap).read(&mut out[len + 4..len + 4 + MAX_FRAME]) {
            Ok(0) => return Err(io::Error::other("the TAP device returned end of file")),
            Ok(n) => {
                out[len..len + 4].copy_from_slice(&(n as u32).to_be_bytes());
                len += 4 + n;
                if len >= GATHER {
                    sock.write_all(&out[..len])?; // write_all finishes partial writes
                    len = 0;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Nothing more ready: send what was gathered, or wait for the next frame.
                if len > 0 {
                    sock.write_all(&out[..len])?;
                    len = 0;
                } else {
                    wait_fd(tap, libc::POLLIN)?;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// hub → TAP: cuts length-prefixed frames out of the byte stream and writes each to the TAP.
/// `Ok(())` when the hub closed the connection between frames.
fn socket_to_tap(tap: &File, mut sock: UnixStream) -> Result<(), String> {
    let mut buf = vec![0u8; GATHER + 4 + MAX_FRAME];
    let mut filled = 0; // bytes waiting in buf[..filled]: at most one unfinished frame
    loop {
        let n = match sock.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(()),
            Ok(0) => {
                return Err(format!(
                    "the hub closed the connection in the middle of a frame ({filled} bytes left)"
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("hub -> TAP: reading the socket: {e}")),
        };
        filled += n;
        let mut start = 0;
        while filled - start >= 4 {
            let len = u32::from_be_bytes(buf[start..start + 4].try_into().unwrap()) as usize;
            if !(ETH_HEADER..=MAX_FRAME).contains(&len) {
                return Err(format!("the hub sent a frame length of {len} bytes: not a frame (14 to {MAX_FRAME}); giving up"));
            }
            if filled - start < 4 + len {
                break; // the rest of this frame is still on its way
            }
            write_frame(tap, &buf[start + 4..start + 4 + len])
                .map_err(|e| format!("hub -> TAP: {e}"))?;
            start += 4 + len;
        }
        // Keep the unfinished frame (at most 4 + MAX_FRAME bytes) at the front; the buffer
        // then always has room for at least GATHER more bytes.
        buf.copy_within(start..filled, 0);
        filled -= start;
    }
}

/// Writes one frame to the TAP device (a TAP write takes a whole frame or nothing).
fn write_frame(tap: &File, frame: &[u8]) -> io::Result<()> {
    loop {
        match (&*tap).write(frame) {
            Ok(n) if n == frame.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "short write to the TAP device: {n} of {} bytes",
                    frame.len()
                )))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_fd(tap, libc::POLLOUT)?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
