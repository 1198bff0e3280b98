//! Every example configuration in `config/` loads, and `config/hubnat.toml` documents every
//! key at its reference default.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use hubnat::config::{BackendKind, Config, Sources};

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// Loads `path` alone: no host defaults, no environment, no overrides.
fn load(path: &Path) -> Result<Config> {
    let sources = Sources {
        host: None,
        file: Some(path.to_path_buf()),
        env: false,
        persisted: false,
        overrides: Vec::new(),
    };
    let loaded = Config::load(&sources).with_context(|| format!("loading {}", path.display()))?;
    Ok(loaded.config)
}

#[test]
fn every_example_config_loads() -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(config_dir())?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|ext| ext == "toml"));
    files.sort();
    let names: Vec<_> = files
        .iter()
        .filter_map(|p| p.file_name()?.to_str())
        .collect();
    for expected in ["hubnat.toml", "memory.toml", "tap.toml"] {
        ensure!(
            names.contains(&expected),
            "config/{expected} is missing; found {names:?}"
        );
    }
    for file in &files {
        load(file)?;
    }
    Ok(())
}

#[test]
fn annotated_config_is_the_reference_default() -> Result<()> {
    let mut loaded = load(&config_dir().join("hubnat.toml"))?;
    let default = Config::default();
    // These default from the host; the file shows them commented out.
    loaded.host.mac = default.host.mac;
    loaded.dhcp.domain = default.dhcp.domain.clone();
    loaded.dns.upstream = default.dns.upstream.clone();
    loaded.state.dir = default.state.dir.clone();
    assert_eq!(loaded, default);
    Ok(())
}

/// Every key path of `value` (a serialized `Config`), e.g. `dhcp.range_start`.
fn key_paths(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
    if let serde_json::Value::Object(map) = value {
        for (key, child) in map {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            if child.is_object() {
                key_paths(&path, child, out);
            } else {
                out.insert(path);
            }
        }
    }
}

#[test]
fn annotated_config_mentions_every_key() -> Result<()> {
    let text = std::fs::read_to_string(config_dir().join("hubnat.toml"))?;
    let mut config = Config::default();
    // Give the optional values a value so that they are serialized too.
    config.host.mac = Some("00:ac:12:34:56:78".parse()?);
    config.backend.tap.mtu = Some(1500);
    config.log.security_log = Some("/x".into());
    let mut keys = BTreeSet::new();
    key_paths("", &serde_json::to_value(&config)?, &mut keys);
    ensure!(keys.len() >= 25, "too few keys found: {keys:?}");
    let mut table = String::new();
    let mut seen = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        // An array of tables (`[[policy]]`, commented out: there are none by default) shows
        // its key.
        let array = line.trim_start_matches("# ").strip_prefix("[[");
        if let Some(name) = array.and_then(|l| l.strip_suffix("]]")) {
            seen.insert(name.to_string());
            table = name.to_string();
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = name.to_string();
        } else if let Some((key, _)) = line.trim_start_matches("# ").split_once(" = ") {
            if !key.contains(' ') && !line.starts_with("#   ") {
                seen.insert(format!("{table}.{key}"));
            }
        }
    }
    let missing: Vec<_> = keys.difference(&seen).collect();
    ensure!(
        missing.is_empty(),
        "config/hubnat.toml does not show {missing:?}"
    );
    Ok(())
}

#[test]
fn backend_examples_select_their_backend() -> Result<()> {
    let tap = load(&config_dir().join("tap.toml"))?;
    assert_eq!(tap.backend.kind, BackendKind::Tap);
    assert_eq!(tap.dhcp.statics.len(), 1);
    let memory = load(&config_dir().join("memory.toml"))?;
    assert_eq!(memory.backend.kind, BackendKind::Memory);
    Ok(())
}

/// What `hubnat config` prints (TOML) loads back to the same configuration.
#[test]
fn printed_config_loads_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for name in ["hubnat.toml", "tap.toml", "memory.toml"] {
        let config = load(&config_dir().join(name))?;
        let printed = dir.path().join(name);
        std::fs::write(&printed, toml::to_string_pretty(&config)?)?;
        assert_eq!(load(&printed)?, config, "{name}");
    }
    Ok(())
}

/// The systemd unit passes `systemd-analyze verify` (its syntax, every directive known), with
/// `ExecStart` pointed at the binary under test.
#[test]
fn the_systemd_unit_verifies() -> Result<()> {
    let unit = std::fs::read_to_string(config_dir().join("hubnat.service"))?;
    ensure!(
        unit.contains("ExecReload=/bin/kill -HUP $MAINPID"),
        "reload is SIGHUP"
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("hubnat.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/hubnat", env!("CARGO_BIN_EXE_hubnat")),
    )?;
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .context(
            "systemd-analyze is missing: install the systemd package (scripts/test.sh does)",
        )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
    Ok(())
}
