//! The state directory: the generated MAC address and the lease table, kept across restarts.
//!
//! Every file is written atomically: a temporary file in the same directory is written,
//! synced, and renamed over the old one, and the directory is synced, so a crash at any moment
//! leaves either the old or the new content, never a mix. A lock file (`flock`) keeps two
//! hubnat processes from sharing one state directory.
//!
//! Out of descriptors: every NAT session holds a socket, so a flood can take every descriptor
//! the process may open, and then the lease file could not be written (and no DHCP ACK could
//! leave, see the driver). The directory keeps [`SPARE_FDS`] descriptors of its own (copies of
//! the lock file's) and gives them back for a lease save that failed for lack of descriptors,
//! retries it, and takes them again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::config::MacAddr;
use crate::core::dhcp::Lease;

/// File names inside the state directory.
const MAC_FILE: &str = "mac";
const LEASES_FILE: &str = "leases.json";
const LOCK_FILE: &str = "lock";

/// Version of the lease file format.
const LEASES_VERSION: u32 = 1;

/// Descriptors kept for the lease file's writes when the process has no other (a write needs
/// one at a time: the temporary file, then the directory).
pub const SPARE_FDS: usize = 2;

/// Errors of the state directory; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file or directory operation failed.
    #[error("state directory: {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process holds the lock.
    #[error("state directory {0} is in use by another hubnat process (lock file held)")]
    Locked(PathBuf),
    /// A file has content hubnat cannot read.
    #[error("state file {path} is corrupt: {reason} (move it away to start with an empty table)")]
    Corrupt {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct LeaseFile {
    version: u32,
    leases: Vec<Lease>,
}

/// An open, locked state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    lock: File,
    /// Copies of the lock file's descriptor, given back for a lease save that ran out of
    /// descriptors (see the module documentation).
    spare: Mutex<Vec<File>>,
}

impl StateDir {
    /// Creates the directory (mode 0700) if needed and takes its lock.
    pub fn open(path: &Path) -> Result<StateDir, StateError> {
        let io_err = |what, source| StateError::Io {
            what,
            path: path.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| io_err("cannot create", e))?;
        let lock_path = path.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io_err("cannot open the lock file in", e))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Err(StateError::Locked(path.to_owned()))
            } else {
                Err(io_err("cannot lock", e))
            };
        }
        Ok(StateDir {
            path: path.to_owned(),
            spare: Mutex::new(spares(&lock)),
            lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The MAC address to use: the configured one, else the one generated earlier, else a new
    /// one (`00:ac` + 4 random bytes), saved so the next start uses it again.
    pub fn mac(&self, configured: Option<MacAddr>) -> Result<MacAddr, StateError> {
        if let Some(mac) = configured {
            return Ok(mac);
        }
        let path = self.path.join(MAC_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse::<MacAddr>()
                .map_err(|e| StateError::Corrupt {
                    path: path.clone(),
                    reason: format!("{:?} is not a MAC address: {e}", text.trim()),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut random = [0u8; 4];
                getrandom::fill(&mut random).map_err(|e| StateError::Io {
                    what: "no random source for the MAC in",
                    path: self.path.clone(),
                    source: io::Error::other(e.to_string()),
                })?;
                let mac = MacAddr([0x00, 0xac, random[0], random[1], random[2], random[3]]);
                write_atomic(&path, format!("{mac}\n").as_bytes())?;
                tracing::info!(%mac, path = %path.display(), "generated the virtual host's MAC address");
                Ok(mac)
            }
            Err(e) => Err(StateError::Io {
                what: "cannot read",
                path,
                source: e,
            }),
        }
    }

    /// The lease table saved last; empty when there is none yet.
    pub fn load_leases(&self) -> Result<Vec<Lease>, StateError> {
        load_leases(&self.path)
    }

    /// Saves the lease table atomically. When the process is out of descriptors, the
    /// directory's spare ones are given back for a second try.
    pub fn save_leases(&self, leases: &[Lease]) -> Result<(), StateError> {
        let file = LeaseFileRef {
            version: LEASES_VERSION,
            leases,
        };
        let json = serde_json::to_vec_pretty(&file).expect("invariant: leases serialize");
        let path = self.path.join(LEASES_FILE);
        match write_atomic(&path, &json) {
            Err(e) if e.is_out_of_descriptors() => {
                let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
                spare.clear();
                let result = write_atomic(&path, &json);
                *spare = spares(&self.lock);
                result
            }
            result => result,
        }
    }
}

/// Up to [`SPARE_FDS`] copies of `lock`'s descriptor (fewer when the process is out of them).
fn spares(lock: &File) -> Vec<File> {
    (0..SPARE_FDS)
        .map_while(|_| lock.try_clone().ok())
        .collect()
}

impl StateError {
    /// Whether the process (or the system) had no descriptor left for the operation.
    pub fn is_out_of_descriptors(&self) -> bool {
        matches!(self, StateError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)))
    }
}

#[derive(Serialize)]
struct LeaseFileRef<'a> {
    version: u32,
    leases: &'a [Lease],
}

/// Reads the lease table of a state directory without locking it (for `hubnat leases`).
pub fn load_leases(dir: &Path) -> Result<Vec<Lease>, StateError> {
    let path = dir.join(LEASES_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(StateError::Io {
                what: "cannot read",
                path,
                source: e,
            })
        }
    };
    let file: LeaseFile = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if file.version != LEASES_VERSION {
        return Err(StateError::Corrupt {
            path,
            reason: format!(
                "format version {} is not the supported {LEASES_VERSION}",
                file.version
            ),
        });
    }
    Ok(file.leases)
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let io_err = |what, source| StateError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_err("cannot create a temporary file for", e))?;
    f.write_all(bytes).map_err(|e| io_err("cannot write", e))?;
    f.sync_all().map_err(|e| io_err("cannot sync", e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io_err("cannot replace", e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("cannot sync the directory of", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::dhcp::{ClientKey, LeaseId, LeaseState};

    #[test]
    fn mac_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateDir::open(dir.path()).unwrap().mac(None).unwrap();
        assert_eq!(&first.0[..2], &[0x00, 0xac]);
        let again = StateDir::open(dir.path()).unwrap().mac(None).unwrap();
        assert_eq!(first, again);
        let configured = MacAddr([2, 1, 2, 3, 4, 5]);
        assert_eq!(
            StateDir::open(dir.path())
                .unwrap()
                .mac(Some(configured))
                .unwrap(),
            configured
        );
    }

    #[test]
    fn second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _held = StateDir::open(dir.path()).unwrap();
        // flock locks belong to the open file description, so a second open conflicts.
        match StateDir::open(dir.path()) {
            Err(StateError::Locked(p)) => assert_eq!(p, dir.path()),
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn leases_round_trip_and_corruption_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.load_leases().unwrap().is_empty());
        let lease = Lease {
            id: LeaseId(7),
            client: ClientKey::from_mac([2, 0, 0, 0, 0, 1]),
            mac: [2, 0, 0, 0, 0, 1],
            ip: "192.168.30.10".parse().unwrap(),
            hostname: Some("box".into()),
            state: LeaseState::Bound,
            start: 100,
            expires: 7300,
            was_bound: true,
        };
        state.save_leases(std::slice::from_ref(&lease)).unwrap();
        assert_eq!(state.load_leases().unwrap(), vec![lease]);
        assert!(!dir.path().join("leases.tmp").exists());
        fs::write(dir.path().join(LEASES_FILE), b"{not json").unwrap();
        let err = state.load_leases().unwrap_err().to_string();
        assert!(
            err.contains("leases.json") && err.contains("corrupt"),
            "{err}"
        );
    }
}
