//! The security log: one line per event that matters to whoever answers for the segment, in the
//! spirit of SecureNAT's. Lines are appended to a file (created mode 0600) and also emitted as
//! `tracing` events with target `security`.
//!
//! A line is `<RFC 3339 time> <SUBSYSTEM> <event>: key=value …`, for example:
//!
//! ```text
//! 2026-11-25T15:04:57.123Z DHCP lease created: id=1 mac=52:54:00:12:34:56 ip=192.168.30.10 hostname="vm1" expires=2026-11-25T17:04:57Z
//! ```
//!
//! # Rotation
//!
//! Before a line would take the file past [`Rotation::max_size`], the file is renamed to
//! `PATH.1` (`PATH.1` to `PATH.2`, and so on; the oldest beyond [`Rotation::max_files`] is
//! removed) and a new `PATH` is started. Several writers may share one path (the gateway's
//! loop and the control API each hold one): before each line a writer checks that `PATH` is
//! still the file it has open, and reopens it when another writer rotated it.
//!
//! # Rate limit
//!
//! A hostile client can make events as fast as it sends frames (a SYN per closed port, a
//! DISCOVER per random MAC). Each kind of line (its subsystem and event, such as `NAT session
//! refused`) may write a burst of [`BURST`] lines, then [`RATE`] a second; lines beyond that
//! are counted, not written (nor sent to `tracing`). The next line written after a kind's
//! budget recovers is preceded by `SECLOG suppressed: kind="NAT session refused" lines=N`;
//! any later line of any kind, or the gateway's stop, writes such summaries for every kind
//! with lines held back. The operator's and the gateway's own lines (`GATEWAY`, `CONTROL`)
//! are never held back.
//!
//! The driver opens the log with [`SecurityLog::open`]; the rotation of a path is registered
//! beforehand with [`configure`] (the binary does it from `log.security_max_size` and
//! `log.security_max_files`). A path never configured rotates at the defaults.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::core::dhcp::{server::fmt_mac, DhcpEvent, Lease};
use crate::core::nat::{FlowKey, NatEvent};
use crate::core::LinkEvent;

/// When the security log rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate before the file would grow past this many bytes; `None`: never.
    pub max_size: Option<u64>,
    /// Files kept, the current one included (at least 1).
    pub max_files: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_size: Some(crate::config::DEFAULT_SECURITY_MAX_SIZE),
            max_files: crate::config::DEFAULT_SECURITY_MAX_FILES,
        }
    }
}

/// Lines of one kind written at once before [`RATE`] applies.
pub const BURST: f64 = 100.0;
/// Lines of one kind written per second once its burst is spent.
pub const RATE: f64 = 10.0;

/// Subsystems whose lines are never held back: the gateway's own and the operator's.
const UNLIMITED: [&str; 2] = ["GATEWAY", "CONTROL"];

/// One kind's budget: a token bucket, and the lines held back since its last line.
#[derive(Debug)]
struct Budget {
    tokens: f64,
    at: Instant,
    suppressed: u64,
}

impl Budget {
    /// Refills for the time since the last look; whether a line may be written.
    fn refill(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * RATE).min(BURST);
        self.at = now;
        self.tokens >= 1.0
    }
}

/// The security log file.
#[derive(Debug)]
pub struct SecurityLog {
    file: File,
    path: PathBuf,
    rotation: Rotation,
    failed: bool,
    /// By kind ("NAT session refused").
    budgets: HashMap<String, Budget>,
    /// Whether some kind has lines held back.
    held: bool,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// `PATH.n`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

impl SecurityLog {
    /// Opens (appends to) the log at `path`, creating it and its directory, with the default
    /// rotation.
    pub fn open(path: &Path) -> io::Result<SecurityLog> {
        Self::open_with(path, Rotation::default())
    }

    /// Opens (appends to) the log at `path` with `rotation`.
    pub fn open_with(path: &Path, rotation: Rotation) -> io::Result<SecurityLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        Ok(SecurityLog {
            file: open_append(path)?,
            path: path.to_owned(),
            rotation: Rotation {
                max_files: rotation.max_files.max(1),
                ..rotation
            },
            failed: false,
            budgets: HashMap::new(),
            held: false,
        })
    }

    /// Makes room for `len` more bytes: reopens `PATH` if another writer rotated it, and
    /// rotates when the line would take the file past the limit.
    fn make_room(&mut self, len: u64) -> io::Result<()> {
        let ours = self.file.metadata()?;
        let current = std::fs::metadata(&self.path).ok();
        let size = match current {
            Some(m) if (m.dev(), m.ino()) == (ours.dev(), ours.ino()) => ours.len(),
            _ => {
                self.file = open_append(&self.path)?;
                self.file.metadata()?.len()
            }
        };
        let Some(max) = self.rotation.max_size else {
            return Ok(());
        };
        if size == 0 || size + len <= max {
            return Ok(());
        }
        let keep = self.rotation.max_files;
        if keep <= 1 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(&self.path, keep - 1));
            for n in (1..keep - 1).rev() {
                let from = numbered(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, numbered(&self.path, n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(&self.path, 1))?;
        }
        self.file = open_append(&self.path)?;
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line, unless its kind is over its rate (see the module's documentation). A
    /// write failure is reported once through `tracing` and does not stop the gateway (the
    /// event is still in the tracing output).
    pub fn write(&mut self, subsystem: &str, event: &str, fields: &str) {
        self.write_at(Instant::now(), subsystem, event, fields);
    }

    /// [`write`](Self::write) at `now` (for the rate limit).
    fn write_at(&mut self, now: Instant, subsystem: &str, event: &str, fields: &str) {
        if self.held {
            self.summarize(now);
        }
        if UNLIMITED.contains(&subsystem) {
            self.append(subsystem, event, fields);
            return;
        }
        let kind = format!("{subsystem} {event}");
        let budget = self.budgets.entry(kind).or_insert(Budget {
            tokens: BURST,
            at: now,
            suppressed: 0,
        });
        if !budget.refill(now) {
            budget.suppressed += 1;
            self.held = true;
            return;
        }
        budget.tokens -= 1.0;
        self.append(subsystem, event, fields);
    }

    /// Writes a `SECLOG suppressed` line for each kind with lines held back whose budget has
    /// recovered; with `force`, for every such kind (on the way out).
    fn summarize_kinds(&mut self, now: Instant, force: bool) {
        let mut lines = Vec::new();
        self.held = false;
        for (kind, budget) in &mut self.budgets {
            if budget.suppressed == 0 {
                continue;
            }
            if force || budget.refill(now) {
                lines.push(format!("kind={kind:?} lines={}", budget.suppressed));
                budget.suppressed = 0;
            } else {
                self.held = true;
            }
        }
        lines.sort();
        for line in lines {
            self.append("SECLOG", "suppressed", &line);
        }
    }

    fn summarize(&mut self, now: Instant) {
        self.summarize_kinds(now, false);
    }

    /// Writes what the rate limit held back, whatever the budgets (call it before stopping).
    pub fn flush_suppressed(&mut self) {
        if self.held {
            self.summarize_kinds(Instant::now(), true);
        }
    }

    fn append(&mut self, subsystem: &str, event: &str, fields: &str) {
        let now = humantime::format_rfc3339_millis(SystemTime::now());
        tracing::info!(target: "security", "{subsystem} {event}: {fields}");
        let line = format!("{now} {subsystem} {event}: {fields}\n");
        let written = self
            .make_room(line.len() as u64)
            .and_then(|()| self.file.write_all(line.as_bytes()));
        match written {
            Ok(()) => self.failed = false,
            Err(e) if !self.failed => {
                self.failed = true;
                tracing::error!(path = %self.path.display(), error = %e, "cannot write the security log");
            }
            Err(_) => {}
        }
    }

    /// Logs a DHCP server event; `to_wall` gives a lease with its times on the wall clock.
    pub fn dhcp(&mut self, event: &DhcpEvent, to_wall: impl Fn(&Lease) -> Lease) {
        match event {
            DhcpEvent::Lease { kind, lease } => {
                let what = format!("lease {}", kind.as_str());
                self.write("DHCP", &what, &lease_fields(&to_wall(lease)));
            }
            DhcpEvent::Customized {
                mac,
                ip,
                policy,
                what,
            } => {
                self.write(
                    "DHCP",
                    "reply changed by policy",
                    &format!(
                        "mac={} ip={ip} policy={:?} {what}",
                        fmt_mac(mac),
                        policy.as_deref().unwrap_or("")
                    ),
                );
            }
            DhcpEvent::Ignored {
                mac,
                chaddr,
                reason,
                suppressed,
            } => {
                let more = if *suppressed > 0 {
                    format!(" (and {suppressed} more ignored since the last line)")
                } else {
                    String::new()
                };
                self.write(
                    "DHCP",
                    "message ignored",
                    &format!(
                        "mac={} chaddr={} reason={reason:?}{more}",
                        fmt_mac(mac),
                        fmt_mac(chaddr)
                    ),
                );
            }
            DhcpEvent::OtherServer {
                ip,
                mac,
                authoritative,
            } => {
                let what = if *authoritative {
                    "answering too (dhcp.authoritative)"
                } else {
                    "staying quiet while it answers"
                };
                self.write(
                    "DHCP",
                    "another DHCP server on the segment",
                    &format!("server={ip} mac={} hubnat={what:?}", fmt_mac(mac)),
                );
            }
            DhcpEvent::PoolExhausted { mac } => {
                self.write(
                    "DHCP",
                    "pool exhausted",
                    &format!("mac={} (no address offered)", fmt_mac(mac)),
                );
            }
            DhcpEvent::MacShareFull { mac, held } => {
                self.write(
                    "DHCP",
                    "share full",
                    &format!(
                        "mac={} holds {held} addresses under other client identifiers \
                         (dhcp.max_leases_per_mac); no address offered",
                        fmt_mac(mac)
                    ),
                );
            }
        }
    }
}

impl SecurityLog {
    /// Logs an event of the segment itself: a peer claiming the virtual host's MAC or address.
    pub fn link(&mut self, event: &LinkEvent) {
        match event {
            LinkEvent::OwnMacClaimed { ip } => self.write(
                "LINK",
                "frames from the virtual host's own MAC dropped",
                &format!("ip={ip} (a peer on the segment claims the MAC; reported once)"),
            ),
            LinkEvent::ArpSpoofed { mac, ip } => self.write(
                "LINK",
                "ARP spoofing dropped",
                &format!(
                    "mac={} claims ip={ip} (the virtual host's address; reported once per MAC)",
                    fmt_mac(mac)
                ),
            ),
        }
    }

    /// Logs a NAT event: session created, connected, failed, deleted (with byte counts),
    /// refused.
    pub fn nat(&mut self, event: &NatEvent) {
        match event {
            NatEvent::Created {
                id,
                key,
                target,
                remote_name,
                redirected_by,
            } => {
                let via = if target.to_string() != key.remote.to_string() {
                    format!(" via={target}")
                } else {
                    String::new()
                };
                let name = remote_name
                    .as_deref()
                    .map(|n| format!(" remote_name={n}"))
                    .unwrap_or_default();
                let policy = redirected_by
                    .as_deref()
                    .map(|p| format!(" redirected_by_policy={p:?}"))
                    .unwrap_or_default();
                self.write(
                    "NAT",
                    "session created",
                    &format!("id={id} {}{name}{via}{policy}", flow_fields(key)),
                );
            }
            NatEvent::Connected { id, key } => {
                self.write(
                    "NAT",
                    "session connected",
                    &format!("id={id} {}", flow_fields(key)),
                );
            }
            NatEvent::Failed { id, key, reason } => {
                self.write(
                    "NAT",
                    "session failed",
                    &format!("id={id} {} reason={reason:?}", flow_fields(key)),
                );
            }
            NatEvent::Ended {
                session,
                reason,
                at,
            } => {
                let secs =
                    (at.total_millis() - session.created.total_millis()).max(0) as f64 / 1000.0;
                self.write(
                    "NAT",
                    "session deleted",
                    &format!(
                        "id={} {} bytes_out={} bytes_in={} packets_out={} packets_in={} duration={secs:.1}s reason={:?}",
                        session.id,
                        flow_fields(&session.key),
                        session.bytes_out,
                        session.bytes_in,
                        session.packets_out,
                        session.packets_in,
                        reason.as_str()
                    ),
                );
            }
            NatEvent::Refused {
                key,
                reason,
                detail,
                suppressed,
            } => {
                let more = if *suppressed > 0 {
                    format!(" (and {suppressed} more refused since the last line)")
                } else {
                    String::new()
                };
                self.write(
                    "NAT",
                    "session refused",
                    &format!(
                        "{} reason={:?} detail={detail:?}{more}",
                        flow_fields(key),
                        reason.as_str()
                    ),
                );
            }
        }
    }
}

/// `proto=… client=… remote=…`.
fn flow_fields(key: &FlowKey) -> String {
    format!(
        "proto={} client={} remote={}",
        key.protocol.as_str(),
        key.client,
        key.remote
    )
}

/// `id=… mac=… ip=… hostname="…" expires=…`.
pub fn lease_fields(lease: &Lease) -> String {
    let expires =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(lease.expires));
    format!(
        "id={} mac={} ip={} hostname={:?} expires={}",
        lease.id,
        fmt_mac(&lease.mac),
        lease.ip,
        lease.hostname.as_deref().unwrap_or(""),
        expires
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::dhcp::{ClientKey, LeaseEventKind, LeaseId, LeaseState};

    #[test]
    fn lease_events_are_logged_with_their_kind() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("security.log");
        let mut log = SecurityLog::open(&path).expect("open");
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let lease = Lease {
            id: LeaseId(7),
            client: ClientKey::from_mac(mac),
            mac,
            ip: std::net::Ipv4Addr::new(192, 168, 30, 10),
            hostname: Some("vm1".into()),
            state: LeaseState::Bound,
            start: 0,
            expires: 7200,
            was_bound: true,
        };
        for kind in [LeaseEventKind::ReleasedByOperator, LeaseEventKind::Revoked] {
            log.dhcp(
                &DhcpEvent::Lease {
                    kind,
                    lease: lease.clone(),
                },
                Lease::clone,
            );
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let fields = "id=7 mac=52:54:00:00:00:01 ip=192.168.30.10 hostname=\"vm1\" \
                      expires=1970-01-01T02:00:00Z";
        assert!(
            text.contains(&format!(" DHCP lease released by operator: {fields}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(" DHCP lease revoked: {fields}\n")),
            "{text}"
        );
    }

    #[test]
    fn a_flood_of_one_kind_is_held_back_and_summarized() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("security.log");
        let mut log = SecurityLog::open(&path).expect("open");
        let t0 = Instant::now();
        // A burst of 1,000 refusals in one instant, and one operator line among them.
        for i in 0..1000 {
            log.write_at(t0, "NAT", "session refused", &format!("n={i}"));
            if i == 500 {
                log.write_at(t0, "CONTROL", "session ended by operator", "id=1");
            }
        }
        let count = |text: &str, what: &str| text.lines().filter(|l| l.contains(what)).count();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(count(&text, "NAT session refused"), BURST as usize);
        assert_eq!(count(&text, "CONTROL session ended by operator"), 1);
        assert_eq!(count(&text, "SECLOG"), 0, "nothing to summarize yet");
        // A second later the kind has 10 lines again: the summary comes before the next one.
        let t1 = t0 + Duration::from_secs(1);
        log.write_at(t1, "NAT", "session refused", "n=late");
        let text = std::fs::read_to_string(&path).unwrap();
        let tail: Vec<&str> = text.lines().rev().take(2).collect();
        assert!(
            tail[1].ends_with("SECLOG suppressed: kind=\"NAT session refused\" lines=900"),
            "{tail:?}"
        );
        assert!(tail[0].ends_with("NAT session refused: n=late"), "{tail:?}");
        // Another kind is not affected by the first one's flood.
        log.write_at(t1, "DHCP", "pool exhausted", "mac=x");
        // Held back lines of a kind that has not recovered are written out on the way out.
        for _ in 0..50 {
            log.write_at(t1, "NAT", "session refused", "n=more");
        }
        log.flush_suppressed();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(count(&text, "DHCP pool exhausted"), 1);
        assert!(
            text.lines()
                .last()
                .unwrap()
                .ends_with("SECLOG suppressed: kind=\"NAT session refused\" lines=41"),
            "{text}"
        );
    }

    #[test]
    fn spoofed_dhcp_messages_are_logged_with_the_number_left_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("security.log");
        let mut log = SecurityLog::open(&path).expect("open");
        log.dhcp(
            &DhcpEvent::Ignored {
                mac: [0x52, 0x54, 0, 0, 0, 0xb],
                chaddr: [0x52, 0x54, 0, 0, 0, 0xa],
                reason: "chaddr is not the frame's source MAC",
                suppressed: 3,
            },
            Lease::clone,
        );
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.contains(
                " DHCP message ignored: mac=52:54:00:00:00:0b chaddr=52:54:00:00:00:0a \
                 reason=\"chaddr is not the frame's source MAC\" (and 3 more ignored since the \
                 last line)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn link_events_name_the_mac_and_the_address() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("security.log");
        let mut log = SecurityLog::open(&path).expect("open");
        let ip = std::net::Ipv4Addr::new(192, 168, 30, 1);
        log.link(&LinkEvent::ArpSpoofed {
            mac: [0x52, 0x54, 0, 0, 0, 0x66],
            ip,
        });
        log.link(&LinkEvent::OwnMacClaimed {
            ip: std::net::Ipv4Addr::new(192, 168, 30, 10),
        });
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.contains(
                " LINK ARP spoofing dropped: mac=52:54:00:00:00:66 claims ip=192.168.30.1 "
            ),
            "{text}"
        );
        assert!(
            text.contains(
                " LINK frames from the virtual host's own MAC dropped: ip=192.168.30.10 "
            ),
            "{text}"
        );
    }

    #[test]
    fn rotation_keeps_max_files_and_follows_another_writer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("security.log");
        let rotation = Rotation {
            max_size: Some(200),
            max_files: 3,
        };
        let mut a = SecurityLog::open_with(&path, rotation).expect("open");
        let mut b = SecurityLog::open_with(&path, rotation).expect("open");
        for i in 0..40 {
            let log = if i % 2 == 0 { &mut a } else { &mut b };
            log.write(
                "TEST",
                "line",
                &format!("n={i:02} padding=xxxxxxxxxxxxxxxxxxxx"),
            );
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        for p in [path.clone(), numbered(&path, 1), numbered(&path, 2)] {
            let text = read(&p);
            assert!(!text.is_empty(), "{} is empty", p.display());
            assert!(text.len() <= 200, "{} is {} bytes", p.display(), text.len());
        }
        assert!(!numbered(&path, 3).exists(), "only 3 files are kept");
        // The newest lines are in PATH, in order, from both writers.
        let current = read(&path);
        assert!(current.contains("n=39"), "{current}");
        let all = format!(
            "{}{}{}",
            read(&numbered(&path, 2)),
            read(&numbered(&path, 1)),
            current
        );
        let numbers: Vec<u32> = all
            .lines()
            .filter_map(|l| l.split("n=").nth(1)?.get(..2)?.parse().ok())
            .collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    }
}
