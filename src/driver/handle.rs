//! The handle to a running gateway: commands into the driver's loop and the answers, with
//! the types they carry (the status, the session and lease tables). The control API serves
//! these; an embedder calls them directly.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::Clock;
use crate::config::{Change, Config, Override, LIVE_SECTIONS};
use crate::core::dhcp::{server::fmt_mac, DhcpCounters, Lease};
use crate::core::nat::{IcmpMode, NatCounters, Protocol, SessionId};
use crate::core::{Counters, LeaseTarget, LinkCounters};
use crate::policy::{PolicyInfo, ReloadReport};

/// Sessions by protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SessionCounts {
    /// TCP sessions.
    pub tcp: usize,
    /// UDP sessions (DNS clients of the virtual host included).
    pub udp: usize,
    /// ICMP echo sessions.
    pub icmp: usize,
}

/// What a running gateway reports about itself.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The whole function.
    pub enabled: bool,
    /// The NAT.
    pub nat_enabled: bool,
    /// The DHCP server.
    pub dhcp_enabled: bool,
    /// How echo to outside hosts is answered.
    pub icmp_mode: IcmpMode,
    /// The backend.
    pub backend: String,
    /// The virtual host's MAC address.
    pub mac: String,
    /// The virtual host's address.
    pub ip: Ipv4Addr,
    /// The segment's mask.
    pub mask: Ipv4Addr,
    /// Seconds since the gateway started.
    pub uptime_secs: u64,
    /// Sessions by protocol.
    pub sessions: SessionCounts,
    /// Flows waiting for a policy's verdict.
    pub pending_verdicts: usize,
    /// Leases bound to a client now.
    pub leases: usize,
    /// Addresses the DHCP server manages (the range).
    pub pool_size: usize,
    /// Payload bytes from clients to remotes, all sessions so far.
    pub bytes_to_remote: u64,
    /// Payload bytes from remotes to clients, all sessions so far.
    pub bytes_to_client: u64,
    /// The core's frame counters.
    pub counters: Counters,
    /// Frames the core could not send.
    pub link: LinkCounters,
    /// The NAT's counters.
    pub nat: NatCounters,
    /// The DHCP server's counters.
    pub dhcp: DhcpCounters,
    /// The policies in force, in order, with their counters.
    pub policies: Vec<PolicyInfo>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

/// One row of the NAT session table.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRow {
    /// The session's id (for `end_session`).
    pub id: SessionId,
    /// Transport.
    pub protocol: Protocol,
    /// The client's MAC address.
    pub client_mac: String,
    /// The client's endpoint (ICMP: address and echo identifier).
    pub client: SocketAddrV4,
    /// The endpoint the client sent to.
    pub remote: SocketAddrV4,
    /// Where the host socket goes (differs for the DNS redirect and policy redirects).
    pub target: SocketAddr,
    /// The name the client looked up for the remote, when known.
    pub remote_name: Option<String>,
    /// Life stage.
    pub state: crate::core::nat::SessionState,
    /// When it was created.
    #[serde(serialize_with = "rfc3339")]
    pub created: SystemTime,
    /// When something last moved.
    #[serde(serialize_with = "rfc3339")]
    pub last_activity: SystemTime,
    /// Payload bytes from the client to the remote.
    pub bytes_to_remote: u64,
    /// Payload bytes from the remote to the client.
    pub bytes_to_client: u64,
}

/// One row of the DHCP lease table.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseRow {
    /// The lease's id.
    pub id: u32,
    /// The client's MAC address.
    pub mac: String,
    /// The address.
    pub ip: Ipv4Addr,
    /// The client's host name, if it sent one.
    pub hostname: Option<String>,
    /// Offered, bound, released, expired, declined.
    pub state: String,
    /// When the current binding started.
    #[serde(serialize_with = "rfc3339")]
    pub start: SystemTime,
    /// When it expires (or expired).
    #[serde(serialize_with = "rfc3339")]
    pub expires: SystemTime,
}

/// Why a command to a running gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The gateway is not running (it stopped, or never started).
    #[error("the gateway is not running")]
    Stopped,
    /// The request was refused (for a settings change: nothing changed).
    #[error("{message}")]
    Invalid {
        /// The configuration key it is about, when there is one (the first, when several).
        key: Option<String>,
        /// What is wrong, naming the key, the value, the source and why.
        message: String,
    },
}

pub(super) type Reply<T> = async_channel::Sender<T>;

pub(super) enum Command {
    Status(Reply<Status>),
    Sessions(Reply<Vec<SessionRow>>),
    Leases(Reply<Vec<LeaseRow>>),
    Set {
        changes: Vec<Override>,
        source: String,
        reply: Reply<Result<Vec<Change>, HandleError>>,
    },
    Config(Reply<Config>),
    Policies(Reply<Vec<PolicyInfo>>),
    ReloadPolicies(
        Vec<crate::config::PolicyConfig>,
        String,
        Reply<Result<ReloadReport, HandleError>>,
    ),
    EndSession(SessionId, String, Reply<bool>),
    ReleaseLease(LeaseTarget, String, Reply<Option<LeaseRow>>),
}

/// A cloneable handle to a running gateway: each call sends a command into the gateway's loop
/// and waits for the answer. Usable from any thread (the control API's, an embedder's).
#[derive(Debug, Clone)]
pub struct GatewayHandle {
    pub(super) commands: async_channel::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl GatewayHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, HandleError> {
        let (tx, rx) = async_channel::bounded(1);
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| HandleError::Stopped)?;
        rx.recv().await.map_err(|_| HandleError::Stopped)
    }

    /// The status with every counter.
    pub async fn status(&self) -> Result<Status, HandleError> {
        self.ask(Command::Status).await
    }

    /// The NAT session table.
    pub async fn sessions(&self) -> Result<Vec<SessionRow>, HandleError> {
        self.ask(Command::Sessions).await
    }

    /// The DHCP lease table.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>, HandleError> {
        self.ask(Command::Leases).await
    }

    /// Changes live settings: `KEY=VALUE` changes as in the configuration file
    /// (`dhcp.range_end`, `nat.tcp_timeout=1h`, `host.enabled=false`), checked as a whole
    /// against the running configuration ([`Config::with_changes`]). Either every change
    /// applies at once and the keys whose values changed come back, or nothing changes and the
    /// error names the key, the value, `source` ("from the control API") and why. `source` is
    /// also written to the security log.
    pub async fn set(
        &self,
        changes: Vec<Override>,
        source: &str,
    ) -> Result<Vec<Change>, HandleError> {
        let source = source.to_owned();
        self.ask(|reply| Command::Set {
            changes,
            source,
            reply,
        })
        .await?
    }

    /// Changes live settings to those of `config`: every key of its live sections
    /// ([`LIVE_SECTIONS`]) is applied with [`set`](Self::set); the other sections are not
    /// read (they need a restart).
    pub async fn apply_config(
        &self,
        config: Config,
        source: &str,
    ) -> Result<Vec<Change>, HandleError> {
        let changes = LIVE_SECTIONS
            .iter()
            .filter_map(|section| config.section_settings(section))
            .flatten()
            .map(|s| Override::new(s.key, s.value))
            .collect();
        self.set(changes, source).await
    }

    /// The policies in force, in order, with what their calls did.
    pub async fn policies(&self) -> Result<Vec<PolicyInfo>, HandleError> {
        self.ask(Command::Policies).await
    }

    /// Replaces the policies in force with those of `configs` (a `[[policy]]` list, usually
    /// re-read from the configuration file), in its order, and waits for the report. The
    /// modules compile off the loop, and are swapped in between two policy calls: sessions
    /// already open are not touched; flows and DHCP replies that arrive after the swap meet the
    /// new policies. A module that fails to load leaves the previous one of its name in force
    /// (the report's `kept_previous` and `errors` say which and why); a policy left out of
    /// `configs` is gone. The report also goes to the security log, with `source` (who asked).
    pub async fn reload_policies(
        &self,
        configs: Vec<crate::config::PolicyConfig>,
        source: &str,
    ) -> Result<ReloadReport, HandleError> {
        let source = source.to_owned();
        self.ask(|r| Command::ReloadPolicies(configs, source, r))
            .await?
    }

    /// The running configuration (the file's, with every live change since).
    pub async fn config(&self) -> Result<Config, HandleError> {
        self.ask(Command::Config).await
    }

    /// Ends session `id` (TCP: a RST both ways). False when there is no such session.
    /// `source` (who asked) goes to the security log.
    pub async fn end_session(&self, id: SessionId, source: &str) -> Result<bool, HandleError> {
        let source = source.to_owned();
        self.ask(|r| Command::EndSession(id, source, r)).await
    }

    /// Releases the lease of a MAC address or of an address, as a client's RELEASE would.
    /// Returns the lease released, or `None` when there was none. `source` (who asked) goes
    /// to the security log.
    pub async fn release_lease(
        &self,
        target: LeaseTarget,
        source: &str,
    ) -> Result<Option<LeaseRow>, HandleError> {
        let source = source.to_owned();
        self.ask(|r| Command::ReleaseLease(target, source, r)).await
    }
}

pub(super) fn lease_row(clock: &Clock, l: &Lease) -> LeaseRow {
    LeaseRow {
        id: l.id.0,
        mac: fmt_mac(&l.mac),
        ip: l.ip,
        hostname: l.hostname.clone(),
        state: format!("{:?}", l.state).to_lowercase(),
        start: UNIX_EPOCH + Duration::from_secs(clock.wall_secs(l.start)),
        expires: UNIX_EPOCH + Duration::from_secs(clock.wall_secs(l.expires)),
    }
}
