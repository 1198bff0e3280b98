//! The layers a configuration is built from, and where each value came from.
//!
//! # Theory of operation
//!
//! [`Config::figment`] stacks the layers of [`Sources`] with figment, lowest first; a later
//! layer wins key by key, and lists are replaced whole, never concatenated:
//!
//! 1. the built-in defaults ([`Config::default()`]);
//! 2. the host's defaults ([`Sources::host`], a [`HostDefaults`]): `dns.upstream` and
//!    `dhcp.domain` as the host gives them, each a layer named after where it was found;
//! 3. the TOML file ([`Sources::file`]); it must exist;
//! 4. `HUBNAT_…` environment variables ([`Sources::env`]); `__` separates the levels;
//! 5. the changes made at run time and kept in the state directory ([`Sources::persisted`];
//!    `PersistedLayer`, read from the state directory the other layers name);
//! 6. command-line overrides, `--set KEY=VALUE` ([`Override`]), in order.
//!
//! Each layer is a figment provider with metadata that names it, and figment tags every value
//! with the layer it came from. [`Origins`] reads those tags back, so an error can say "from
//! file x.toml", "from environment variable HUBNAT_NAT__MTU", "from /etc/resolv.conf" or "from
//! the command line". Every
//! provider reads its input when it is merged, so after [`Config::figment`] returns, extracting
//! and validating are pure.
//!
//! [`Config::load`] is the loader: it checks that the file can be read, merges the layers,
//! extracts a [`Config`] (type errors become [`ConfigError`]s naming key, value and source) and
//! [validates](Config::validate) it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::host::{HostDefaults, RESOLV_CONF};
use super::persisted::{overrides_path, PersistedLayer};
use super::render::{is_index, key_segments};
use super::values::upstream_text;
use super::{Config, ConfigError, ConfigWarning};

/// The prefix of hubnat's environment variables.
pub const ENV_PREFIX: &str = "HUBNAT_";
/// What separates the levels of a key in an environment variable's name.
pub const ENV_SEPARATOR: &str = "__";

/// The one `HUBNAT_…` name that is not a key: left to the CLI (the file's path).
const ENV_RESERVED: &str = "config";

/// Metadata names of the layers; [`describe_origin`] turns them into "(from …)" texts.
pub(super) const ORIGIN_DEFAULTS: &str = "the built-in defaults";
const ORIGIN_ENV: &str = "environment variable";
const ORIGIN_CLI: &str = "the command line";

/// Where the configuration comes from. `Sources::default()` is the built-in defaults alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// The host's defaults for `dns.upstream` and `dhcp.domain`; `None`: the built-in
    /// defaults (none) stay. The binary passes [`HostDefaults::read()`]; a test or a program
    /// that embeds hubnat may pass its own, or none, to be independent of the machine.
    pub host: Option<HostDefaults>,
    /// The TOML file given with `--config`; it must exist.
    pub file: Option<PathBuf>,
    /// Whether to read `HUBNAT_…` environment variables (true in the binary).
    pub env: bool,
    /// Read the settings changed at run time and kept in the state directory
    /// (`<state.dir>/overrides.toml`, see [`persist_changes`](super::persist_changes)), a
    /// layer between the environment and the overrides (true in the binary).
    pub persisted: bool,
    /// Command-line overrides, applied in order (a later one wins).
    pub overrides: Vec<Override>,
}

/// One command-line setting: `--set dhcp.lease=1h`, or a dedicated flag turned into one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    /// The dotted key, e.g. `dhcp.lease`.
    pub key: String,
    /// The value as typed: a TOML value if it parses as one, else a plain string.
    pub value: String,
}

impl Override {
    /// An override of `key` with `value` (read like the VALUE of `--set KEY=VALUE`).
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Override {
            key: key.into(),
            value: value.into(),
        }
    }

    /// Whether `key` is dotted lowercase words (`dhcp.range_start`), as a key must be.
    pub(super) fn well_formed(key: &str) -> bool {
        key.split('.').all(|word| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
    }

    /// The value as figment will see it.
    pub(super) fn parsed_value(&self) -> Value {
        let raw = self.value.trim();
        // One line can hold only one key/value pair, so nothing else can be injected.
        if !raw.contains(['\n', '\r']) {
            let doc = format!("v = {raw}");
            if let Ok(value) = Figment::from(Toml::string(&doc)).find_value("v") {
                // The value carries the tag of the scratch figment that parsed it, which names
                // no layer; an untagged copy takes the tag of the layer it is merged into, so
                // errors about it name that layer.
                return Value::serialize(&value).unwrap_or(value);
            }
        }
        match raw.parse::<Value>() {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }
}

impl FromStr for Override {
    type Err = ConfigError;

    /// Parses `KEY=VALUE`; KEY is dotted lowercase words (`dhcp.range_start`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ConfigError::Override {
            arg: s.into(),
            reason: reason.into(),
        };
        let (key, value) = s.split_once('=').ok_or_else(|| bad("expected KEY=VALUE"))?;
        let key = key.trim();
        if !Override::well_formed(key) {
            return Err(bad(MALFORMED_KEY));
        }
        Ok(Override::new(key, value))
    }
}

/// Why a key is not [well formed](Override::well_formed).
pub(super) const MALFORMED_KEY: &str =
    "KEY must be dotted lowercase words like dhcp.range_start (see config/hubnat.toml)";

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// A whole configuration as a figment provider: the built-in defaults, or (for a live change)
/// the running configuration.
pub(super) struct ConfigLayer {
    pub(super) config: Config,
    /// The layer's name in errors: [`ORIGIN_DEFAULTS`], …
    pub(super) name: &'static str,
}

impl Provider for ConfigLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Serialized::defaults(&self.config).data()
    }
}

/// One value the host gives, as a figment provider named after where it was found.
struct HostLayer {
    /// "/etc/resolv.conf", "the host name box.example.lan".
    source: String,
    /// The dotted key.
    key: &'static str,
    value: Value,
}

impl HostLayer {
    /// The layers of `host`, lowest first.
    fn all(host: &HostDefaults) -> Vec<HostLayer> {
        let mut layers = Vec::new();
        if !host.nameservers.is_empty() {
            let servers: Vec<String> = host.nameservers.iter().map(|s| upstream_text(*s)).collect();
            layers.push(HostLayer {
                source: RESOLV_CONF.into(),
                key: "dns.upstream",
                value: Value::from(servers),
            });
        }
        if let Some(domain) = &host.domain {
            layers.push(HostLayer {
                source: domain.source.clone(),
                key: "dhcp.domain",
                value: Value::from(domain.name.clone()),
            });
        }
        layers
    }
}

impl Provider for HostLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.source.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let dict = figment::util::nest(self.key, self.value.clone())
            .into_dict()
            .ok_or_else(|| figment::Error::from(format!("invalid host key {:?}", self.key)))?;
        Ok(Profile::Default.collect(dict))
    }
}

/// `HUBNAT_…` environment variables whose first level names a section of the configuration,
/// with metadata that names each variable exactly. The others are left out, and
/// [`unknown_env_vars`] reports them.
struct EnvLayer {
    /// The sections of the configuration: `host`, `dhcp`, ….
    sections: Vec<String>,
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(ORIGIN_ENV).interpolater(|_: &Profile, keys: &[&str]| env_var_name(keys))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let sections = self.sections.clone();
        Env::prefixed(ENV_PREFIX)
            .split(ENV_SEPARATOR)
            .ignore(&[ENV_RESERVED])
            .filter(move |key| {
                let first = key.as_str().split('.').next().unwrap_or_default();
                sections.iter().any(|s| s.eq_ignore_ascii_case(first))
            })
            .data()
    }
}

/// The sections of the configuration, its top-level keys (`backend`, `capture`, …), sorted.
pub(super) fn sections() -> Vec<String> {
    // Serializing the defaults keeps this list in step with `Config`'s fields.
    serde_json::to_value(Config::default())
        .ok()
        .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect()))
        .unwrap_or_default()
}

/// The names of the `HUBNAT_…` environment variables that name no section (`HUBNAT_BIN`),
/// sorted. `HUBNAT_CONFIG` is the CLI's and not reported.
fn unknown_env_vars(sections: &[String]) -> Vec<String> {
    let mut names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| {
            let name = name.to_string_lossy().trim().to_string();
            let head = name.get(..ENV_PREFIX.len())?;
            if !head.eq_ignore_ascii_case(ENV_PREFIX) {
                return None;
            }
            let rest = &name[ENV_PREFIX.len()..];
            let first = rest.split(ENV_SEPARATOR).next().unwrap_or_default();
            let known = rest.eq_ignore_ascii_case(ENV_RESERVED)
                || sections.iter().any(|s| s.eq_ignore_ascii_case(first));
            (!known).then_some(name)
        })
        .collect();
    names.sort();
    names
}

/// The environment variable that sets the key made of `keys`.
fn env_var_name(keys: &[&str]) -> String {
    let upper: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
    format!("{ENV_PREFIX}{}", upper.join(ENV_SEPARATOR))
}

/// One command-line override as a figment provider (or, for a live change, one change, named
/// after where it came from).
pub(super) struct OverrideLayer {
    pub(super) setting: Override,
    /// The layer's name in errors: [`ORIGIN_CLI`], "the control API", …
    pub(super) name: String,
}

impl Provider for OverrideLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let key = &self.setting.key;
        let dict = figment::util::nest(key, self.setting.parsed_value())
            .into_dict()
            .ok_or_else(|| figment::Error::from(format!("invalid key {key:?}")))?;
        Ok(Profile::Default.collect(dict))
    }
}

/// What the loader gives: a valid configuration, and what it noticed without refusing it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "the warnings should be shown to the user"]
pub struct Loaded {
    /// The configuration, validated.
    pub config: Config,
    /// Things worth telling the user, in the order found: an unknown `HUBNAT_…` environment
    /// variable, for one. Print them once logging is up.
    pub warnings: Vec<ConfigWarning>,
}

impl Config {
    /// Reads, merges, extracts and validates the configuration from `sources`.
    ///
    /// Errors: the file is missing or unreadable ([`ConfigError::File`]), not TOML
    /// ([`ConfigError::Syntax`]), or a value is wrong ([`ConfigError::Invalid`], several at
    /// once as [`ConfigError::Several`]). An unknown key is an error in the file and in an
    /// override, and in an environment variable that names a section (`HUBNAT_NAT__MTUU`); an
    /// environment variable that names no section at all (`HUBNAT_BIN`, set by a wrapper) is
    /// only a warning in [`Loaded::warnings`].
    pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
        if let Some(path) = &sources.file {
            if let Err(e) = std::fs::read(path) {
                let reason = match e.kind() {
                    std::io::ErrorKind::NotFound => "does not exist".to_string(),
                    _ => format!("cannot be read: {e}"),
                };
                return Err(ConfigError::File {
                    path: path.clone(),
                    reason,
                });
            }
        }
        let figment = Self::figment(sources);
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::from_figment(e, &figment))?;
        config.validate(&Origins::new(&figment))?;
        let mut warnings = Vec::new();
        if sources.env {
            let sections = sections();
            let list = sections.join(", ");
            warnings.extend(unknown_env_vars(&sections).into_iter().map(|name| {
                ConfigWarning::UnknownEnv {
                    name,
                    sections: list.clone(),
                }
            }));
        }
        Ok(Loaded { config, warnings })
    }

    /// The layers of `sources` as a figment, lowest first: defaults, host, file, environment,
    /// overrides. The file and the environment are read now; their errors (a missing file,
    /// bad TOML) surface when the figment is extracted.
    pub fn figment(sources: &Sources) -> Figment {
        let mut figment = Figment::from(ConfigLayer {
            config: Config::default(),
            name: ORIGIN_DEFAULTS,
        });
        for layer in sources.host.iter().flat_map(HostLayer::all) {
            figment = figment.merge(layer);
        }
        if let Some(path) = &sources.file {
            figment = figment.merge(Toml::file_exact(path));
        }
        if sources.env {
            figment = figment.merge(EnvLayer {
                sections: sections(),
            });
        }
        let overrides = |mut figment: Figment| {
            for o in &sources.overrides {
                figment = figment.merge(OverrideLayer {
                    setting: o.clone(),
                    name: ORIGIN_CLI.into(),
                });
            }
            figment
        };
        if sources.persisted {
            // The state directory is where every other layer puts it (it is not live, so the
            // persisted layer cannot move it).
            let dir: Option<PathBuf> = overrides(figment.clone()).extract_inner("state.dir").ok();
            if let Some(dir) = dir {
                figment = figment.merge(PersistedLayer {
                    path: overrides_path(&dir),
                });
            }
        }
        overrides(figment)
    }
}

// ---------------------------------------------------------------------------------------------
// Where a value came from
// ---------------------------------------------------------------------------------------------

/// Where each value of a configuration came from: the merged layers, read back by their tags.
/// Looking a key up is pure: the layers were read when they were merged.
#[derive(Clone, Copy)]
pub struct Origins<'a> {
    figment: &'a Figment,
}

impl<'a> Origins<'a> {
    /// The origins recorded in `figment`, the layers a configuration was extracted from.
    pub fn new(figment: &'a Figment) -> Self {
        Origins { figment }
    }

    /// "from …" for `key` (which may hold `[i]` indices), e.g. "from file x.toml". A key no
    /// layer set is attributed to its nearest ancestor that one did, else to the defaults.
    pub fn of(&self, key: &str) -> String {
        format!("from {}", origin_of(self.figment, &key_segments(key)))
    }
}

impl fmt::Debug for Origins<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Origins")
    }
}

/// The value at `segments` in the merged figment; numeric segments index arrays.
pub(super) fn lookup(figment: &Figment, segments: &[String]) -> Option<Value> {
    let (first, rest) = segments.split_first()?;
    let mut value = figment.find_value(first).ok()?;
    for seg in rest {
        value = match value {
            Value::Dict(_, mut dict) => dict.remove(seg.as_str())?,
            Value::Array(_, mut array) => {
                let i: usize = seg.parse().ok()?;
                (i < array.len()).then(|| array.swap_remove(i))?
            }
            _ => return None,
        };
    }
    Some(value)
}

/// Which layer gave the value at `segments`: "file x.toml", "environment variable
/// HUBNAT_NAT__MTU", "the command line" or "the built-in defaults".
pub(super) fn origin_of(figment: &Figment, segments: &[String]) -> String {
    // A key absent from the figment (the figment may not be the one the config came from)
    // is attributed to its nearest present ancestor.
    (1..=segments.len())
        .rev()
        .find_map(|n| {
            let value = lookup(figment, &segments[..n])?;
            let metadata = figment.get_metadata(value.tag())?;
            Some(describe_origin(metadata, figment.profile(), segments))
        })
        .unwrap_or_else(|| ORIGIN_DEFAULTS.to_string())
}

/// Names a layer for a user: its file, its environment variable, or its name.
pub(super) fn describe_origin(
    metadata: &Metadata,
    profile: &Profile,
    segments: &[String],
) -> String {
    if let Some(path) = metadata.source.as_ref().and_then(|s| s.file_path()) {
        return format!("file {}", path.display());
    }
    if metadata.name == ORIGIN_ENV {
        // An environment variable sets a whole list, so stop at the first index.
        let keys: Vec<&str> = segments
            .iter()
            .take_while(|s| !is_index(s))
            .map(String::as_str)
            .collect();
        return format!("{ORIGIN_ENV} {}", metadata.interpolate(profile, &keys));
    }
    metadata.name.to_string()
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Result
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use figment::Jail;

    use crate::config::testing::*;
    use crate::config::*;

    use super::*;

    #[test]
    fn defaults_alone_load_and_validate() {
        Jail::expect_with(|_| {
            let c = load(&Sources::default()).expect("the defaults are valid");
            assert_eq!(c, Config::default());
            Ok(())
        });
    }

    #[test]
    fn layers_apply_defaults_then_file_then_env_then_command_line() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "x.toml",
                r#"
                [dhcp]
                lease = "1h"
                range_start = "192.168.30.20"
                [nat]
                mtu = 1400
                udp_timeout = "5m"
            "#,
            )?;
            jail.set_env("HUBNAT_DHCP__LEASE", "30m");
            jail.set_env("HUBNAT_NAT__MTU", "1300");
            let sources = Sources {
                host: None,
                file: Some("x.toml".into()),
                env: true,
                persisted: false,
                overrides: vec![
                    "dhcp.lease=5m".parse().expect("override"),
                    Override::new("nat.enabled", "false"),
                ],
            };
            let c = load(&sources).expect("valid");
            assert_eq!(c.dhcp.lease, Duration::from_secs(300)); // command line over env and file
            assert_eq!(c.nat.mtu, 1300); // env over file
            assert_eq!(c.dhcp.range_start, ip("192.168.30.20")); // file over defaults
            assert_eq!(c.nat.udp_timeout, Duration::from_secs(300));
            assert_eq!(c.dhcp.range_end, ip("192.168.30.200")); // defaults
            assert!(!c.nat.enabled);

            let figment = Config::figment(&sources);
            let origin = |key: &str| origin_of(&figment, &key_segments(key));
            assert_eq!(origin("dhcp.lease"), "the command line");
            assert_eq!(origin("nat.mtu"), "environment variable HUBNAT_NAT__MTU");
            assert_eq!(origin("dhcp.range_start"), "file x.toml");
            assert_eq!(origin("dhcp.range_end"), "the built-in defaults");

            // Without `env`, the environment is not read.
            let c = load(&Sources {
                env: false,
                ..sources
            })
            .expect("valid");
            assert_eq!(c.nat.mtu, 1400);
            Ok(())
        });
    }

    /// Host defaults as a host with `search lab.example` and two nameservers would give them.
    fn lab_host() -> HostDefaults {
        HostDefaults::from_host(
            Some("nameserver 192.0.2.53\nnameserver 192.0.2.54\nsearch lab.example\n"),
            Some("box.other.example"),
        )
    }

    #[test]
    fn host_defaults_sit_between_the_defaults_and_the_file() {
        Jail::expect_with(|jail| {
            let host = Sources {
                host: Some(lab_host()),
                ..Sources::default()
            };
            let c = load(&host).expect("valid");
            assert_eq!(
                c.dns.upstream,
                vec![
                    "192.0.2.53:53".parse::<SocketAddr>().expect("addr"),
                    "192.0.2.54:53".parse().expect("addr"),
                ]
            );
            assert_eq!(c.dhcp.domain.as_deref(), Some("lab.example"));
            let figment = Config::figment(&host);
            let origins = Origins::new(&figment);
            assert_eq!(origins.of("dns.upstream[1]"), "from /etc/resolv.conf");
            assert_eq!(origins.of("dhcp.domain"), "from /etc/resolv.conf");
            assert_eq!(origins.of("dhcp.lease"), "from the built-in defaults");

            // The host name's domain, when resolv.conf has none, says so.
            let named = Sources {
                host: Some(HostDefaults::from_host(None, Some("box.other.example"))),
                ..Sources::default()
            };
            let figment = Config::figment(&named);
            assert_eq!(
                Origins::new(&figment).of("dhcp.domain"),
                "from the host name box.other.example"
            );

            // The file, the environment and the flags all win over the host.
            jail.create_file("x.toml", "dhcp.domain = \"file.example\"")?;
            jail.set_env("HUBNAT_DNS__UPSTREAM", "9.9.9.9");
            let c = load(&Sources {
                host: Some(lab_host()),
                file: Some("x.toml".into()),
                env: true,
                persisted: false,
                overrides: Vec::new(),
            })
            .expect("valid");
            assert_eq!(c.dhcp.domain.as_deref(), Some("file.example"));
            assert_eq!(c.dns.upstream, vec!["9.9.9.9:53".parse().expect("addr")]);
            let c = load(&Sources {
                overrides: vec![Override::new("dhcp.domain", "")],
                ..host.clone()
            })
            .expect("valid");
            assert_eq!(c.dhcp.domain, None);
            Ok(())
        });
    }

    #[test]
    fn errors_about_host_defaults_name_the_host_file() {
        Jail::expect_with(|_| {
            let bad = HostDefaults::from_host(Some("nameserver 0.0.0.0\n"), None);
            let text = load(&Sources {
                host: Some(bad),
                ..Sources::default()
            })
            .expect_err("0.0.0.0 is no server")
            .to_string();
            assert_eq!(
                text,
                "config key dns.upstream[0] = \"0.0.0.0\" (from /etc/resolv.conf): must be the \
                 unicast address of a DNS server"
            );
            Ok(())
        });
    }

    #[test]
    fn the_loaded_upstreams_are_this_hosts_nameservers() {
        // What `hubnat config` shows: the host's own resolv.conf, through the host layer.
        Jail::expect_with(|_| {
            let host = HostDefaults::read();
            let sources = Sources {
                host: Some(host.clone()),
                ..Sources::default()
            };
            let c: Config = Config::figment(&sources).extract().expect("extracts");
            assert_eq!(c.dns.upstream, host.nameservers);
            assert_eq!(c.dhcp.domain, host.domain.map(|d| d.name));
            Ok(())
        });
    }

    #[test]
    fn env_double_underscore_nests_and_values_parse() {
        Jail::expect_with(|jail| {
            jail.set_env("HUBNAT_DHCP__RANGE_START", "192.168.30.50");
            jail.set_env("HUBNAT_BACKEND__TAP__NAME", "tap7");
            jail.set_env("HUBNAT_BACKEND__KIND", "memory");
            jail.set_env("HUBNAT_DNS__UPSTREAM", "[1.1.1.1, 9.9.9.9:5353]");
            jail.set_env("HUBNAT_DHCP__GATEWAY", "");
            jail.set_env("HUBNAT_DHCP__DNS", "192.168.30.2");
            jail.set_env("HUBNAT_LOG__FORMAT", "json");
            // Reserved for the CLI's --config, not a key.
            jail.set_env("HUBNAT_CONFIG", "/nonexistent.toml");
            let c = load(&Sources {
                env: true,
                ..Sources::default()
            })
            .expect("valid");
            assert_eq!(c.dhcp.range_start, ip("192.168.30.50"));
            assert_eq!(c.backend.tap.name, "tap7");
            assert_eq!(c.backend.kind, BackendKind::Memory);
            assert_eq!(
                c.dns.upstream,
                vec![
                    "1.1.1.1:53".parse::<SocketAddr>().expect("addr"),
                    "9.9.9.9:5353".parse().expect("addr"),
                ]
            );
            assert_eq!(c.dhcp.gateway, None);
            assert_eq!(c.dhcp.dns, vec![ip("192.168.30.2")]);
            assert_eq!(c.log.format, LogFormat::Json);

            jail.set_env("HUBNAT_DHCP__DNS", "");
            let c = load(&Sources {
                env: true,
                ..Sources::default()
            })
            .expect("valid");
            assert!(c.dhcp.dns.is_empty());
            Ok(())
        });
    }

    #[test]
    fn unknown_env_vars_are_warnings_that_name_them() {
        Jail::expect_with(|jail| {
            // A wrapper script's variable, a real setting, and the CLI's own.
            jail.set_env("HUBNAT_BIN", "/usr/bin/hubnat");
            jail.set_env("HUBNAT_NAT__MTU", "1400");
            jail.set_env("HUBNAT_CONFIG", "/nonexistent.toml");
            let env = Sources {
                env: true,
                ..Sources::default()
            };
            let loaded = Config::load(&env).expect("a warning, not an error");
            assert_eq!(loaded.config.nat.mtu, 1400);
            let about = |name: &str| -> Vec<String> {
                let needle = format!("variable {name} ");
                loaded
                    .warnings
                    .iter()
                    .map(ToString::to_string)
                    .filter(|w| w.contains(&needle))
                    .collect()
            };
            assert_eq!(
                about("HUBNAT_BIN"),
                [
                    "environment variable HUBNAT_BIN is ignored: it names no hubnat setting \
                  (variables HUBNAT_SECTION__KEY set section.key, e.g. HUBNAT_DHCP__LEASE=1h; \
                  the sections are backend, capture, control, dhcp, dns, host, log, nat, policy, process, state)"
                ]
            );
            assert!(about("HUBNAT_NAT__MTU").is_empty() && about("HUBNAT_CONFIG").is_empty());
            assert!(loaded.warnings.contains(&ConfigWarning::UnknownEnv {
                name: "HUBNAT_BIN".into(),
                sections:
                    "backend, capture, control, dhcp, dns, host, log, nat, policy, process, state"
                        .into(),
            }));

            // Without the environment, nothing to warn about.
            let quiet = Config::load(&Sources::default()).expect("valid");
            assert!(quiet.warnings.is_empty(), "{:?}", quiet.warnings);

            // An unknown key is still an error in the file, in a flag, and in a variable that
            // names a section (a typo, not someone else's variable).
            jail.create_file("x.toml", "bin = 1")?;
            let text = load(&file_sources()).expect_err("file").to_string();
            assert!(
                text.contains("config key bin = 1 (from file x.toml): unknown key"),
                "{text}"
            );
            let flag = Sources {
                overrides: vec![Override::new("bin", "x")],
                ..Sources::default()
            };
            let text = load(&flag).expect_err("flag").to_string();
            assert!(
                text.contains("config key bin = \"x\" (from the command line): unknown key"),
                "{text}"
            );
            jail.set_env("HUBNAT_NAT__MTUU", "1400");
            let text = load(&env).expect_err("typo").to_string();
            assert!(
                text.contains(
                    "nat.mtuu = 1400 (from environment variable HUBNAT_NAT__MTUU): unknown key"
                ),
                "{text}"
            );
            Ok(())
        });
    }

    #[test]
    fn env_errors_name_the_variable() {
        Jail::expect_with(|jail| {
            let env = Sources {
                env: true,
                ..Sources::default()
            };
            jail.set_env("HUBNAT_NAT__MTU", "big");
            let text = load(&env).expect_err("type error").to_string();
            assert!(
                text.contains("nat.mtu = \"big\" (from environment variable HUBNAT_NAT__MTU)"),
                "{text}"
            );
            assert!(text.contains("expected u32"), "{text}");

            jail.set_env("HUBNAT_NAT__MTU", "100");
            let text = load(&env).expect_err("semantic error").to_string();
            assert_eq!(text, "config key nat.mtu = 100 (from environment variable HUBNAT_NAT__MTU): must be from 576 to 65520");

            jail.set_env("HUBNAT_NAT__MTU", "1500");
            jail.set_env("HUBNAT_DNS__UPSTREAM", "[1.1.1.1, 0.0.0.0]");
            let text = load(&env).expect_err("semantic error").to_string();
            assert!(text.contains("dns.upstream[1] = \"0.0.0.0\" (from environment variable HUBNAT_DNS__UPSTREAM)"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn command_line_errors_say_command_line() {
        Jail::expect_with(|_| {
            let cli = |o: &str| Sources {
                overrides: vec![o.parse().expect("override")],
                ..Sources::default()
            };
            let text = load(&cli("nat.mtu=100"))
                .expect_err("too small")
                .to_string();
            assert_eq!(
                text,
                "config key nat.mtu = 100 (from the command line): must be from 576 to 65520"
            );
            // A value that is TOML (a number here) is attributed to the command line too.
            let text = load(&cli("dhcp.bogus=1")).expect_err("unknown").to_string();
            assert!(
                text.starts_with("config key dhcp.bogus = 1 (from the command line): unknown key"),
                "{text}"
            );
            let text = load(&cli("dhcp.lease=soon"))
                .expect_err("bad duration")
                .to_string();
            assert!(
                text.starts_with(
                    "config key dhcp.lease = \"soon\" (from the command line): invalid duration"
                ),
                "{text}"
            );
            Ok(())
        });
    }

    #[test]
    fn override_from_str_splits_at_the_first_equals_sign() {
        let o: Override = "log.level=hubnat=debug,info".parse().expect("valid");
        assert_eq!(o, Override::new("log.level", "hubnat=debug,info"));
        assert_eq!(o.to_string(), "log.level=hubnat=debug,info");
        let o: Override = "dhcp.gateway=".parse().expect("valid");
        assert_eq!(o.value, "");
        for bad in [
            "no-equals-sign",
            "=1",
            "Dhcp.Lease=1h",
            "dhcp..lease=1h",
            "dhcp lease=1h",
            ".x=1",
        ] {
            let err = bad.parse::<Override>().expect_err(bad);
            assert!(
                matches!(err, ConfigError::Override { .. }),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn override_values_are_toml_then_plain_strings() {
        let parsed = |v: &str| Override::new("k", v).parsed_value();
        assert_eq!(parsed("1400").to_i128(), Some(1400));
        assert_eq!(parsed("true").to_bool(), Some(true));
        assert_eq!(
            parsed("\"two words\"").into_string().as_deref(),
            Some("two words")
        );
        assert_eq!(parsed("info").into_string().as_deref(), Some("info"));
        assert_eq!(
            parsed("192.168.30.5").into_string().as_deref(),
            Some("192.168.30.5")
        );
        assert_eq!(
            parsed("00:ac:00:00:00:01").into_string().as_deref(),
            Some("00:ac:00:00:00:01")
        );
        assert_eq!(
            parsed("hubnat=debug,info").into_string().as_deref(),
            Some("hubnat=debug,info")
        );
        assert_eq!(parsed("").into_string().as_deref(), Some(""));
        let list = |v: &str| -> Vec<String> {
            parsed(v)
                .into_array()
                .expect("array")
                .into_iter()
                .filter_map(|v| v.into_string())
                .collect()
        };
        assert_eq!(list("[\"1.1.1.1\", \"9.9.9.9\"]"), ["1.1.1.1", "9.9.9.9"]);
        assert_eq!(list("[1.1.1.1, 9.9.9.9]"), ["1.1.1.1", "9.9.9.9"]);
        // A second line cannot smuggle in another key.
        assert!(parsed("1\nnat.mtu = 9000").into_string().is_some());
    }

    #[test]
    fn overrides_set_every_kind_of_value() {
        Jail::expect_with(|_| {
            let overrides = [
                "dns.upstream=[1.1.1.1, \"[::1]:5353\"]",
                "dhcp.lease=1h",
                "backend.kind=memory",
                "host.mac=00:ac:01:02:03:04",
                "log.level=hubnat=debug,info",
                "dhcp.gateway=",
                "dhcp.routes=[\"10.0.0.0/8 via 192.168.30.254\"]",
                "dhcp.static=[{ mac = \"00:ac:00:00:00:09\", ip = \"192.168.30.9\", hostname = \"nas\" }]",
                "nat.mtu=9000",
                "backend.tap.mtu=1500",
            ];
            let sources = Sources {
                overrides: overrides
                    .iter()
                    .map(|o| o.parse().expect("override"))
                    .collect(),
                ..Sources::default()
            };
            let c = load(&sources).expect("valid");
            assert_eq!(
                c.dns.upstream,
                vec![
                    "1.1.1.1:53".parse::<SocketAddr>().expect("addr"),
                    "[::1]:5353".parse().expect("addr"),
                ]
            );
            assert_eq!(c.dhcp.lease, Duration::from_secs(3600));
            assert_eq!(c.backend.kind, BackendKind::Memory);
            assert_eq!(c.host.mac, Some(mac("00:ac:01:02:03:04")));
            assert_eq!(c.log.level, "hubnat=debug,info");
            assert_eq!(c.dhcp.gateway, None);
            assert_eq!(
                c.dhcp.routes,
                vec!["10.0.0.0/8 via 192.168.30.254"
                    .parse::<Route>()
                    .expect("route")]
            );
            assert_eq!(
                c.dhcp.statics,
                vec![StaticLease {
                    mac: mac("00:ac:00:00:00:09"),
                    ip: ip("192.168.30.9"),
                    hostname: Some("nas".into()),
                }]
            );
            assert_eq!((c.nat.mtu, c.tap_mtu()), (9000, 1500));
            Ok(())
        });
    }

    #[test]
    fn missing_file_names_the_path() {
        Jail::expect_with(|_| {
            let err = load(&file_sources()).expect_err("missing");
            assert!(matches!(err, ConfigError::File { .. }), "{err:?}");
            assert_eq!(err.to_string(), "configuration file x.toml does not exist");
            Ok(())
        });
    }
}
