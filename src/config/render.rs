//! How the configuration speaks: its errors, and values and keys written for people.
//!
//! # Theory of operation
//!
//! Every [`ConfigError`] names the key (or the file), the value as TOML would show it, where
//! the value came from, and what is wrong, in one line:
//!
//! ```text
//! config key dhcp.range_end = 192.168.31.5 (from file ./x.toml): outside the subnet 192.168.30.0/24 given by host.ip and host.mask
//! ```
//!
//! figment's own errors (type mismatches, unknown keys, unreadable files) are translated here
//! into the same form ([`ConfigError::from_figment`]), looking the offending value and its
//! layer up in the figment, so a wrong type reads like a failed validation. Keys are written
//! `dhcp.static[1].ip`: dots between tables, `[i]` for list items.

use std::path::PathBuf;

use figment::value::Value;
use figment::Figment;

use super::layers::{describe_origin, lookup, ORIGIN_DEFAULTS};
use super::{Config, MacAddr, MIN_MTU};

/// Splits `dhcp.static[1].ip` into `["dhcp", "static", "1", "ip"]`.
pub(super) fn key_segments(key: &str) -> Vec<String> {
    key.split(['.', '[', ']'])
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// True for a path segment that indexes a list.
pub(super) fn is_index(segment: &str) -> bool {
    !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit())
}

/// Joins `["dhcp", "static", "1", "ip"]` into `dhcp.static[1].ip`.
pub(super) fn display_key(segments: &[String]) -> String {
    let mut key = String::new();
    for seg in segments {
        if is_index(seg) {
            key.push_str(&format!("[{seg}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(seg);
        }
    }
    key
}

/// A figment value written the way TOML would show it.
pub(super) fn render_value(value: &Value) -> String {
    match value {
        Value::String(_, s) => format!("{s:?}"),
        Value::Char(_, c) => format!("{:?}", c.to_string()),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(..) => value
            .to_i128()
            .map(|n| n.to_string())
            .or_else(|| value.to_u128().map(|n| n.to_string()))
            .or_else(|| value.to_f64().map(|n| n.to_string()))
            .unwrap_or_else(|| "?".into()),
        Value::Empty(..) => "(nothing)".into(),
        Value::Dict(_, dict) => {
            let items: Vec<String> = dict
                .iter()
                .map(|(k, v)| format!("{k} = {}", render_value(v)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
        Value::Array(_, items) => {
            let items: Vec<String> = items.iter().map(render_value).collect();
            format!("[{}]", items.join(", "))
        }
    }
}

/// Every key of `config` with its value written as the file writes it (`"2h"`, `1500`,
/// `["192.168.30.1"]`), in the file's order. A table is not a key of its own; a list is one
/// value, a `[[dhcp.static]]` list too (an inline array of tables). An optional value the file
/// leaves out when it is unset (`host.mac`) is not listed.
pub(super) fn flatten(config: &Config) -> Vec<(String, String)> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<(String, String)>) {
        for (name, value) in table {
            let key = match prefix {
                "" => name.clone(),
                _ => format!("{prefix}.{name}"),
            };
            match value {
                toml::Value::Table(inner) => walk(&key, inner, out),
                leaf => out.push((key, leaf.to_string())),
            }
        }
    }
    let mut out = Vec::new();
    match toml::Value::try_from(config) {
        Ok(toml::Value::Table(table)) => walk("", &table, &mut out),
        other => unreachable!("invariant: a Config serializes to a TOML table, not {other:?}"),
    }
    out
}

/// How the file writes an optional value that is not set.
pub(super) const UNSET: &str = "\"\"";

/// Every key of the configuration, in the file's order: the keys [`flatten`] gives for a
/// configuration whose optional values are all set.
pub(super) fn all_keys() -> Vec<String> {
    let mut full = Config::default();
    full.host.mac = Some(MacAddr([0x00, 0xac, 0, 0, 0, 1]));
    full.backend.tap.mtu = Some(MIN_MTU);
    full.log.security_log = Some(PathBuf::from("security.log"));
    full.control.socket = Some(PathBuf::from("control.sock"));
    flatten(&full).into_iter().map(|(key, _)| key).collect()
}

/// "a string", "an integer", … for a serde `Unexpected` value.
fn actual_kind(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean".into(),
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer".into(),
        Actual::Float(_) => "a float".into(),
        Actual::Char(_) | Actual::Str(_) => "a string".into(),
        Actual::Seq => "a list".into(),
        Actual::Map => "a table".into(),
        Actual::Unit | Actual::Option => "nothing".into(),
        other => other.to_string(),
    }
}

/// The value inside a serde `Unexpected`, if it carries one.
fn actual_value(actual: &figment::error::Actual) -> Option<String> {
    use figment::error::Actual;
    match actual {
        Actual::Bool(b) => Some(b.to_string()),
        Actual::Unsigned(n) => Some(n.to_string()),
        Actual::Signed(n) => Some(n.to_string()),
        Actual::Float(n) => Some(n.to_string()),
        Actual::Char(c) => Some(format!("{:?}", c.to_string())),
        Actual::Str(s) => Some(format!("{s:?}")),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a configuration cannot be used. Every message names the key (or file), the value, where
/// it came from and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file cannot be read.
    #[error("configuration file {} {reason}", path.display())]
    File {
        /// The path given with `--config`.
        path: PathBuf,
        /// "does not exist", or the I/O error.
        reason: String,
    },
    /// The configuration file is not valid TOML.
    #[error("configuration file {} is not valid TOML: {reason}", path.display())]
    Syntax {
        /// The path given with `--config`.
        path: PathBuf,
        /// The parser's message, with line and column.
        reason: String,
    },
    /// A command-line `KEY=VALUE` is malformed.
    #[error("command line setting {arg:?}: {reason}")]
    Override {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is wrong.
    #[error("config key {key}{} ({origin}): {reason}", value_suffix(.value))]
    Invalid {
        /// The dotted key, with `[i]` for list items (`dhcp.static[1].ip`).
        key: String,
        /// The offending value as TOML would show it, when known.
        value: Option<String>,
        /// Where the value came from: "from file x.toml", "from environment variable
        /// HUBNAT_NAT__MTU", "from the command line", "from the built-in defaults".
        origin: String,
        /// What is wrong, and how to put it right.
        reason: String,
    },
    /// More than one of the above, in the order found.
    #[error("{}", join_lines(.0))]
    Several(Vec<ConfigError>),
}

fn value_suffix(value: &Option<String>) -> String {
    value
        .as_ref()
        .map(|v| format!(" = {v}"))
        .unwrap_or_default()
}

fn join_lines(errors: &[ConfigError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// Something the loader noticed and did not refuse. Its message names what it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigWarning {
    /// A `HUBNAT_…` environment variable that names no section of the configuration, such as
    /// `HUBNAT_BIN` set by a wrapper script. It is ignored. (A variable that names a section
    /// but not one of its keys, such as `HUBNAT_NAT__MTUU`, is an error: it is a typo.)
    #[error(
        "environment variable {name} is ignored: it names no hubnat setting (variables \
         HUBNAT_SECTION__KEY set section.key, e.g. HUBNAT_DHCP__LEASE=1h; the sections are \
         {sections})"
    )]
    UnknownEnv {
        /// The variable's name, as it is in the environment.
        name: String,
        /// The sections, comma-separated.
        sections: String,
    },
}

impl ConfigError {
    /// The individual errors: itself, or the members of [`ConfigError::Several`].
    pub fn errors(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Several(all) => all.iter().flat_map(|e| e.errors()).collect(),
            one => vec![one],
        }
    }

    /// Converts figment's error(s) from extracting `figment`, looking values and their
    /// sources up in it.
    pub fn from_figment(error: figment::Error, figment: &Figment) -> ConfigError {
        let mut all: Vec<ConfigError> = error
            .into_iter()
            .map(|e| Self::from_one_figment_error(e, figment))
            .collect();
        match all.len() {
            1 => all.remove(0),
            _ => ConfigError::Several(all),
        }
    }

    fn from_one_figment_error(e: figment::Error, figment: &Figment) -> ConfigError {
        use figment::error::Kind;

        let file = e
            .metadata
            .as_ref()
            .and_then(|m| m.source.as_ref())
            .and_then(|s| s.file_path());
        if let (Some(path), true, Kind::Message(msg)) = (file, e.path.is_empty(), &e.kind) {
            // The provider itself failed: the file could not be read or parsed.
            let reason = msg.trim_end().to_string();
            return if msg.starts_with("TOML parse error") {
                ConfigError::Syntax {
                    path: path.to_path_buf(),
                    reason,
                }
            } else {
                ConfigError::File {
                    path: path.to_path_buf(),
                    reason: format!("cannot be read: {reason}"),
                }
            };
        }

        let mut segments = e.path.clone();
        let (value_from_kind, reason) = match &e.kind {
            Kind::UnknownField(field, expected) => {
                // figment's path already ends with the unknown key.
                if segments.last() != Some(field) {
                    segments.push(field.clone());
                }
                let table = match &segments[..segments.len() - 1] {
                    [] => "the top level".to_string(),
                    [path @ .., index] if is_index(index) => {
                        format!("a [[{}]] entry", path.join("."))
                    }
                    path => format!("[{}]", path.join(".")),
                };
                (
                    None,
                    format!("unknown key; {table} accepts: {}", expected.join(", ")),
                )
            }
            Kind::MissingField(field) => {
                if segments.last().map(String::as_str) != Some(field.as_ref()) {
                    segments.push(field.to_string());
                }
                (None, "this key is required here".to_string())
            }
            Kind::UnknownVariant(found, expected) => (
                Some(format!("{found:?}")),
                format!("unknown value; valid values are: {}", expected.join(", ")),
            ),
            Kind::InvalidType(actual, expected) => (
                actual_value(actual),
                format!("expected {expected}, found {}", actual_kind(actual)),
            ),
            Kind::InvalidValue(actual, expected) => (
                actual_value(actual),
                format!("invalid value, expected {expected}"),
            ),
            Kind::Message(msg) => (None, msg.trim_end().to_string()),
            other => (None, other.to_string()),
        };

        let found = lookup(figment, &segments);
        let value = found.as_ref().map(render_value).or(value_from_kind);
        // The erroring value's own tag names its source; for an unknown key the tag is the
        // table's, so prefer the unknown value's own.
        let metadata = found
            .as_ref()
            .and_then(|v| figment.get_metadata(v.tag()))
            .or(e.metadata.as_ref());
        let origin = match metadata {
            Some(md) => describe_origin(
                md,
                e.profile.as_ref().unwrap_or(figment.profile()),
                &segments,
            ),
            None => ORIGIN_DEFAULTS.to_string(),
        };
        ConfigError::Invalid {
            key: if segments.is_empty() {
                "(top level)".into()
            } else {
                display_key(&segments)
            },
            value,
            origin: format!("from {origin}"),
            reason,
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Result
mod tests {
    use std::collections::BTreeSet;

    use figment::Jail;

    use crate::config::testing::*;
    use crate::config::*;

    use super::*;

    #[test]
    fn all_keys_are_every_key_in_the_files_order() {
        let keys = all_keys();
        // A new key changes the count. If it is an optional value that the file leaves out
        // when unset (`skip_serializing_if`), set it in all_keys() and below.
        assert_eq!(
            (keys.first().map(String::as_str), keys.len()),
            (Some("host.enabled"), 59)
        );
        // A configuration with every optional value set shows no key all_keys lacks.
        let mut c = Config::default();
        c.host.mac = Some(mac("00:ac:00:00:00:01"));
        c.backend.tap.mtu = Some(1500);
        c.log.security_log = Some("/x".into());
        c.control.socket = Some("/x.sock".into());
        for (key, _) in flatten(&c) {
            assert!(keys.contains(&key), "{key}");
        }
        assert_eq!(flatten(&c).len(), keys.len());
    }

    #[test]
    fn invalid_toml_names_the_path_and_line() {
        Jail::expect_with(|jail| {
            let err = load_toml(jail, "[dhcp]\nlease = = \"2h\"\n").expect_err("bad TOML");
            assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
            let text = err.to_string();
            assert!(
                text.starts_with("configuration file x.toml is not valid TOML"),
                "{text}"
            );
            assert!(text.contains("line 2"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected_in_every_table() {
        let lease = "mac = \"00:ac:00:00:00:01\"\nip = \"192.168.30.50\"\n";
        for (toml, key) in [
            ("bogus = 1".to_string(), "bogus"),
            ("[host]\nbogus = 1".into(), "host.bogus"),
            ("[dhcp]\nbogus = 1".into(), "dhcp.bogus"),
            (
                format!("[[dhcp.static]]\n{lease}bogus = 1"),
                "dhcp.static[0].bogus",
            ),
            ("[nat]\nbogus = 1".into(), "nat.bogus"),
            ("[dns]\nbogus = 1".into(), "dns.bogus"),
            ("[backend]\nbogus = 1".into(), "backend.bogus"),
            ("[backend.tap]\nbogus = 1".into(), "backend.tap.bogus"),
            ("[backend.raw]\nbogus = 1".into(), "backend.raw.bogus"),
            ("[backend.hub]\nbogus = 1".into(), "backend.hub.bogus"),
            ("[capture]\nbogus = 1".into(), "capture.bogus"),
            ("[state]\nbogus = 1".into(), "state.bogus"),
            ("[log]\nbogus = 1".into(), "log.bogus"),
        ] {
            assert_rejects(
                &toml,
                &[&format!(
                    "config key {key} = 1 (from file x.toml): unknown key"
                )],
            );
        }
        assert_rejects(
            "[dhcp]\nrange_begin = \"192.168.30.10\"",
            &["dhcp.range_begin", "[dhcp] accepts: enabled, range_start"],
        );
        assert_rejects(
            &format!("[[dhcp.static]]\n{lease}name = \"x\""),
            &["a [[dhcp.static]] entry accepts: mac, ip, hostname"],
        );
        Jail::expect_with(|jail| {
            jail.set_env("HUBNAT_NAT__BOGUS", "1");
            let text = load(&Sources {
                env: true,
                ..Sources::default()
            })
            .expect_err("unknown")
            .to_string();
            assert!(text.contains("config key nat.bogus = 1 (from environment variable HUBNAT_NAT__BOGUS): unknown key"), "{text}");
            let cli = Sources {
                overrides: vec![Override::new("bogus.key", "x")],
                ..Sources::default()
            };
            let text = load(&cli).expect_err("unknown").to_string();
            assert!(
                text.contains(
                    "config key bogus = { key = \"x\" } (from the command line): unknown key"
                ),
                "{text}"
            );
            Ok(())
        });
    }

    /// Like the test above, but the tables come from the configuration itself, so a table
    /// added later is covered without touching this test; and each table is tried from the
    /// file, the environment and the command line.
    #[test]
    fn an_unknown_key_is_refused_in_every_table_from_every_layer() {
        let mut tables: BTreeSet<String> = all_keys()
            .iter()
            .filter_map(|key| key.rsplit_once('.').map(|(table, _)| table.to_string()))
            .collect();
        assert!(
            tables.contains("backend.hub") && tables.contains("dns"),
            "{tables:?}"
        );
        tables.insert(String::new()); // the top level
        for table in &tables {
            let (toml, key) = match table.as_str() {
                "" => ("bogus_key = 1".to_string(), "bogus_key".to_string()),
                _ => (
                    format!("[{table}]\nbogus_key = 1"),
                    format!("{table}.bogus_key"),
                ),
            };
            assert_rejects(
                &toml,
                &[&format!(
                    "config key {key} = 1 (from file x.toml): unknown key"
                )],
            );
        }
        // A [[dhcp.static]] entry, the one list of tables.
        assert_rejects(
            "[[dhcp.static]]\nmac = \"00:ac:00:00:00:01\"\nip = \"192.168.30.50\"\nbogus_key = 1",
            &["config key dhcp.static[0].bogus_key = 1 (from file x.toml): unknown key"],
        );
        for table in tables.iter().filter(|t| !t.is_empty()) {
            Jail::expect_with(|jail| {
                let key = format!("{table}.bogus_key");
                let cli = Sources {
                    overrides: vec![Override::new(key.clone(), "1")],
                    ..Sources::default()
                };
                let text = load(&cli).expect_err("unknown").to_string();
                let expected = format!("config key {key} = 1 (from the command line): unknown key");
                assert!(text.starts_with(&expected), "{text}");

                // (A variable that names no section at all is a warning: see layers.rs.)
                let var = format!(
                    "HUBNAT_{}__BOGUS_KEY",
                    table.to_uppercase().replace('.', "__")
                );
                jail.set_env(&var, "1");
                let env = Sources {
                    env: true,
                    ..Sources::default()
                };
                let text = load(&env).expect_err("unknown").to_string();
                let expected =
                    format!("config key {key} = 1 (from environment variable {var}): unknown key");
                assert!(text.starts_with(&expected), "{text}");
                Ok(())
            });
        }
    }

    #[test]
    fn type_errors_name_key_value_and_expectation() {
        assert_rejects(
            "[nat]\nmtu = \"big\"",
            &["config key nat.mtu = \"big\" (from file x.toml): expected u32, found a string"],
        );
        assert_rejects(
            "[dhcp]\nenabled = \"yes\"",
            &["dhcp.enabled = \"yes\"", "expected a boolean"],
        );
        assert_rejects(
            "[dhcp]\nrange_start = \"192.168.30\"",
            &["dhcp.range_start = \"192.168.30\"", "invalid IPv4 address"],
        );
        assert_rejects("[backend]\nkind = \"vde\"", &["config key backend.kind = \"vde\" (from file x.toml): unknown value; valid values are: tap, raw, hub, memory"]);
        assert_rejects(
            "[log]\nformat = \"xml\"",
            &["log.format = \"xml\"", "text, json"],
        );
        assert_rejects(
            "[process]\nseccomp = \"strict\"",
            &["config key process.seccomp = \"strict\" (from file x.toml): unknown value; valid values are: enforce, log, off"],
        );
        assert_rejects(
            "[[dhcp.static]]\nip = \"192.168.30.50\"",
            &["config key dhcp.static[0].mac (from file x.toml): this key is required here"],
        );
        assert_rejects(
            "[host]\nmac = \"00:ac:12:34:56\"",
            &["host.mac = \"00:ac:12:34:56\"", "invalid MAC address"],
        );
        assert_rejects(
            "dhcp = 5",
            &["config key dhcp = 5", "expected struct DhcpConfig"],
        );
    }
}
