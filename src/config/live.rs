//! Live changes: new values for the settings of a running hubnat, checked as a whole first.
//!
//! # Theory of operation
//!
//! A running gateway's settings are one [`Config`] value, changed in one way:
//! [`Config::with_changes`] takes `KEY=VALUE` changes ([`Override`]s, read exactly like
//! `--set`: a TOML value, else a plain string, durations such as `10m`) and gives back either
//! the whole new configuration and the keys whose values changed, or an error: never a
//! half-applied change. It is pure (no I/O, no clock); the caller — the control API, a policy —
//! hands the new configuration to the core and writes the [`Change`]s to the security log.
//!
//! The steps:
//!
//! 1. each key is checked on its own: well formed, known, and live. Only the sections in
//!    [`LIVE_SECTIONS`] (`host`, `dhcp`, `nat`, `dns`) change while hubnat runs, and of their
//!    keys not those in [`RESTART_ONLY`]: the backend, the state directory, logging and
//!    capture are set up once, at start-up;
//! 2. the changes are layered over the running configuration with figment, as `--set` is over
//!    a file, so a wrong type names the key, the value and the source the caller gave ("from
//!    the control API");
//! 3. the whole result is validated by [`Config::validate`], the same checks as at start-up: a
//!    new range end is checked against the subnet, the range start, the host's address. A value
//!    the changes did not touch is named "from the running configuration";
//! 4. both configurations are written out key by key as the file writes them, and every key
//!    whose text differs is a [`Change`], in the order of the changes given. Setting a key to
//!    the value it has is no change.
//!
//! As at start-up, every problem found is reported at once.

use std::collections::HashMap;
use std::fmt;

use figment::Figment;

use super::layers::{sections, ConfigLayer, OverrideLayer, MALFORMED_KEY};
use super::render::{all_keys, flatten, render_value, UNSET};
use super::{Config, ConfigError, Origins, Override};

/// The sections whose keys may change while hubnat runs (but see [`RESTART_ONLY`]).
pub const LIVE_SECTIONS: [&str; 4] = ["host", "dhcp", "nat", "dns"];

/// Keys of the [live sections](LIVE_SECTIONS) that still need a restart, with the reason.
///
/// None today: the virtual host's MAC and the MTU change live too (a running gateway refuses
/// an MTU larger than its backend's frames, naming `nat.mtu`).
pub const RESTART_ONLY: [(&str, &str); 0] = [];

/// The layer name of the values a live change leaves as they were.
const ORIGIN_RUNNING: &str = "the running configuration";

/// One key whose value a live change altered; values are written as the file writes them
/// (`"2h"`, `1500`, `["1.1.1.1"]`; `""` for an unset optional value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The full dotted key, e.g. `dhcp.lease`.
    pub key: String,
    /// The value before.
    pub old: String,
    /// The value after.
    pub new: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {} (was {})", self.key, self.new, self.old)
    }
}

/// One key and its value as the file writes it, for showing a section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The full dotted key, e.g. `dhcp.lease`.
    pub key: String,
    /// The value, e.g. `"2h"`.
    pub value: String,
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}", self.key, self.value)
    }
}

impl Config {
    /// This configuration with `changes` applied, and the keys whose values changed; or, if
    /// any change is refused or the result is not valid, an error and nothing applied.
    ///
    /// `source` names where the changes came from in errors, after "from": pass e.g. `"the
    /// control API"` to get "config key dhcp.range_end = 192.168.31.5 (from the control API):
    /// outside the subnet …". Refused: a malformed or unknown key, a key outside
    /// [`LIVE_SECTIONS`] or in [`RESTART_ONLY`] (the reason says a restart is needed), a value
    /// of the wrong type, and anything [`Config::validate`] refuses.
    pub fn with_changes(
        &self,
        changes: &[Override],
        source: &str,
    ) -> Result<(Config, Vec<Change>), ConfigError> {
        let origin = format!("from {source}");
        let sections = sections();
        let refused: Vec<ConfigError> = changes
            .iter()
            .filter_map(|change| {
                let reason = refusal(&change.key, &sections)?;
                Some(ConfigError::Invalid {
                    key: change.key.clone(),
                    value: Some(render_value(&change.parsed_value())),
                    origin: origin.clone(),
                    reason,
                })
            })
            .collect();
        if !refused.is_empty() {
            return Err(one_or_several(refused));
        }

        let mut figment = Figment::from(ConfigLayer {
            config: self.clone(),
            name: ORIGIN_RUNNING,
        });
        for change in changes {
            figment = figment.merge(OverrideLayer {
                setting: change.clone(),
                name: source.to_string(),
            });
        }
        let new: Config = figment
            .extract()
            .map_err(|e| ConfigError::from_figment(e, &figment))?;
        new.validate(&Origins::new(&figment))?;

        let diff = differences(self, &new, changes);
        // A whole table given at once (`nat = { mtu = 9000 }`) can reach a restart-only key.
        let refused: Vec<ConfigError> = diff
            .iter()
            .filter_map(|change| {
                let reason = restart_only(&change.key)?;
                Some(ConfigError::Invalid {
                    key: change.key.clone(),
                    value: Some(change.new.clone()),
                    origin: origin.clone(),
                    reason,
                })
            })
            .collect();
        if !refused.is_empty() {
            return Err(one_or_several(refused));
        }
        Ok((new, diff))
    }

    /// The keys of `section` (`host`, `dhcp`, `nat`, `dns`, or another section) with their
    /// values as the file writes them, in the file's order; an unset optional value is `""`.
    /// `None` if there is no such section.
    pub fn section_settings(&self, section: &str) -> Option<Vec<Setting>> {
        if !sections().iter().any(|s| s == section) {
            return None;
        }
        let values: HashMap<String, String> = flatten(self).into_iter().collect();
        let prefix = format!("{section}.");
        let settings = all_keys()
            .into_iter()
            .filter(|key| key.starts_with(&prefix))
            .map(|key| Setting {
                value: values.get(&key).cloned().unwrap_or_else(|| UNSET.into()),
                key,
            })
            .collect();
        Some(settings)
    }
}

/// Why `key` may not be changed while hubnat runs, if it may not.
fn refusal(key: &str, sections: &[String]) -> Option<String> {
    if !Override::well_formed(key) {
        return Some(MALFORMED_KEY.into());
    }
    let section = key.split('.').next().unwrap_or_default();
    if !sections.iter().any(|s| s == section) {
        return Some(format!(
            "unknown key; the sections are {}, and of them {} can change while hubnat runs",
            sections.join(", "),
            LIVE_SECTIONS.join(", ")
        ));
    }
    if !LIVE_SECTIONS.contains(&section) {
        let why = match section {
            "backend" => "the frame backend is opened at start-up",
            "state" => "the state directory is locked and read at start-up",
            "log" => "logging is set up at start-up",
            "capture" => "the capture file is opened at start-up",
            "policy" => "policies are loaded at start-up and on a reload (SIGHUP)",
            _ => "it is read once at start-up",
        };
        return Some(format!(
            "cannot change while hubnat runs ({why}); set it in the configuration and restart \
             hubnat (only {} can change at run time)",
            LIVE_SECTIONS.map(|s| format!("{s}.*")).join(", ")
        ));
    }
    restart_only(key)
}

/// Why `key` (or the table it is part of) needs a restart, if it does.
fn restart_only(key: &str) -> Option<String> {
    RESTART_ONLY
        .iter()
        .find(|(restart_key, _)| covers(key, restart_key))
        .map(|(_, why)| {
            format!("cannot change while hubnat runs ({why}); set it in the configuration and restart hubnat")
        })
}

/// Whether `key` is `outer` or a key inside the table `outer`.
fn covers(key: &str, outer: &str) -> bool {
    key.strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// The keys whose written value differs between `old` and `new`, in the order of `changes`
/// (which key each falls under), then the file's.
fn differences(old: &Config, new: &Config, changes: &[Override]) -> Vec<Change> {
    let old_values: HashMap<String, String> = flatten(old).into_iter().collect();
    let new_values: HashMap<String, String> = flatten(new).into_iter().collect();
    let value = |values: &HashMap<String, String>, key: &str| {
        values.get(key).cloned().unwrap_or_else(|| UNSET.into())
    };
    let mut diff: Vec<Change> = all_keys()
        .into_iter()
        .filter_map(|key| {
            let (old, new) = (value(&old_values, &key), value(&new_values, &key));
            (old != new).then_some(Change { key, old, new })
        })
        .collect();
    // Stable: keys under one change keep the file's order.
    diff.sort_by_key(|c| {
        changes
            .iter()
            .position(|o| covers(&c.key, &o.key))
            .unwrap_or(usize::MAX)
    });
    diff
}

fn one_or_several(mut errors: Vec<ConfigError>) -> ConfigError {
    match errors.len() {
        1 => errors.remove(0),
        _ => ConfigError::Several(errors),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::testing::*;
    use crate::config::*;

    const API: &str = "the control API";

    fn changes(list: &[&str]) -> Vec<Override> {
        list.iter().map(|c| c.parse().expect("KEY=VALUE")).collect()
    }

    /// `with_changes` on the defaults must fail; returns the message.
    #[track_caller]
    fn refused(list: &[&str]) -> String {
        let before = Config::default();
        let err = before
            .with_changes(&changes(list), API)
            .expect_err("the change should be refused");
        assert_eq!(before, Config::default(), "nothing may change");
        err.to_string()
    }

    #[test]
    fn a_range_outside_the_subnet_is_refused_and_nothing_changes() {
        assert_eq!(
            refused(&["dhcp.range_end=192.168.31.5"]),
            "config key dhcp.range_end = 192.168.31.5 (from the control API): outside the subnet \
             192.168.30.0/24 given by host.ip and host.mask"
        );
        // A valid change next to an invalid one is not applied either; the value it is
        // checked against is named as the running configuration's.
        assert_eq!(
            refused(&["dhcp.lease=10m", "dhcp.range_start=192.168.30.250"]),
            "config key dhcp.range_start = 192.168.30.250 (from the control API): comes after \
             dhcp.range_end = 192.168.30.200 (from the running configuration); the range must \
             run from low to high"
        );
        // The subnet moves with host.*, and the running range is checked against it.
        let text = refused(&["host.ip=10.0.0.1", "host.mask=255.0.0.0"]);
        assert!(
            text.contains(
                "dhcp.range_start = 192.168.30.10 (from the running configuration): outside \
                 the subnet 10.0.0.0/8"
            ),
            "{text}"
        );
    }

    #[test]
    fn lease_and_range_end_change_together() {
        let before = Config::default();
        let (after, diff) = before
            .with_changes(
                &changes(&["dhcp.lease=10m", "dhcp.range_end=192.168.30.100"]),
                API,
            )
            .expect("valid");
        assert_eq!(after.dhcp.lease, Duration::from_secs(600));
        assert_eq!(after.dhcp.range_end, ip("192.168.30.100"));
        assert_eq!(
            diff,
            [
                Change {
                    key: "dhcp.lease".into(),
                    old: "\"2h\"".into(),
                    new: "\"10m\"".into(),
                },
                Change {
                    key: "dhcp.range_end".into(),
                    old: "\"192.168.30.200\"".into(),
                    new: "\"192.168.30.100\"".into(),
                },
            ]
        );
        assert_eq!(diff[0].to_string(), "dhcp.lease = \"10m\" (was \"2h\")");
        // Everything else is as it was.
        let mut expected = before.clone();
        expected.dhcp.lease = Duration::from_secs(600);
        expected.dhcp.range_end = ip("192.168.30.100");
        assert_eq!(after, expected);
    }

    #[test]
    fn a_value_set_to_what_it_is_is_no_change() {
        let before = Config::default();
        let (after, diff) = before
            .with_changes(
                &changes(&["dhcp.lease=2h", "dhcp.lease=\"120m\"", "nat.enabled=true"]),
                API,
            )
            .expect("valid");
        assert_eq!((after, diff), (before.clone(), Vec::new()));
        // Only the key that moved is listed.
        let (_, diff) = before
            .with_changes(&changes(&["dns.upstream=[]", "dhcp.gateway="]), API)
            .expect("valid");
        assert_eq!(
            diff,
            [Change {
                key: "dhcp.gateway".into(),
                old: "\"192.168.30.1\"".into(),
                new: "\"\"".into(),
            }]
        );
        let (_, diff) = before.with_changes(&[], API).expect("nothing to do");
        assert!(diff.is_empty());
    }

    #[test]
    fn lists_tables_and_every_live_section_change() {
        let (after, diff) = Config::default()
            .with_changes(
                &changes(&[
                    "dns.upstream=[1.1.1.1, \"[::1]:5353\"]",
                    "dhcp.static=[{ mac = \"00:ac:00:00:00:09\", ip = \"192.168.30.9\" }]",
                    "nat={ udp_timeout = \"5m\", tcp_buffer = \"256KiB\" }",
                    "host.ip=192.168.30.254",
                ]),
                API,
            )
            .expect("valid");
        assert_eq!(after.nat.udp_timeout, Duration::from_secs(300));
        let keys: Vec<&str> = diff.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "dns.upstream",
                "dhcp.static",
                "nat.udp_timeout",
                "nat.tcp_buffer",
                "host.ip",
            ]
        );
        assert_eq!(diff[0].new, "[\"1.1.1.1\", \"[::1]:5353\"]");
        assert_eq!(
            diff[1].new,
            "[{ mac = \"00:ac:00:00:00:09\", ip = \"192.168.30.9\" }]"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = refused(&["dhcp.bogus=1"]);
        assert!(
            text.starts_with(
                "config key dhcp.bogus = 1 (from the control API): unknown key; [dhcp] accepts: \
                 enabled, range_start"
            ),
            "{text}"
        );
        assert_eq!(
            refused(&["bogus.key=x"]),
            "config key bogus.key = \"x\" (from the control API): unknown key; the sections are \
             backend, capture, control, dhcp, dns, host, log, nat, policy, process, state, and of them host, dhcp, nat, dns \
             can change while hubnat runs"
        );
        let err = Config::default()
            .with_changes(&[Override::new("Dhcp.Lease", "1h")], API)
            .expect_err("malformed");
        assert!(
            err.to_string()
                .contains("KEY must be dotted lowercase words"),
            "{err}"
        );
        // Bad values are named like bad values anywhere else.
        let text = refused(&["dhcp.lease=soon"]);
        assert!(
            text.starts_with(
                "config key dhcp.lease = \"soon\" (from the control API): invalid duration"
            ),
            "{text}"
        );
    }

    #[test]
    fn keys_set_up_at_start_are_refused_with_a_restart_hint() {
        assert_eq!(
            refused(&["backend.kind=hub"]),
            "config key backend.kind = \"hub\" (from the control API): cannot change while \
             hubnat runs (the frame backend is opened at start-up); set it in the configuration \
             and restart hubnat (only host.*, dhcp.*, nat.*, dns.* can change at run time)"
        );
        for (change, key) in [
            ("backend.tap.name=tap9", "backend.tap.name"),
            ("backend.raw.interface=br0", "backend.raw.interface"),
            ("backend.hub.max_peers=8", "backend.hub.max_peers"),
            ("state.dir=/srv/hubnat", "state.dir"),
            ("log.level=debug", "log.level"),
            ("capture.path=/tmp/x.pcap", "capture.path"),
            ("policy=[]", "policy"),
        ] {
            let text = refused(&[change]);
            assert!(
                text.starts_with(&format!("config key {key} = "))
                    && text.contains("(from the control API): cannot change while hubnat runs")
                    && text.contains("restart hubnat"),
                "{change}: {text}"
            );
        }
        assert!(refused(&["policy=[]"])
            .contains("(policies are loaded at start-up and on a reload (SIGHUP))"));
        // The MAC and the MTU are live (the gateway checks the MTU against its backend).
        let (_, diff) = Config::default()
            .with_changes(
                &changes(&["nat={ mtu = 9000 }", "host.mac=00:ac:00:00:00:01"]),
                API,
            )
            .expect("live keys");
        let keys: Vec<&str> = diff.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["nat.mtu", "host.mac"]);
        // Every refusal at once.
        let err = Config::default()
            .with_changes(
                &changes(&["log.level=debug", "bogus=1", "backend.kind=raw"]),
                API,
            )
            .expect_err("three refusals");
        assert_eq!(err.errors().len(), 3, "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_in_every_live_table() {
        for section in LIVE_SECTIONS {
            let key = format!("{section}.bogus_key");
            let text = refused(&[&format!("{key}=1")]);
            assert!(
                text.starts_with(&format!(
                    "config key {key} = 1 (from the control API): unknown key"
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn sections_list_their_keys_in_file_order() {
        let mut c = Config::default();
        c.dhcp.domain = Some("lab.example".into());
        let dhcp = c.section_settings("dhcp").expect("a section");
        let keys: Vec<&str> = dhcp.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "dhcp.enabled",
                "dhcp.range_start",
                "dhcp.range_end",
                "dhcp.mask",
                "dhcp.lease",
                "dhcp.gateway",
                "dhcp.dns",
                "dhcp.domain",
                "dhcp.routes",
                "dhcp.max_leases_per_mac",
                "dhcp.static",
                "dhcp.serve_macs",
                "dhcp.ignore_macs",
                "dhcp.authoritative",
            ]
        );
        assert_eq!(dhcp[4].to_string(), "dhcp.lease = \"2h\"");
        assert_eq!(dhcp[7].value, "\"lab.example\"");
        let host = c.section_settings("host").expect("a section");
        assert_eq!(
            host.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "host.enabled = true",
                "host.mac = \"\"",
                "host.ip = \"192.168.30.1\"",
                "host.mask = \"255.255.255.0\""
            ]
        );
        for section in LIVE_SECTIONS {
            assert!(!c.section_settings(section).expect(section).is_empty());
        }
        assert_eq!(c.section_settings("bogus"), None);
        assert_eq!(c.section_settings("dhcp.lease"), None);
    }
}
