//! Host-derived defaults: the host's DNS servers and domain, and the state directory.
//!
//! # Theory of operation
//!
//! A few defaults depend on the machine hubnat runs on. Two of them are read by the loader, as
//! a layer of their own between the built-in defaults and the file ([`HostDefaults`], asked for
//! with [`Sources::host`](super::Sources::host)), so that a file, a variable or a flag still
//! overrides them and an error can say "from /etc/resolv.conf":
//!
//! - `dns.upstream`: the `nameserver` lines of `/etc/resolv.conf` (scoped IPv6 addresses such
//!   as `fe80::1%eth0` are skipped: a socket address cannot carry the scope by name);
//! - `dhcp.domain`: the last `domain` or `search` line of `/etc/resolv.conf` (as in glibc, they
//!   replace each other), else the part of the host's fully qualified name after its first dot;
//!   a name that is not a valid DNS name is skipped.
//!
//! [`Config::default()`](super::Config) reads neither: it is the same on every machine. It does
//! still pick the default `state.dir` from the user it runs as and the environment:
//! `/var/lib/hubnat` for root, else `$XDG_STATE_HOME/hubnat` (an absolute one), else
//! `$HOME/.local/state/hubnat`, else `./hubnat-state`.
//!
//! The parsing is pure ([`HostDefaults::from_host`], `parse_resolv_conf`, `domain_of_hostname`,
//! `default_state_dir`) and tested on fixed text; only [`HostDefaults::read`] reads the file
//! and asks the kernel for the host name.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use super::validate::check_dns_name;

/// The file whose `nameserver`, `domain` and `search` lines give host-derived defaults.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The defaults this host gives, as the loader's host layer supplies them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostDefaults {
    /// For `dns.upstream`: the `nameserver` lines of `/etc/resolv.conf` that parse, port 53.
    pub nameservers: Vec<SocketAddr>,
    /// For `dhcp.domain`: the host's domain, and where it was found.
    pub domain: Option<HostDomain>,
}

/// The host's domain name, and where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostDomain {
    /// A valid DNS name, without a trailing dot.
    pub name: String,
    /// Where it was found, as an error message names a source: `"/etc/resolv.conf"`, or
    /// `"the host name box.example.lan"`.
    pub source: String,
}

impl HostDefaults {
    /// Reads `/etc/resolv.conf` (a missing or unreadable file gives nothing) and the host name.
    pub fn read() -> HostDefaults {
        let resolv_conf = std::fs::read_to_string(RESOLV_CONF).ok();
        HostDefaults::from_host(resolv_conf.as_deref(), hostname().as_deref())
    }

    /// The defaults given by the text of `/etc/resolv.conf` and the host name. Pure.
    pub fn from_host(resolv_conf: Option<&str>, hostname: Option<&str>) -> HostDefaults {
        let conf = resolv_conf.map(parse_resolv_conf).unwrap_or_default();
        let from_resolv = conf.domain.map(|d| (d, RESOLV_CONF.to_string()));
        let from_hostname = hostname.and_then(|h| {
            domain_of_hostname(h).map(|d| (d, format!("the host name {}", h.trim_end_matches('.'))))
        });
        let domain = from_resolv
            .into_iter()
            .chain(from_hostname)
            .map(|(d, source)| (d.trim_end_matches('.').to_string(), source))
            .find(|(d, _)| check_dns_name(d).is_ok())
            .map(|(name, source)| HostDomain { name, source });
        HostDefaults {
            nameservers: conf.nameservers,
            domain,
        }
    }
}

/// What `/etc/resolv.conf` says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ResolvConf {
    /// `nameserver` lines that parse (scoped IPv6 addresses such as `fe80::1%eth0` do not).
    nameservers: Vec<SocketAddr>,
    /// The last `domain` line's name, or the first name of the last `search` line.
    domain: Option<String>,
}

fn parse_resolv_conf(text: &str) -> ResolvConf {
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

/// The part of a fully qualified host name after its first dot.
fn domain_of_hostname(hostname: &str) -> Option<String> {
    hostname
        .split_once('.')
        .map(|(_, domain)| domain.to_string())
        .filter(|d| !d.is_empty())
}

/// The host name the kernel gives (`gethostname`), if it is UTF-8.
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

/// The default state directory for a user; see [`StateConfig::dir`](super::StateConfig::dir).
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
    fn host_defaults_take_the_domain_from_resolv_conf_then_the_host_name() {
        let both = HostDefaults::from_host(
            Some("nameserver 192.0.2.53\nsearch corp.example.\n"),
            Some("box.home.example"),
        );
        assert_eq!(
            both,
            HostDefaults {
                nameservers: vec!["192.0.2.53:53".parse().expect("addr")],
                domain: Some(HostDomain {
                    name: "corp.example".into(),
                    source: "/etc/resolv.conf".into(),
                }),
            }
        );
        // No domain in resolv.conf, or an invalid one: the host name's.
        for conf in [
            None,
            Some("nameserver 192.0.2.53\n"),
            Some("domain bad_name\n"),
        ] {
            let d = HostDefaults::from_host(conf, Some("box.home.example."));
            assert_eq!(
                d.domain,
                Some(HostDomain {
                    name: "home.example".into(),
                    source: "the host name box.home.example".into(),
                }),
                "{conf:?}"
            );
        }
        // A short host name and no resolv.conf give nothing at all.
        assert_eq!(
            HostDefaults::from_host(None, Some("box")),
            HostDefaults::default()
        );
        assert_eq!(HostDefaults::from_host(None, None), HostDefaults::default());
    }

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
        if let Some(domain) = HostDefaults::read().domain {
            assert!(check_dns_name(&domain.name).is_ok(), "{domain:?}");
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
