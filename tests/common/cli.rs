//! The `hubnat` CLI against a running gateway's control socket.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

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

/// The samples of OpenMetrics `text` as `name{label=value,...}` → value, read by the Python
/// client's parser (`python3-prometheus-client`): a real parser, strict about the format.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value}")
"#;
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the metrics (is python3-prometheus-client installed? scripts/test.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}
