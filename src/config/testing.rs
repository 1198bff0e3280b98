//! Helpers shared by the configuration's unit tests: load a file in a figment `Jail` and check
//! the error it gives.

#![allow(clippy::result_large_err)] // figment::Jail's closures return figment::Result

use std::net::Ipv4Addr;

use figment::Jail;

use super::{Config, ConfigError, MacAddr, Sources};

/// What every error about `x.toml` names as its source.
pub(super) const FILE: &str = "(from file x.toml)";

/// The file `x.toml` alone: no host defaults, no environment, no overrides.
pub(super) fn file_sources() -> Sources {
    Sources {
        host: None,
        file: Some("x.toml".into()),
        env: false,
        persisted: false,
        overrides: Vec::new(),
    }
}

/// [`Config::load`]'s configuration, without the warnings.
pub(super) fn load(sources: &Sources) -> Result<Config, ConfigError> {
    Config::load(sources).map(|loaded| loaded.config)
}

/// Writes `toml` to `x.toml` in the jail and loads it (no environment, no overrides).
pub(super) fn load_toml(jail: &Jail, toml: &str) -> Result<Config, ConfigError> {
    jail.create_file("x.toml", toml).expect("write x.toml");
    load(&file_sources())
}

/// Loading `toml` must fail with a message naming the file and holding every needle.
#[track_caller]
pub(super) fn assert_rejects(toml: &str, needles: &[&str]) {
    Jail::expect_with(|jail| {
        let err = load_toml(jail, toml).expect_err("the config should be rejected");
        let text = err.to_string();
        for needle in needles.iter().chain(&[FILE]) {
            assert!(
                text.contains(needle),
                "error {text:?} does not mention {needle:?}"
            );
        }
        Ok(())
    });
}

pub(super) fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

pub(super) fn mac(s: &str) -> MacAddr {
    s.parse().expect("test MAC")
}
