//! The seccomp filter of `hubnat run` (`process.seccomp`): once start-up is done, every thread
//! may make only the system calls hubnat is known to make.
//!
//! # Theory of operation
//!
//! `hubnat run` opens everything first: the backend (TAP device, packet socket or hub
//! socket), the control API's socket, the state directory with its lock, the security log,
//! the capture file; then it gives up root (`crate::privilege`). Then [`install`] puts two
//! seccomp-BPF filters on **every thread of the process at once** (`SECCOMP_FILTER_FLAG_TSYNC`:
//! the control API's thread and the reactor's, which already run, as well as the main thread);
//! threads started later (the policy threads, a reload's compiler, a SIGHUP reload) inherit
//! them. A filter cannot be taken off again, and `no_new_privs` is set first, as the kernel
//! requires.
//!
//! - The **allow-list** ([`ALLOWED`], by number for the architecture built for): a call not on
//!   it kills the whole process (`SECCOMP_RET_KILL_PROCESS`, seen as SIGSYS; the kernel logs
//!   the call's number) under `process.seccomp = "enforce"`, or goes through and is logged
//!   under `"log"`. Four calls have their arguments checked too: `socket` only for the
//!   address families hubnat uses ([`SOCKET_FAMILIES`]), `ioctl` only for reads and a
//!   descriptor's own flags ([`IOCTL_REQUESTS`]), `prctl` only to name a thread
//!   ([`PRCTL_OPTIONS`]), and `clone` (new threads) only without a flag that makes a namespace
//!   ([`CLONE_NAMESPACE_FLAGS`]).
//! - `clone3` answers `ENOSYS`: its flags are behind a pointer the filter cannot read, and
//!   glibc then makes the thread with `clone`, whose flags it can. This is the second filter
//!   (everything else allowed), because the first one's calls all share one action; the kernel
//!   takes the stricter answer of the two.
//!
//! The list was found by tracing the gateway (`strace -f`, everything after its `seccomp`
//! call) through the integration tests that start `hubnat run`: every backend, DHCP, DNS,
//! the NAT's TCP, UDP and ICMP, the control API and CLI, policy loads, reloads (the API and
//! SIGHUP), traps, timeouts and memory limits, the capture's rotation, lease saving, the
//! security log, the memory limit, the change of user and the shutdown; and by running the
//! rest of them with `process.seccomp = "log"` and reading the kernel's log. That was a debug
//! build; a release build calls into the same glibc and std, but has not been traced yet.
//! README.md ("Running with least privilege") says how to find a missing call. Each group
//! says who makes its calls.
//!
//! Only x86_64 and aarch64 are listed; elsewhere [`install`] installs nothing and says so.

use std::fmt;

use crate::config::SeccompMode;

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// `process.seccomp = "off"`: no filter.
    Off,
    /// This architecture has no list: no filter.
    Unsupported {
        /// The architecture (`std::env::consts::ARCH`).
        arch: &'static str,
    },
    /// The filters are on every thread.
    On {
        /// `Enforce` or `Log`.
        mode: SeccompMode,
        /// How many system calls the allow-list lets through.
        allowed: usize,
    },
}

impl fmt::Display for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Installed::Off => f.write_str("seccomp filter off (process.seccomp = \"off\")"),
            Installed::Unsupported { arch } => write!(
                f,
                "no seccomp filter: hubnat has no system call list for {arch} (only x86_64 and aarch64)"
            ),
            Installed::On {
                mode: SeccompMode::Log,
                allowed,
            } => write!(
                f,
                "seccomp filter on, logging only (process.seccomp = \"log\"): {allowed} system \
                 calls listed, any other goes through and the kernel logs it (dmesg | grep -i seccomp)"
            ),
            Installed::On { allowed, .. } => write!(
                f,
                "seccomp filter on (process.seccomp = \"enforce\"): {allowed} system calls \
                 allowed on every thread, any other kills the process (SIGSYS)"
            ),
        }
    }
}

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("process.seccomp = \"{mode}\": cannot install the seccomp filter: {source}")]
pub struct SeccompError {
    mode: SeccompMode,
    #[source]
    source: seccompiler::Error,
}

/// One system call the allow-list lets through, by name (for messages) and number.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// Its name, as in `man 2`.
    pub name: &'static str,
    /// Its number on this architecture.
    pub number: i64,
}

macro_rules! calls {
    ($($name:ident),* $(,)?) => {
        &[$(Call { name: stringify!($name), number: libc::$name as i64 }),*]
    };
}

/// The address families `socket` may be called with.
pub const SOCKET_FAMILIES: &[(&str, i32)] = &[
    // The hub socket's peers over Unix sockets, glibc's name service (nscd) when the control
    // API names a peer's user.
    ("AF_UNIX", libc::AF_UNIX),
    // The NAT's TCP, UDP and ping sockets, DNS upstreams, the hub socket over TCP, metrics.
    ("AF_INET", libc::AF_INET),
    ("AF_INET6", libc::AF_INET6),
    // getifaddrs: the host's own addresses (the NAT refuses them as destinations).
    ("AF_NETLINK", libc::AF_NETLINK),
    // The raw backend reopens its packet socket after its interface went down and up.
    ("AF_PACKET", libc::AF_PACKET),
];

/// The `ioctl` requests hubnat makes once started, all of them reads or a descriptor's own
/// flags: std's `set_nonblocking` (FIONBIO), descriptor flags and queue lengths, terminal
/// queries (is standard error a terminal), and interface queries by name (the raw backend
/// finding its interface again). Not a request that changes an interface, a TAP device or a
/// terminal's input (TIOCSTI).
// The casts: the requests' type is the C library's (an unsigned long in glibc, an int in musl).
#[allow(clippy::unnecessary_cast)]
pub const IOCTL_REQUESTS: &[(&str, u64)] = &[
    ("FIONBIO", libc::FIONBIO as u64),
    ("FIONREAD", libc::FIONREAD as u64),
    ("FIOCLEX", libc::FIOCLEX as u64),
    ("FIONCLEX", libc::FIONCLEX as u64),
    ("TCGETS", libc::TCGETS as u64),
    ("TIOCGWINSZ", libc::TIOCGWINSZ as u64),
    ("SIOCGIFINDEX", libc::SIOCGIFINDEX as u64),
    ("SIOCGIFNAME", libc::SIOCGIFNAME as u64),
    ("SIOCGIFFLAGS", libc::SIOCGIFFLAGS as u64),
    ("SIOCGIFMTU", libc::SIOCGIFMTU as u64),
    ("SIOCGIFHWADDR", libc::SIOCGIFHWADDR as u64),
];

/// The `prctl` operations hubnat makes once started: naming a new thread (std), and naming an
/// anonymous mapping (newer glibc's malloc may).
pub const PRCTL_OPTIONS: &[(&str, i32)] = &[
    ("PR_SET_NAME", libc::PR_SET_NAME),
    ("PR_GET_NAME", libc::PR_GET_NAME),
    ("PR_SET_VMA", libc::PR_SET_VMA),
];

/// `clone` flags that make a namespace: a thread never needs one.
pub const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// The system calls hubnat makes once started, by who makes them. `socket`, `ioctl`, `prctl`
/// and `clone` are in the list with their arguments checked (see the module's documentation).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub const ALLOWED: &[(&str, &[Call])] = &[
    (
        // Every thread: the executors and the reactors (the gateway's own, hubnat_backend::rt:
        // epoll and an eventfd; async-io's for the control API and the hub socket: polling's
        // epoll with a timerfd for its timeouts), channels and locks,
        // timers, thread start and end (std, glibc), the epoch ticker of the policies.
        "threads, waiting and time",
        calls![
            SYS_futex,
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_epoll_pwait,
            SYS_epoll_pwait2,
            SYS_eventfd2,
            SYS_timerfd_create,
            SYS_timerfd_settime,
            SYS_timerfd_gettime,
            SYS_pipe2,
            SYS_ppoll,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_sched_yield,
            SYS_sched_getaffinity,
            SYS_clone,
            SYS_clone3,
            SYS_set_robust_list,
            SYS_rseq,
            SYS_gettid,
            SYS_getpid,
            SYS_exit,
            SYS_exit_group,
            SYS_restart_syscall,
            SYS_prctl,
        ],
    ),
    (
        // The allocator (glibc malloc: every TCP buffer is a mapping of its own), thread
        // stacks and their guard pages, and wasmtime: linear memories reserved and grown,
        // machine code made executable, memory given back when a store ends, a module's
        // initial memory image in a sealed memfd mapped copy-on-write; a quiet TCP
        // connection's buffer pages given back (madvise), after counting them (mincore).
        "memory",
        calls![
            SYS_mmap,
            SYS_munmap,
            SYS_mprotect,
            SYS_madvise,
            SYS_mincore,
            SYS_mremap,
            SYS_brk,
            SYS_membarrier,
            SYS_memfd_create,
        ],
    ),
    (
        // std's stack-overflow guard on each new thread, async-signal's SIGINT/SIGTERM/SIGHUP
        // handler, wasmtime's trap handlers (a policy that traps, runs past its deadline or
        // out of memory: SIGSEGV/SIGILL/SIGFPE caught and turned into an error), and an abort.
        "signals",
        calls![
            SYS_rt_sigaction,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_sigaltstack,
            SYS_tgkill,
        ],
    ),
    (
        // Lease saving (write, fsync, rename), the security log and its rotation, the capture
        // file and its rotation (a new file is made owner-only with fchmod), the policies'
        // compiled-code cache, the configuration and policy modules read again by a reload,
        // /proc/self/statm for nat.memory_limit, the state directory's spare descriptors.
        "files",
        calls![
            SYS_read,
            SYS_write,
            SYS_readv,
            SYS_writev,
            SYS_pread64,
            SYS_pwrite64,
            SYS_openat,
            SYS_close,
            SYS_fstat,
            SYS_newfstatat,
            SYS_statx,
            SYS_lseek,
            SYS_fsync,
            SYS_fdatasync,
            SYS_ftruncate,
            SYS_fchmod,
            SYS_renameat2,
            SYS_unlinkat,
            SYS_mkdirat,
            SYS_readlinkat,
            SYS_getdents64,
            SYS_fcntl,
            SYS_flock,
            SYS_dup,
            SYS_dup3,
            SYS_ioctl,
            SYS_faccessat,
            SYS_faccessat2,
            SYS_getcwd,
        ],
    ),
    (
        // The NAT's host sockets (TCP connect and relay, UDP flows, ping sockets and their
        // error queues), DNS upstreams, the control API's and the hub socket's connections
        // (SO_PEERCRED), getifaddrs over netlink, the raw backend's packet socket.
        "sockets",
        calls![
            SYS_socket,
            SYS_socketpair,
            SYS_connect,
            SYS_bind,
            SYS_listen,
            SYS_accept4,
            SYS_sendto,
            SYS_recvfrom,
            SYS_sendmsg,
            SYS_recvmsg,
            SYS_sendmmsg,
            SYS_recvmmsg,
            SYS_shutdown,
            SYS_getsockopt,
            SYS_setsockopt,
            SYS_getsockname,
            SYS_getpeername,
        ],
    ),
    (
        // DNS query ids and TCP sequence numbers (getrandom), the uid in the security log,
        // the open-file limit, the host name for messages.
        "process",
        calls![
            SYS_getrandom,
            SYS_getuid,
            SYS_geteuid,
            SYS_getgid,
            SYS_getegid,
            SYS_prlimit64,
            SYS_uname,
        ],
    ),
    #[cfg(target_arch = "x86_64")]
    (
        // The same, under the older numbers glibc and std still use on x86_64.
        "x86_64 only",
        calls![
            SYS_epoll_wait,
            SYS_poll,
            SYS_pipe,
            SYS_open,
            SYS_stat,
            SYS_lstat,
            SYS_rename,
            SYS_renameat,
            SYS_unlink,
            SYS_mkdir,
            SYS_readlink,
            SYS_access,
            SYS_accept,
            SYS_getrlimit,
            SYS_arch_prctl,
        ],
    ),
];

/// No list on this architecture.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const ALLOWED: &[(&str, &[Call])] = &[];

/// Every call of [`ALLOWED`], in its order.
pub fn allowed_calls() -> impl Iterator<Item = Call> {
    ALLOWED.iter().flat_map(|(_, calls)| calls.iter().copied())
}

/// Installs the filters on every thread of the process (see the module's documentation), or
/// nothing when `mode` is `Off` or the architecture has no list. Call once, when start-up is
/// done: from then on the process cannot open a device, exec a program or gain anything.
pub fn install(mode: SeccompMode) -> Result<Installed, SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(Installed::Off);
    }
    let Some(arch) = target_arch() else {
        return Ok(Installed::Unsupported {
            arch: std::env::consts::ARCH,
        });
    };
    let error = |source: seccompiler::Error| SeccompError { mode, source };
    let (allow_list, clone3) = programs(mode, arch).map_err(error)?;
    // The first filter installed sets no_new_privs (seccompiler does, as the kernel requires
    // of an unprivileged process); `hubnat run` has set it already.
    seccompiler::apply_filter_all_threads(&clone3).map_err(error)?;
    seccompiler::apply_filter_all_threads(&allow_list).map_err(error)?;
    Ok(Installed::On {
        mode,
        allowed: allowed_calls().count(),
    })
}

fn target_arch() -> Option<seccompiler::TargetArch> {
    if cfg!(target_arch = "x86_64") {
        Some(seccompiler::TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Some(seccompiler::TargetArch::aarch64)
    } else {
        None
    }
}

/// The two BPF programs: the allow-list, and `clone3` → `ENOSYS`.
// The casts: system call numbers are a C long, 64 bits only on 64-bit architectures.
#[allow(clippy::unnecessary_cast)]
fn programs(
    mode: SeccompMode,
    arch: seccompiler::TargetArch,
) -> Result<(seccompiler::BpfProgram, seccompiler::BpfProgram), seccompiler::Error> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    let otherwise = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let mut rules = std::collections::BTreeMap::new();
    for call in allowed_calls() {
        rules.insert(call.number, Vec::new());
    }
    // One rule per value of one argument; any of them lets the call through. The kernel
    // reads each of these arguments as an int (ioctl's request as an unsigned int).
    let one_of = |arg: u8, values: &mut dyn Iterator<Item = u64>| {
        values
            .map(|value| {
                SeccompRule::new(vec![SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    value,
                )?])
            })
            .collect::<Result<Vec<_>, _>>()
    };
    // socket(domain, ...)
    let families = &mut SOCKET_FAMILIES.iter().map(|&(_, f)| f as u64);
    rules.insert(libc::SYS_socket as i64, one_of(0, families)?);
    // ioctl(fd, request, ...)
    let requests = &mut IOCTL_REQUESTS.iter().map(|&(_, r)| r);
    rules.insert(libc::SYS_ioctl as i64, one_of(1, requests)?);
    // prctl(option, ...)
    let options = &mut PRCTL_OPTIONS.iter().map(|&(_, o)| o as u64);
    rules.insert(libc::SYS_prctl as i64, one_of(0, options)?);
    // clone(flags, ...): no namespace flag (the same first argument on x86_64 and aarch64).
    rules.insert(
        libc::SYS_clone as i64,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS),
            0,
        )?])?],
    );
    let allow_list = SeccompFilter::new(rules, otherwise, SeccompAction::Allow, arch)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3 as i64, Vec::new())]
            .into_iter()
            .collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok((allow_list.try_into()?, clone3.try_into()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_has_no_call_twice_and_builds() {
        let mut numbers: Vec<i64> = allowed_calls().map(|c| c.number).collect();
        let n = numbers.len();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), n, "a call is listed twice");
        if let Some(arch) = target_arch() {
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                let (list, clone3) = programs(mode, arch).expect("the filters build");
                assert!(list.len() > n && list.len() < 4096, "{}", list.len());
                assert!(!clone3.is_empty());
            }
        }
    }

    #[test]
    fn off_installs_nothing() {
        assert_eq!(install(SeccompMode::Off).unwrap(), Installed::Off);
    }
}
