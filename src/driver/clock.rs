//! The core's clock: monotonic, starting at the wall time of the process start, so the DHCP
//! server's seconds read as Unix times while a step of the wall clock (NTP, suspend) never
//! reaches the core. The wall clock is read only to convert a lease's times for the lease
//! file, the security log and the tables.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::core::dhcp::Lease;
use crate::core::Instant;

/// Where the wall time comes from (the system clock, or a test's).
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The core's clock: monotonic, starting at the wall time of its creation. See the module
/// documentation.
#[derive(Clone)]
pub struct Clock {
    start: std::time::Instant,
    start_micros: i64,
    wall: WallClock,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("start_micros", &self.start_micros)
            .finish_non_exhaustive()
    }
}

impl Clock {
    /// A clock whose wall time is the system's.
    pub fn system() -> Clock {
        Clock::with_wall(Arc::new(SystemTime::now))
    }

    /// A clock whose wall time comes from `wall` (read at start, and for conversions).
    pub fn with_wall(wall: WallClock) -> Clock {
        let start_micros = wall()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        Clock {
            start: std::time::Instant::now(),
            start_micros,
            wall,
        }
    }

    /// Now, for the core.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.start_micros + self.start.elapsed().as_micros() as i64)
    }

    /// Now, on the wall clock.
    pub fn wall_now(&self) -> SystemTime {
        (self.wall)()
    }

    /// The wall time of core time `t` (what a person or a file reads).
    pub fn to_wall(&self, t: Instant) -> SystemTime {
        let delta = t.total_micros() - self.now().total_micros();
        let wall = self.wall_now();
        if delta >= 0 {
            wall + Duration::from_micros(delta as u64)
        } else {
            wall.checked_sub(Duration::from_micros(delta.unsigned_abs()))
                .unwrap_or(UNIX_EPOCH)
        }
    }

    /// Core seconds (as the DHCP server keeps them) to Unix seconds on the wall clock.
    pub fn wall_secs(&self, core_secs: u64) -> u64 {
        let wall = self.to_wall(Instant::from_secs(core_secs as i64));
        wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }

    /// Unix seconds on the wall clock to core seconds.
    pub fn core_secs(&self, wall_secs: u64) -> u64 {
        let wall_now = self
            .wall_now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let core_now = self.now().secs();
        (wall_secs as i64 - wall_now + core_now).max(0) as u64
    }

    /// A lease with its times (start and expiry) moved from core seconds to the wall clock's.
    pub(super) fn lease_to_wall(&self, lease: &Lease) -> Lease {
        let mut l = lease.clone();
        l.start = self.wall_secs(l.start);
        l.expires = self.wall_secs(l.expires);
        l
    }

    /// A saved lease with its times moved from the wall clock's seconds to core seconds.
    pub(super) fn lease_to_core(&self, mut lease: Lease) -> Lease {
        lease.start = self.core_secs(lease.start);
        lease.expires = self.core_secs(lease.expires);
        lease
    }
}
