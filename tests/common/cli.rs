//! The `hubnat` CLI against a running gateway's control socket.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// Runs `hubnat ARGS --control SOCKET`.
pub fn cli(sock: &Path, args: &[&str]) -> Output {
    Command::new(super::netns::hubnat_bin())
        .args(args)
        .arg("--control")
        .arg(sock)
        .output()
        .expect("run hubnat")
}

/// Runs a command that must succeed; its standard output.
pub fn ok(sock: &Path, args: &[&str]) -> String {
    let out = cli(sock, args);
    assert!(
        out.status.success(),
        "hubnat {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must succeed and print JSON.
pub fn json(sock: &Path, args: &[&str]) -> Value {
    let text = ok(sock, args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}
