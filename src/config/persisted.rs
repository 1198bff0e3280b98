//! Settings changed at run time, kept in the state directory so that they survive a restart.
//!
//! # Theory of operation
//!
//! The control API changes live settings with [`Config::with_changes`]; after a change has
//! applied, the [`Change`]s are merged into `overrides.toml` in the state directory
//! ([`persist_changes`], written atomically), as TOML tables like the configuration file's:
//!
//! ```toml
//! [dhcp]
//! range_end = "192.168.30.100"
//! lease = "10m"
//! ```
//!
//! At start the loader reads the file as a layer of its own ([`Sources::persisted`]), named
//! [`ORIGIN_PERSISTED`] in errors and in the list of overridden values. It sits **after the
//! file and the environment and before the flags**: an operator's change outlives a restart
//! even though the configuration file says otherwise (the file stays the user's; hubnat never
//! writes it), and a flag given to this start still wins. A key in it that a newer
//! configuration file makes invalid is reported like any other, "from the state directory";
//! delete the line (or the file) to go back to the file's value.
//!
//! [`Sources::persisted`]: super::Sources::persisted

use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map};
use figment::{Metadata, Profile, Provider};

use super::layers::{origin_of, ORIGIN_DEFAULTS};
use super::render::{flatten, key_segments};
use super::{Change, Config, Sources};

/// The file of persisted changes, in the state directory.
pub const OVERRIDES_FILE: &str = "overrides.toml";

/// The name of the persisted layer in errors and in [`Overridden::origin`].
pub const ORIGIN_PERSISTED: &str = "the state directory (overrides.toml, changed at run time)";

/// The persisted changes of the state directory `dir`.
pub fn overrides_path(dir: &Path) -> PathBuf {
    dir.join(OVERRIDES_FILE)
}

/// The persisted layer: `overrides.toml` read as TOML, named [`ORIGIN_PERSISTED`].
pub(super) struct PersistedLayer {
    pub(super) path: PathBuf,
}

impl Provider for PersistedLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(ORIGIN_PERSISTED)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Toml::string(&text)
                .data()
                .map_err(|e| figment::Error::from(format!("{}: {e}", self.path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Map::new()),
            Err(e) => Err(figment::Error::from(format!(
                "cannot read {}: {e}",
                self.path.display()
            ))),
        }
    }
}

/// Why persisting changes failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The existing file is not TOML (someone edited it).
    #[error("{path} is not valid TOML: {reason}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] crate::state::StateError),
}

/// Merges `changes` into `overrides.toml` in the state directory `dir` (written atomically).
pub fn persist_changes(dir: &Path, changes: &[Change]) -> Result<(), PersistError> {
    let path = overrides_path(dir);
    let mut table: toml::Table = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .parse()
            .map_err(|e: toml::de::Error| PersistError::Syntax {
                path: path.clone(),
                reason: e.message().to_string(),
            })?,
        Err(_) => toml::Table::new(),
    };
    for change in changes {
        let value = match format!("v = {}", change.new).parse::<toml::Table>() {
            Ok(mut t) => t
                .remove("v")
                .unwrap_or(toml::Value::String(change.new.clone())),
            Err(_) => toml::Value::String(change.new.clone()),
        };
        let mut segments = change.key.split('.').peekable();
        let mut cursor = &mut table;
        while let Some(segment) = segments.next() {
            if segments.peek().is_none() {
                cursor.insert(segment.to_string(), value.clone());
                break;
            }
            let entry = cursor
                .entry(segment.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            cursor = entry.as_table_mut().expect("invariant: just made a table");
        }
    }
    let text = format!(
        "# Settings changed at run time through hubnat's control API. hubnat rewrites this\n\
         # file; it wins over the configuration file and the environment, not over flags.\n\
         # Delete a line (or the file) to go back to the configuration file's value.\n\n{}",
        toml::to_string(&table).unwrap_or_default()
    );
    crate::state::write_atomic(&path, text.as_bytes())?;
    Ok(())
}

/// One value that differs from the built-in defaults, and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Overridden {
    /// The full dotted key.
    pub key: String,
    /// The value as the file writes it.
    pub value: String,
    /// "file x.toml", "environment variable HUBNAT_NAT__MTU", [`ORIGIN_PERSISTED`], …
    pub origin: String,
}

impl Config {
    /// The values of `config` (loaded from `sources`) that some layer other than the built-in
    /// defaults set, with where each came from, in the file's order. Reads the layers again.
    pub fn overridden(config: &Config, sources: &Sources) -> Vec<Overridden> {
        let figment = Config::figment(sources);
        flatten(config)
            .into_iter()
            .filter_map(|(key, value)| {
                let origin = origin_of(&figment, &key_segments(&key));
                (origin != ORIGIN_DEFAULTS).then_some(Overridden { key, value, origin })
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Result
mod tests {
    use figment::Jail;

    use super::*;
    use crate::config::Override;

    #[test]
    fn persisted_changes_sit_between_the_environment_and_the_flags() {
        Jail::expect_with(|jail| {
            let dir = jail.directory().join("state");
            std::fs::create_dir_all(&dir).expect("state dir");
            jail.create_file(
                "x.toml",
                &format!(
                    "state.dir = {:?}\n[dhcp]\nlease = \"1h\"\nrange_end = \"192.168.30.150\"\n",
                    dir.display().to_string()
                ),
            )?;
            jail.set_env("HUBNAT_NAT__TCP_TIMEOUT", "30m");
            let running = Config::load(&Sources {
                file: Some("x.toml".into()),
                ..Sources::default()
            })
            .expect("valid")
            .config;
            let (_, changes) = running
                .with_changes(
                    &[
                        Override::new("dhcp.lease", "10m"),
                        Override::new("nat.tcp_timeout", "5m"),
                        Override::new("nat.mtu", "1400"),
                        Override::new("dhcp.dns", "[\"192.168.30.2\"]"),
                    ],
                    "the control API",
                )
                .expect("valid changes");
            persist_changes(&dir, &changes).expect("persisted");
            let text = std::fs::read_to_string(overrides_path(&dir)).expect("written");
            assert!(
                text.contains("[dhcp]") && text.contains("lease = \"10m\""),
                "{text}"
            );

            let sources = Sources {
                file: Some("x.toml".into()),
                env: true,
                persisted: true,
                overrides: vec![Override::new("nat.mtu", "1300")],
                ..Sources::default()
            };
            let c = Config::load(&sources).expect("valid").config;
            assert_eq!(c.dhcp.lease.as_secs(), 600, "over the file");
            assert_eq!(c.nat.tcp_timeout.as_secs(), 300, "over the environment");
            assert_eq!(c.nat.mtu, 1300, "the flag wins");
            assert_eq!(c.dhcp.dns, vec![std::net::Ipv4Addr::new(192, 168, 30, 2)]);
            assert_eq!(c.dhcp.range_end, std::net::Ipv4Addr::new(192, 168, 30, 150));

            let overridden = Config::overridden(&c, &sources);
            let origin = |key: &str| {
                overridden
                    .iter()
                    .find(|o| o.key == key)
                    .map(|o| o.origin.clone())
                    .unwrap_or_default()
            };
            assert_eq!(origin("dhcp.lease"), ORIGIN_PERSISTED);
            assert_eq!(origin("nat.mtu"), "the command line");
            assert_eq!(origin("dhcp.range_end"), "file x.toml");
            assert_eq!(origin("dhcp.range_start"), "", "defaults are not listed");

            // A persisted value a new file makes invalid is named as coming from there.
            jail.create_file(
                "x.toml",
                &format!(
                    "state.dir = {:?}\n[dhcp]\nrange_start = \"192.168.30.50\"\n",
                    dir.display().to_string()
                ),
            )?;
            persist_changes(
                &dir,
                &[Change {
                    key: "dhcp.range_end".into(),
                    old: String::new(),
                    new: "\"192.168.30.20\"".into(),
                }],
            )
            .expect("persisted");
            let text = Config::load(&sources).expect_err("invalid").to_string();
            assert!(
                text.contains(&format!("(from {ORIGIN_PERSISTED})")),
                "{text}"
            );
            Ok(())
        });
    }
}
