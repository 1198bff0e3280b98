//! Giving up root (`[process] user` and `group`).
//!
//! `hubnat run`, started as root, opens everything that needs root first: the TAP device or
//! the raw socket, the hub's and the control API's listening sockets, the state directory and
//! its lock, the security log. Then [`become_user`] hands the state directory to the user
//! ([`hand_over`]: the directory and the files in it change owner) and switches the whole
//! process (every thread, as glibc's `setuid` does) to the user and group for good: the
//! supplementary groups are replaced by the one group, the real, effective and saved ids all
//! change, so every capability is gone and cannot come back, and `no_new_privs` is set so no
//! program it could run gains any. What stays open stays usable: the TAP and raw descriptors
//! need no privilege once open.
//!
//! What the user must be able to do afterwards: write the state directory (handed over here),
//! read the configuration file and the policy modules (a reload re-reads them), write the
//! capture file's directory, and send ping through ICMP sockets (the group must be in
//! `net.ipv4.ping_group_range`, or hubnat answers echo itself).

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::config::ProcessConfig;

/// The account the process becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The user's name (or the number as given).
    pub user: String,
    /// Its id.
    pub uid: u32,
    /// The group's id.
    pub gid: u32,
}

/// Why the process could not become the configured user.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// No such user or group.
    #[error("config key {key} = {name:?}: no such {what} on this system")]
    Unknown {
        /// `process.user` or `process.group`.
        key: &'static str,
        /// The name given.
        name: String,
        /// "user" or "group".
        what: &'static str,
    },
    /// The process is not root, and is not that user already.
    #[error(
        "config key process.user = {user:?}: hubnat runs as uid {uid}, not root, so it cannot \
         become uid {target}; start it as root, or leave process.user unset"
    )]
    NotRoot {
        /// The user asked for.
        user: String,
        /// Who the process is.
        uid: u32,
        /// Who it should become.
        target: u32,
    },
    /// A system call failed.
    #[error("cannot become user {user:?}: {step}: {source}")]
    Failed {
        /// The user asked for.
        user: String,
        /// What was being done.
        step: String,
        /// The OS error.
        source: io::Error,
    },
    /// The user could not reach the state directory.
    #[error(
        "state.dir = {dir:?}: user {user:?} could not reach it once root is given up: {path:?} \
         is mode {mode:o}, owned by uid {owner}; let others search it (chmod o+x), or put the \
         state directory elsewhere"
    )]
    Unreachable {
        /// The user.
        user: String,
        /// The state directory.
        dir: PathBuf,
        /// The ancestor the user cannot search.
        path: PathBuf,
        /// Its mode.
        mode: u32,
        /// Its owner.
        owner: u32,
    },
}

/// The account `config` names, or `None` when it names none.
pub fn resolve(config: &ProcessConfig) -> Result<Option<Account>, PrivilegeError> {
    let Some(user) = &config.user else {
        return Ok(None);
    };
    let (uid, primary) = lookup_user(user)?;
    let gid = match &config.group {
        Some(group) => lookup_group(group)?,
        None => primary,
    };
    Ok(Some(Account {
        user: user.clone(),
        uid,
        gid,
    }))
}

/// A user's id and primary group, by name or number.
fn lookup_user(name: &str) -> Result<(u32, u32), PrivilegeError> {
    let unknown = || PrivilegeError::Unknown {
        key: "process.user",
        name: name.to_owned(),
        what: "user",
    };
    let c = CString::new(name).map_err(|_| unknown())?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: passwd is plain data; all-zero is a valid value to be overwritten.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives the use of pw's strings.
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc == 0 && !found.is_null() {
        return Ok((pw.pw_uid, pw.pw_gid));
    }
    // A number names the uid itself; its group is the same number unless one is given.
    name.parse::<u32>().map(|n| (n, n)).map_err(|_| unknown())
}

/// A group's id, by name or number.
fn lookup_group(name: &str) -> Result<u32, PrivilegeError> {
    let unknown = || PrivilegeError::Unknown {
        key: "process.group",
        name: name.to_owned(),
        what: "group",
    };
    let c = CString::new(name).map_err(|_| unknown())?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: group is plain data; all-zero is a valid value to be overwritten.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc == 0 && !found.is_null() {
        return Ok(gr.gr_gid);
    }
    name.parse::<u32>().map_err(|_| unknown())
}

fn os_error(account: &Account, step: impl Into<String>) -> PrivilegeError {
    PrivilegeError::Failed {
        user: account.user.clone(),
        step: step.into(),
        source: io::Error::last_os_error(),
    }
}

fn chown(account: &Account, path: &Path) -> Result<(), PrivilegeError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| os_error(account, format!("{} has a NUL byte", path.display())))?;
    // SAFETY: c is a valid NUL-terminated path. lchown: a symbolic link is not followed.
    if unsafe { libc::lchown(c.as_ptr(), account.uid, account.gid) } != 0 {
        return Err(os_error(account, format!("chown {}", path.display())));
    }
    Ok(())
}

/// Gives the state directory `dir` and the entries in it (not below), and the `files`
/// elsewhere (a security log outside it), to `account`, after checking that the user can
/// reach the directory.
pub fn hand_over(dir: &Path, files: &[PathBuf], account: &Account) -> Result<(), PrivilegeError> {
    let dir = std::fs::canonicalize(dir)
        .map_err(|_| os_error(account, format!("find {}", dir.display())))?;
    // Every ancestor must let the user search it.
    for ancestor in dir.ancestors().skip(1) {
        use std::os::unix::fs::MetadataExt;
        let Ok(m) = std::fs::metadata(ancestor) else {
            continue;
        };
        let mode = m.mode();
        let searchable = if m.uid() == account.uid {
            mode & 0o100 != 0
        } else if m.gid() == account.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            return Err(PrivilegeError::Unreachable {
                user: account.user.clone(),
                dir: dir.clone(),
                path: ancestor.to_owned(),
                mode: mode & 0o7777,
                owner: m.uid(),
            });
        }
    }
    chown(account, &dir)?;
    let entries = std::fs::read_dir(&dir)
        .map_err(|_| os_error(account, format!("list {}", dir.display())))?;
    for entry in entries.flatten() {
        // The control socket stays its starter's: the operators who may change settings are
        // its owner and root, not the user the gateway becomes.
        if entry.file_type().is_ok_and(|t| {
            use std::os::unix::fs::FileTypeExt;
            t.is_socket()
        }) {
            continue;
        }
        chown(account, &entry.path())?;
    }
    for file in files.iter().filter(|f| f.exists()) {
        chown(account, file)?;
    }
    Ok(())
}

/// Sets `no_new_privs`: nothing this process runs can gain privileges (set-uid programs,
/// file capabilities). `hubnat run` sets it whoever it runs as.
pub fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The uid the process runs as.
pub fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Becomes `account` for good (see the module's documentation), after handing it `state_dir`
/// and `files` ([`hand_over`]). Already being that user is fine; being another user than root
/// is an error.
pub fn become_user(
    account: &Account,
    state_dir: &Path,
    files: &[PathBuf],
) -> Result<(), PrivilegeError> {
    let uid = current_uid();
    if uid == account.uid {
        return Ok(());
    }
    if uid != 0 {
        return Err(PrivilegeError::NotRoot {
            user: account.user.clone(),
            uid,
            target: account.uid,
        });
    }
    hand_over(state_dir, files, account)?;
    let groups = [account.gid as libc::gid_t];
    // SAFETY: plain system calls on values; glibc applies the id changes to every thread.
    unsafe {
        if libc::setgroups(1, groups.as_ptr()) != 0 {
            return Err(os_error(account, "setgroups"));
        }
        if libc::setresgid(account.gid, account.gid, account.gid) != 0 {
            return Err(os_error(account, "setresgid"));
        }
        if libc::setresuid(account.uid, account.uid, account.uid) != 0 {
            return Err(os_error(account, "setresuid"));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(os_error(account, "prctl(PR_SET_NO_NEW_PRIVS)"));
        }
        // For good: root cannot be had back.
        if libc::setuid(0) == 0 {
            return Err(PrivilegeError::Failed {
                user: account.user.clone(),
                step: "check".into(),
                source: io::Error::other("the process could become root again"),
            });
        }
    }
    Ok(())
}

/// The user name of `uid`, for messages.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: as in lookup_user.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so pw_name points to a NUL-terminated string in buf.
    Some(
        unsafe { CStr::from_ptr(pw.pw_name) }
            .to_string_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_and_number() {
        let root = ProcessConfig {
            user: Some("root".into()),
            ..ProcessConfig::default()
        };
        assert_eq!(
            resolve(&root).unwrap(),
            Some(Account {
                user: "root".into(),
                uid: 0,
                gid: 0
            })
        );
        let numbers = ProcessConfig {
            user: Some("4321".into()),
            group: Some("4322".into()),
            ..ProcessConfig::default()
        };
        assert_eq!(
            resolve(&numbers).unwrap().map(|a| (a.uid, a.gid)),
            Some((4321, 4322))
        );
        let bogus = ProcessConfig {
            user: Some("no-such-user-here".into()),
            ..ProcessConfig::default()
        };
        let err = resolve(&bogus).unwrap_err().to_string();
        assert_eq!(
            err,
            "config key process.user = \"no-such-user-here\": no such user on this system"
        );
        assert_eq!(resolve(&ProcessConfig::default()).unwrap(), None);
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
