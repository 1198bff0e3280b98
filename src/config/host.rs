//! Host-derived defaults: the host's DNS servers and domain, and the state directory.
//!
//! # Theory of operation
//!
//! A few defaults depend on the machine hubnat runs on:
//!
//! - `dns.upstream`: the `nameserver` lines of `/etc/resolv.conf` (scoped IPv6 addresses such
//!   as `fe80::1%eth0` are skipped: a socket address cannot carry the scope by name);
//! - `dhcp.domain`: the last `domain` or `search` line of `/etc/resolv.conf` (as in glibc, they
//!   replace each other), else the part of the host's fully qualified name after its first dot;
//!   a name that is not a valid DNS name is skipped;
//! - `state.dir`: `/var/lib/hubnat` for root, else `$XDG_STATE_HOME/hubnat` (an absolute one),
//!   else `$HOME/.local/state/hubnat`, else `./hubnat-state`.
//!
//! The parsing is pure (`parse_resolv_conf`, `domain_of_hostname`, `default_state_dir`) and
//! tested on fixed text; only the functions that read the file or ask the kernel for the host
//! name touch the host.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use super::validate::check_dns_name;

/// The file whose `nameserver`, `domain` and `search` lines give host-derived defaults.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// What `/etc/resolv.conf` says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ResolvConf {
    /// `nameserver` lines that parse (scoped IPv6 addresses such as `fe80::1%eth0` do not).
    pub(super) nameservers: Vec<SocketAddr>,
    /// The last `domain` line's name, or the first name of the last `search` line.
    pub(super) domain: Option<String>,
}

pub(super) fn read_resolv_conf() -> ResolvConf {
    std::fs::read_to_string(RESOLV_CONF)
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

pub(super) fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut conf = ResolvConf::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) {
                    conf.nameservers.push(SocketAddr::new(ip, 53));
                }
            }
            // As in glibc, `domain` and `search` replace each other; the last one wins.
            Some("domain") | Some("search") => conf.domain = words.next().map(String::from),
            _ => {}
        }
    }
    conf
}

/// The host's domain: from `/etc/resolv.conf`, else from the FQDN host name; `None` if
/// neither gives a valid domain name.
pub(super) fn host_domain() -> Option<String> {
    let from_resolv = read_resolv_conf().domain;
    from_resolv
        .into_iter()
        .chain(hostname().as_deref().and_then(domain_of_hostname))
        .map(|d| d.trim_end_matches('.').to_string())
        .find(|d| check_dns_name(d).is_ok())
}

/// The part of a fully qualified host name after its first dot.
pub(super) fn domain_of_hostname(hostname: &str) -> Option<String> {
    hostname
        .split_once('.')
        .map(|(_, domain)| domain.to_string())
        .filter(|d| !d.is_empty())
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its length; gethostname NUL-terminates
    // within it or truncates, and we stop at the first NUL or the end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..len].to_vec()).ok()
}

/// The default state directory for a user; see [`StateConfig::dir`].
pub(super) fn default_state_dir(
    euid: u32,
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    if euid == 0 {
        return PathBuf::from("/var/lib/hubnat");
    }
    // The XDG spec says to ignore a relative XDG_STATE_HOME.
    if let Some(xdg) = xdg_state_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
    {
        return xdg.join("hubnat");
    }
    match home.filter(|h| !h.is_empty()) {
        Some(home) => Path::new(&home).join(".local/state/hubnat"),
        None => PathBuf::from("hubnat-state"),
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn resolv_conf_gives_nameservers_and_domain() {
        let conf = parse_resolv_conf(
            "# generated\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\n\
             search first.example second.example\n; comment\noptions edns0\n",
        );
        assert_eq!(
            conf.nameservers,
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().expect("addr"),
                "[2001:db8::53]:53".parse().expect("addr"),
            ]
        );
        assert_eq!(conf.domain.as_deref(), Some("first.example"));
        assert_eq!(
            parse_resolv_conf("search a.example\ndomain b.example\n")
                .domain
                .as_deref(),
            Some("b.example")
        );
        assert_eq!(parse_resolv_conf(""), ResolvConf::default());
    }

    #[test]
    fn hostname_domain_is_after_the_first_dot() {
        assert_eq!(
            domain_of_hostname("box.example.lan").as_deref(),
            Some("example.lan")
        );
        assert_eq!(domain_of_hostname("box"), None);
        assert_eq!(domain_of_hostname("box."), None);
        if let Some(domain) = host_domain() {
            assert!(check_dns_name(&domain).is_ok(), "{domain}");
        }
    }

    #[test]
    fn state_dir_depends_on_the_user() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            default_state_dir(0, os("/x"), os("/root")),
            PathBuf::from("/var/lib/hubnat")
        );
        assert_eq!(
            default_state_dir(1000, os("/x/state"), os("/home/u")),
            PathBuf::from("/x/state/hubnat")
        );
        assert_eq!(
            default_state_dir(1000, os("relative"), os("/home/u")),
            PathBuf::from("/home/u/.local/state/hubnat")
        );
        assert_eq!(
            default_state_dir(1000, None, os("/home/u")),
            PathBuf::from("/home/u/.local/state/hubnat")
        );
        assert_eq!(
            default_state_dir(1000, None, None),
            PathBuf::from("hubnat-state")
        );
    }
}
