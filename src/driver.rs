//! The driver: the async loop that joins a frame backend, the clock and the state directory to
//! the sans-IO [core](crate::core).
//!
//! # Theory of operation
//!
//! One loop on one thread owns the [`VirtualHost`]. Each turn it waits for the first of: a batch
//! of frames from the backend, the core's next timeout, or the shutdown signal. It then feeds
//! the core (every frame of the batch, then the timeout check, all with one timestamp), sends
//! the frames the core produced as one batch, writes the security log lines of the core's
//! events, and saves the lease table when it changed. On shutdown the lease table is saved once
//! more. No locks: nothing else touches the core.

use std::future::Future;
use std::pin::pin;
use std::time::{Duration, SystemTime};

use async_io::Timer;
use futures_lite::FutureExt;
use hubnat_backend::{Backend, FrameBatch};
use smoltcp::wire::EthernetAddress;
use tracing::{error, info};

use crate::config::{Config, MacAddr};
use crate::core::dhcp::{DhcpSettings, Reservation, StaticRoute};
use crate::core::{Event, HostSettings, Instant, VirtualHost};
use crate::seclog::SecurityLog;
use crate::state::{StateDir, StateError};

/// Frames read from the backend per wake-up, at most.
pub const RX_BATCH_FRAMES: usize = 64;

/// Why the gateway could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The state directory could not be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// The security log could not be opened.
    #[error("cannot open the security log {path}: {source}")]
    SecurityLog {
        /// Its path.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The backend failed (device removed, hub closed).
    #[error("backend {backend} failed: {source}")]
    Backend {
        /// The backend's description.
        backend: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The virtual host's identity from the configuration and its MAC.
pub fn host_settings(config: &Config, mac: MacAddr) -> HostSettings {
    HostSettings {
        mac: EthernetAddress(mac.0),
        ip: config.host.ip,
        mask: config.host.mask,
        mtu: config.nat.mtu as usize,
    }
}

/// The DHCP server's settings from the configuration.
pub fn dhcp_settings(config: &Config) -> DhcpSettings {
    let d = &config.dhcp;
    DhcpSettings {
        enabled: d.enabled,
        range_start: d.range_start,
        range_end: d.range_end,
        mask: d.mask,
        lease: d.lease,
        gateway: d.gateway,
        dns: d.dns.clone(),
        domain: d.domain.clone(),
        routes: d
            .routes
            .iter()
            .map(|r| StaticRoute { dest: r.dest, prefix_len: r.prefix_len, gateway: r.gateway })
            .collect(),
        statics: d
            .statics
            .iter()
            .map(|s| Reservation { mac: s.mac.0, ip: s.ip, hostname: s.hostname.clone() })
            .collect(),
    }
}

/// The current time for the core.
pub fn now() -> Instant {
    Instant::from(SystemTime::now())
}

/// A configured gateway, ready to run on a backend.
#[derive(Debug)]
pub struct Gateway {
    config: Config,
    state: StateDir,
    seclog: SecurityLog,
    mac: MacAddr,
}

impl Gateway {
    /// Opens the state directory (taking its lock), settles the MAC address and opens the
    /// security log.
    pub fn new(config: Config) -> Result<Gateway, GatewayError> {
        let state = StateDir::open(&config.state.dir)?;
        let mac = state.mac(config.host.mac)?;
        let path = config.security_log_path();
        let seclog = SecurityLog::open(&path).map_err(|source| GatewayError::SecurityLog { path, source })?;
        Ok(Gateway { config, state, seclog, mac })
    }

    /// The virtual host's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs until `shutdown` completes or the backend fails. Leases are saved on every change
    /// and once more on the way out.
    pub async fn run<B: Backend>(mut self, mut backend: B, shutdown: impl Future<Output = ()>) -> Result<(), GatewayError> {
        let leases = self.state.load_leases()?;
        let restored = leases.len();
        let mut core = VirtualHost::new(host_settings(&self.config, self.mac), dhcp_settings(&self.config), leases);
        let d = &self.config.dhcp;
        info!(
            backend = %backend.describe(),
            mac = %self.mac,
            ip = %self.config.host.ip,
            dhcp = d.enabled,
            leases = restored,
            "hubnat started"
        );
        self.seclog.write(
            "GATEWAY",
            "started",
            &format!(
                "backend={:?} mac={} ip={} mask={} dhcp={} range={}-{} leases_restored={}",
                backend.describe(),
                self.mac,
                self.config.host.ip,
                self.config.host.mask,
                if d.enabled { "on" } else { "off" },
                d.range_start,
                d.range_end,
                restored
            ),
        );
        let max_frame = backend.max_frame_len();
        let mut rx = FrameBatch::new(RX_BATCH_FRAMES, max_frame);
        let mut tx = FrameBatch::new(crate::core::TX_QUEUE_FRAMES, max_frame);
        let mut shutdown = pin!(shutdown);

        enum Wake {
            Frames(std::io::Result<()>),
            Timer,
            Stop,
        }

        let result = loop {
            let deadline = core.poll_timeout();
            rx.clear();
            let wake = {
                let recv = async { Wake::Frames(backend.recv_batch(&mut rx).await) };
                let timer = async {
                    match deadline {
                        Some(at) => {
                            let delay = Duration::from_micros(u64::try_from(at.total_micros() - now().total_micros()).unwrap_or(0));
                            Timer::after(delay).await;
                            Wake::Timer
                        }
                        None => std::future::pending().await,
                    }
                };
                let stop = async {
                    shutdown.as_mut().await;
                    Wake::Stop
                };
                stop.or(recv).or(timer).await
            };
            let now = now();
            match wake {
                Wake::Frames(Ok(())) => {
                    for frame in rx.iter() {
                        core.handle_frame(now, frame);
                    }
                }
                Wake::Frames(Err(source)) => {
                    break Err(GatewayError::Backend { backend: backend.describe(), source });
                }
                Wake::Timer => {}
                Wake::Stop => break Ok(()),
            }
            core.handle_timeout(now);
            core.take_transmit(&mut tx);
            if !tx.is_empty() {
                if let Err(source) = backend.send_batch(&tx).await {
                    break Err(GatewayError::Backend { backend: backend.describe(), source });
                }
                tx.clear();
            }
            self.drain_events(&mut core);
        };
        self.drain_events(&mut core);
        self.save(&core);
        let c = core.counters();
        info!(frames_in = c.frames_in, frames_out = c.frames_out, malformed = c.malformed, "hubnat stopped");
        self.seclog.write(
            "GATEWAY",
            "stopped",
            &match &result {
                Ok(()) => "reason=shutdown".to_owned(),
                Err(e) => format!("reason={:?}", e.to_string()),
            },
        );
        result
    }

    fn drain_events(&mut self, core: &mut VirtualHost) {
        let mut changed = false;
        while let Some(event) = core.poll_event() {
            match event {
                Event::Dhcp(e) => self.seclog.dhcp(&e),
                Event::LeasesChanged => changed = true,
            }
        }
        if changed {
            self.save(core);
        }
    }

    fn save(&self, core: &VirtualHost) {
        if let Err(e) = self.state.save_leases(&core.leases_to_save()) {
            error!(error = %e, "cannot save the lease table; leases given out since the last save would be lost on restart");
        }
    }
}
