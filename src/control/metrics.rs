//! The gateway's status as Prometheus metrics (OpenMetrics text, with `prometheus-client`).
//!
//! Each scrape asks the gateway for its [`Status`] and builds a fresh registry from it: the
//! counters live in the core, not here, so nothing is kept between scrapes. Labelled families
//! carry the breakdowns (sessions by protocol, ends by reason, refusals by reason, frames
//! dropped by reason, DHCP messages by type, policy calls, errors and verdicts by policy);
//! every other counter of the status comes out as
//! `hubnat_<group>_<name>_total`, so a counter added to the core shows up without a change
//! here.

use prometheus_client::encoding::text::encode as encode_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::core::nat::{EndReason, Protocol};
use crate::driver::Status;

type Labels = Vec<(String, String)>;

fn counters(pairs: &[(&str, u64)], label: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    for (value, n) in pairs {
        family
            .get_or_create(&vec![(label.to_string(), value.to_string())])
            .inc_by(*n);
    }
    family
}

/// A counter family over rows of `(labels, value)`.
fn labelled(rows: Vec<(Labels, u64)>) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    for (labels, n) in rows {
        family.get_or_create(&labels).inc_by(n);
    }
    family
}

fn gauges(pairs: &[(&str, i64)], label: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    for (value, n) in pairs {
        family
            .get_or_create(&vec![(label.to_string(), value.to_string())])
            .set(*n);
    }
    family
}

fn gauge(n: i64) -> Gauge {
    let g = Gauge::default();
    g.set(n);
    g
}

fn counter(n: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(n);
    c
}

/// The metrics of `status` in the text exposition format.
pub(super) fn encode(status: &Status) -> String {
    let mut r = Registry::with_prefix("hubnat");
    let nat = &status.nat;
    let c = &status.counters;
    let d = &status.dhcp;

    r.register(
        "enabled",
        "Whether each function is on (1) or off (0)",
        gauges(
            &[
                ("all", status.enabled.into()),
                ("nat", status.nat_enabled.into()),
                ("dhcp", status.dhcp_enabled.into()),
            ],
            "function",
        ),
    );
    r.register(
        "uptime_seconds",
        "Seconds since the gateway started",
        gauge(status.uptime_secs as i64),
    );
    r.register(
        "sessions",
        "NAT sessions now, by protocol",
        gauges(
            &[
                ("tcp", status.sessions.tcp as i64),
                ("udp", status.sessions.udp as i64),
                ("icmp", status.sessions.icmp as i64),
            ],
            "protocol",
        ),
    );
    let created: Vec<(&str, u64)> = Protocol::ALL
        .iter()
        .map(|p| (p.as_str(), nat.created[p.index()]))
        .collect();
    r.register(
        "sessions_created",
        "NAT sessions created, by protocol",
        counters(&created, "protocol"),
    );
    let ended: Vec<(&str, u64)> = EndReason::ALL
        .iter()
        .map(|e| (e.as_str(), nat.ended[e.index()]))
        .collect();
    r.register(
        "sessions_ended",
        "NAT sessions ended, by reason",
        counters(&ended, "reason"),
    );
    r.register(
        "sessions_refused",
        "New flows refused before a session was created, by reason",
        counters(
            &[
                ("rules", nat.refused_rules),
                ("policy", nat.refused_policy),
                ("limits", nat.refused_limits),
            ],
            "reason",
        ),
    );
    r.register(
        "pending_verdicts",
        "Flows waiting for a policy's verdict",
        gauge(status.pending_verdicts as i64),
    );
    r.register(
        "bytes",
        "Payload bytes carried by the NAT, by direction",
        counters(
            &[
                ("to_remote", status.bytes_to_remote),
                ("to_client", status.bytes_to_client),
            ],
            "direction",
        ),
    );
    r.register(
        "leases",
        "DHCP leases bound now",
        gauge(status.leases as i64),
    );
    r.register(
        "pool_size",
        "Addresses in the DHCP range",
        gauge(status.pool_size as i64),
    );
    r.register(
        "frames",
        "Frames on the segment, by direction",
        counters(&[("in", c.frames_in), ("out", c.frames_out)], "direction"),
    );
    r.register(
        "frames_dropped",
        "Frames and packets dropped, by reason",
        counters(
            &[
                ("malformed", c.malformed),
                ("not_for_us", c.not_for_us),
                ("unhandled", c.unhandled),
                ("disabled", c.disabled),
                ("dhcp_disabled", c.dhcp_disabled),
                ("nat_disabled", nat.disabled),
                ("nat_unsupported", nat.unsupported),
                ("tx_queue_full", status.link.tx_queue_full),
                ("no_neighbour", status.link.no_neighbour),
                ("host_send_dropped", nat.host_send_dropped),
                ("pending_dropped", nat.pending_dropped),
            ],
            "reason",
        ),
    );
    r.register(
        "dhcp_messages",
        "DHCP messages, by type (received: discover … other; sent: offer, ack, nak)",
        counters(
            &[
                ("discover", d.discovers),
                ("request", d.requests),
                ("decline", d.declines),
                ("release", d.releases),
                ("inform", d.informs),
                ("other", d.other_types),
                ("offer", d.offers),
                ("ack", d.acks),
                ("nak", d.naks),
            ],
            "type",
        ),
    );
    let (mut calls, mut errors, mut outcomes) = (Vec::new(), Vec::new(), Vec::new());
    for p in &status.policies {
        let k = &p.calls;
        let row = |label: &str, value: &str, n: u64| {
            let labels = vec![
                ("policy".to_string(), p.name.clone()),
                (label.to_string(), value.to_string()),
            ];
            (labels, n)
        };
        if p.session_filter {
            calls.push(row("hook", "session", k.session));
        }
        if p.dhcp_customizer {
            calls.push(row("hook", "dhcp", k.dhcp));
        }
        errors.extend([
            row("kind", "timeout", k.timeouts),
            row("kind", "out_of_memory", k.out_of_memory),
            row("kind", "trap", k.traps),
            row("kind", "broken", k.broken),
        ]);
        outcomes.extend([
            row("outcome", "reject", k.rejected),
            row("outcome", "drop", k.dropped),
            row("outcome", "redirect", k.redirected),
            row("outcome", "dhcp_changed", k.dhcp_changed),
            row("outcome", "dhcp_no_reply", k.dhcp_no_reply),
        ]);
    }
    r.register(
        "policy_calls",
        "Calls of each policy in force, by hook (since it was loaded)",
        labelled(calls),
    );
    r.register(
        "policy_errors",
        "Failed policy calls, by policy and kind (on_error was applied)",
        labelled(errors),
    );
    r.register(
        "policy_outcomes",
        "Policy answers other than allow or unchanged, by policy and outcome",
        labelled(outcomes),
    );
    // Everything else the status counts, by name.
    let json = serde_json::to_value(status).unwrap_or_default();
    for group in ["counters", "link", "nat", "dhcp"] {
        let Some(fields) = json.get(group).and_then(|v| v.as_object()) else {
            continue;
        };
        for (name, value) in fields {
            if let Some(n) = value.as_u64() {
                r.register(
                    format!("{group}_{name}"),
                    format!("The status's {group}.{name}"),
                    counter(n),
                );
            }
        }
    }

    let mut text = String::new();
    encode_text(&mut text, &r).expect("invariant: writing to a String cannot fail");
    text
}
