//! The routes of the control API, version 1. Every answer is JSON; an error is
//! `{"error": {"key": …, "reason": …}}` (`key` when one applies).
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/v1/status` | status, counters, overridden values and where they came from |
//! | POST | `/v1/enable`, `/v1/disable` | the whole function (`host.enabled`) |
//! | GET, PATCH | `/v1/host`, `/v1/nat`, `/v1/dhcp`, `/v1/dns` | a section's settings; change some |
//! | POST | `/v1/nat/enable`, `/v1/nat/disable`, `/v1/dhcp/enable`, `/v1/dhcp/disable` | one function |
//! | GET | `/v1/nat/sessions?client=IP&protocol=tcp` | the NAT session table |
//! | DELETE | `/v1/nat/sessions/{id}` | end one session |
//! | GET | `/v1/dhcp/leases` | the lease table |
//! | DELETE | `/v1/dhcp/leases/{mac or ip}` | release one lease |
//! | GET | `/v1/policies` | the policies in force, with their counters |
//! | POST | `/v1/policies/reload` | re-read the `[[policy]]` list and reload; the report |
//! | GET | `/metrics` | Prometheus text |
//!
//! A PATCH body is a JSON object of keys of the section (`"range_end"`, or in full
//! `"dhcp.range_end"`) and values: a string is read like `--set`'s VALUE (`"10m"`,
//! `"192.168.30.100"`, `"[\"1.1.1.1\"]"`), any other JSON value as that value.

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::{Peer, PolicySource};
use crate::config::{persist_changes, Change, ConfigError, Overridden, Override, ORIGIN_PERSISTED};
use crate::core::nat::{Protocol, SessionId};
use crate::core::LeaseTarget;
use crate::driver::{GatewayHandle, HandleError};

/// The largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// The sections a client may read and change.
const SECTIONS: [&str; 4] = ["host", "nat", "dhcp", "dns"];

pub(super) struct State {
    pub(super) handle: GatewayHandle,
    /// The socket file's owner: the one user besides root who may change things.
    pub(super) owner: u32,
    pub(super) state_dir: PathBuf,
    pub(super) overridden: RefCell<Vec<Overridden>>,
    pub(super) policy_source: Option<PolicySource>,
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, body: &Value) -> Answer {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_default();
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("invariant: a static header is valid")
}

fn error(status: StatusCode, key: Option<&str>, reason: impl Into<String>) -> Answer {
    let mut e = Map::new();
    if let Some(key) = key {
        e.insert("key".into(), Value::from(key));
    }
    e.insert("reason".into(), Value::from(reason.into()));
    answer(status, &json!({ "error": e }))
}

fn stopped() -> Answer {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        None,
        "the gateway is stopping or has stopped",
    )
}

/// Serves `/metrics` only (the TCP metrics listener).
pub(super) async fn metrics_only(state: &State, req: Request<Incoming>) -> Answer {
    if req.uri().path() != "/metrics" {
        return error(StatusCode::NOT_FOUND, None, "only /metrics is served here");
    }
    if req.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, None, "use GET");
    }
    metrics(state).await
}

async fn metrics(state: &State) -> Answer {
    match state.handle.status().await {
        Ok(status) => Response::builder()
            .status(StatusCode::OK)
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(super::metrics::encode(&status))))
            .expect("invariant: a static header is valid"),
        Err(_) => stopped(),
    }
}

/// Answers one request from `peer`.
pub(super) async fn route(state: &State, peer: Peer, req: Request<Incoming>) -> Answer {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();

    let changes = method != Method::GET && method != Method::HEAD;
    if changes && peer.uid != 0 && peer.uid != state.owner {
        return error(
            StatusCode::FORBIDDEN,
            None,
            format!(
                "only the socket's owner (uid {}) and root may change anything; you are uid {}",
                state.owner, peer.uid
            ),
        );
    }
    let source = format!("the control API (uid {})", peer.uid);

    match (method.clone(), parts.as_slice()) {
        (Method::GET, ["metrics"]) => metrics(state).await,
        (Method::GET, ["v1", "status"]) => status(state).await,
        (Method::POST, ["v1", switch @ ("enable" | "disable")]) => {
            set(
                state,
                "host",
                vec![switch_override("host", switch)],
                &source,
            )
            .await
        }
        (Method::GET, ["v1", section]) if SECTIONS.contains(section) => {
            settings(state, section).await
        }
        (Method::PATCH | Method::PUT, ["v1", section]) if SECTIONS.contains(section) => {
            let section = section.to_string();
            match body_changes(&section, req).await {
                Ok(overrides) => set(state, &section, overrides, &source).await,
                Err(answer) => answer,
            }
        }
        (Method::POST, ["v1", section @ ("nat" | "dhcp"), switch @ ("enable" | "disable")]) => {
            set(
                state,
                section,
                vec![switch_override(section, switch)],
                &source,
            )
            .await
        }
        (Method::GET, ["v1", "nat", "sessions"]) => sessions(state, &query).await,
        (Method::DELETE, ["v1", "nat", "sessions", id]) => end_session(state, id, &source).await,
        (Method::GET, ["v1", "dhcp", "leases"]) => match state.handle.leases().await {
            Ok(rows) => answer(StatusCode::OK, &json!(rows)),
            Err(_) => stopped(),
        },
        (Method::DELETE, ["v1", "dhcp", "leases", target]) => release(state, target, &source).await,
        (Method::GET, ["v1", "policies"]) => match state.handle.policies().await {
            Ok(list) => answer(StatusCode::OK, &json!(list)),
            Err(_) => stopped(),
        },
        (Method::POST, ["v1", "policies", "reload"]) => reload(state, &source).await,
        (
            _,
            ["metrics"]
            | ["v1", "status" | "enable" | "disable" | "host" | "nat" | "dhcp" | "dns"]
            | ["v1", "nat" | "dhcp", "enable" | "disable"]
            | ["v1", "nat", "sessions", ..]
            | ["v1", "dhcp", "leases", ..]
            | ["v1", "policies"]
            | ["v1", "policies", "reload"],
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            format!("{method} is not allowed on {path}"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            None,
            format!("no such path: {path} (see README.md, \"The control API\")"),
        ),
    }
}

fn switch_override(section: &str, switch: &str) -> Override {
    Override::new(
        format!("{section}.enabled"),
        (switch == "enable").to_string(),
    )
}

/// The `KEY=VALUE` changes of a PATCH body.
async fn body_changes(section: &str, req: Request<Incoming>) -> Result<Vec<Override>, Answer> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                None,
                format!("cannot read the body (at most {MAX_BODY} bytes): {e}"),
            )
        })?
        .to_bytes();
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            None,
            format!("the body is not JSON: {e}"),
        )
    })?;
    let Value::Object(map) = body else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            None,
            "the body must be a JSON object of keys and values, e.g. {\"lease\": \"10m\"}",
        ));
    };
    if map.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, None, "no change given"));
    }
    let mut overrides = Vec::new();
    for (key, value) in map {
        let full = if key.starts_with(&format!("{section}.")) {
            key.clone()
        } else {
            format!("{section}.{key}")
        };
        let text = match value {
            Value::String(s) => s,
            other => match toml::Value::try_from(&other) {
                Ok(v) => v.to_string(),
                Err(_) => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        Some(&full),
                        format!("cannot be written as a setting: {other}"),
                    ))
                }
            },
        };
        overrides.push(Override::new(full, text));
    }
    Ok(overrides)
}

/// Applies changes through the gateway, then persists them and keeps the running copy.
async fn set(state: &State, section: &str, overrides: Vec<Override>, source: &str) -> Answer {
    match state.handle.set(overrides, source).await {
        Ok(changes) => {
            let persisted = persist(state, &changes);
            let mut body = json!({
                "section": section,
                "changed": changes
                    .iter()
                    .map(|c| json!({ "key": c.key, "old": toml_json(&c.old), "new": toml_json(&c.new) }))
                    .collect::<Vec<_>>(),
            });
            match persisted {
                Ok(()) => body["persisted"] = Value::Bool(true),
                Err(e) => {
                    body["persisted"] = Value::Bool(false);
                    body["warning"] =
                        Value::from(format!("applied, but not saved for the next start: {e}"));
                }
            }
            answer(StatusCode::OK, &body)
        }
        Err(HandleError::Invalid { key, message }) => {
            error(StatusCode::BAD_REQUEST, key.as_deref(), message)
        }
        Err(HandleError::Stopped) => stopped(),
    }
}

fn persist(state: &State, changes: &[Change]) -> Result<(), String> {
    if changes.is_empty() {
        return Ok(());
    }
    persist_changes(&state.state_dir, changes).map_err(|e| e.to_string())?;
    let mut overridden = state.overridden.borrow_mut();
    for c in changes {
        let entry = Overridden {
            key: c.key.clone(),
            value: c.new.clone(),
            origin: ORIGIN_PERSISTED.into(),
        };
        match overridden.iter_mut().find(|o| o.key == c.key) {
            Some(o) => *o = entry,
            None => overridden.push(entry),
        }
    }
    Ok(())
}

/// A value as the file writes it (`"2h"`, `1500`, `["1.1.1.1"]`) as JSON.
fn toml_json(text: &str) -> Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or_else(|| Value::from(text))
}

async fn settings(state: &State, section: &str) -> Answer {
    let Ok(config) = state.handle.config().await else {
        return stopped();
    };
    let Some(list) = config.section_settings(section) else {
        return error(StatusCode::NOT_FOUND, None, format!("no section {section}"));
    };
    let overridden = state.overridden.borrow();
    let prefix = format!("{section}.");
    let mut values = Map::new();
    let mut origins = Map::new();
    for s in list {
        let short = s.key.strip_prefix(&prefix).unwrap_or(&s.key).to_string();
        if let Some(o) = overridden.iter().find(|o| o.key == s.key) {
            origins.insert(short.clone(), Value::from(o.origin.clone()));
        }
        values.insert(short, toml_json(&s.value));
    }
    answer(
        StatusCode::OK,
        &json!({ "section": section, "settings": values, "origins": origins }),
    )
}

async fn status(state: &State) -> Answer {
    let Ok(status) = state.handle.status().await else {
        return stopped();
    };
    let mut body = serde_json::to_value(&status).unwrap_or_default();
    // `nat.enabled` and `dhcp.enabled` next to each one's counters.
    if let Some(nat) = body.get_mut("nat").and_then(Value::as_object_mut) {
        nat.insert("enabled".into(), Value::Bool(status.nat_enabled));
    }
    if let Some(dhcp) = body.get_mut("dhcp").and_then(Value::as_object_mut) {
        dhcp.insert("enabled".into(), Value::Bool(status.dhcp_enabled));
    }
    body["overridden"] = json!(*state.overridden.borrow());
    answer(StatusCode::OK, &body)
}

async fn sessions(state: &State, query: &str) -> Answer {
    let mut client: Option<Ipv4Addr> = None;
    let mut protocol: Option<Protocol> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "client" => match value.parse() {
                Ok(ip) => client = Some(ip),
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        Some("client"),
                        format!("{value:?} is not an IPv4 address"),
                    )
                }
            },
            "protocol" => {
                protocol = match value {
                    "tcp" => Some(Protocol::Tcp),
                    "udp" => Some(Protocol::Udp),
                    "icmp" => Some(Protocol::Icmp),
                    _ => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            Some("protocol"),
                            format!("{value:?}: must be tcp, udp or icmp"),
                        )
                    }
                }
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    Some(name),
                    "unknown filter; the filters are client and protocol",
                )
            }
        }
    }
    match state.handle.sessions().await {
        Ok(rows) => {
            let rows: Vec<_> = rows
                .into_iter()
                .filter(|r| client.is_none_or(|ip| *r.client.ip() == ip))
                .filter(|r| protocol.is_none_or(|p| r.protocol == p))
                .collect();
            answer(StatusCode::OK, &json!(rows))
        }
        Err(_) => stopped(),
    }
}

async fn end_session(state: &State, id: &str, source: &str) -> Answer {
    let Ok(n) = id.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            Some("id"),
            format!("{id:?} is not a session id (see the id column of the session table)"),
        );
    };
    match state.handle.end_session(SessionId(n), source).await {
        Ok(true) => answer(StatusCode::OK, &json!({ "ended": n })),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no session {n} (it may have ended already)"),
        ),
        Err(_) => stopped(),
    }
}

async fn reload(state: &State, source: &str) -> Answer {
    let Some(policy_source) = &state.policy_source else {
        return error(
            StatusCode::CONFLICT,
            None,
            "this gateway has no configuration to re-read the policies from (it is embedded); \
             its program reloads them with GatewayHandle::reload_policies",
        );
    };
    let configs = match policy_source.read() {
        Ok(configs) => configs,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                first_key(&e),
                format!("the configuration does not load, so nothing was reloaded: {e}"),
            )
        }
    };
    match state.handle.reload_policies(configs, source).await {
        Ok(report) => {
            let mut body = json!(report);
            match state.handle.policies().await {
                Ok(list) => body["policies"] = json!(list),
                Err(_) => return stopped(),
            }
            answer(StatusCode::OK, &body)
        }
        Err(HandleError::Invalid { key, message }) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, key.as_deref(), message)
        }
        Err(HandleError::Stopped) => stopped(),
    }
}

/// The key of the first invalid value in `e`, if it names one.
fn first_key(e: &ConfigError) -> Option<&str> {
    match e {
        ConfigError::Invalid { key, .. } => Some(key),
        ConfigError::Several(list) => list.iter().find_map(first_key),
        _ => None,
    }
}

async fn release(state: &State, target: &str, source: &str) -> Answer {
    let parsed = if let Ok(ip) = target.parse::<Ipv4Addr>() {
        LeaseTarget::Ip(ip)
    } else if let Ok(mac) = target.parse::<crate::config::MacAddr>() {
        LeaseTarget::Mac(mac.0)
    } else {
        return error(
            StatusCode::BAD_REQUEST,
            Some("lease"),
            format!("{target:?} is neither a MAC address nor an IPv4 address"),
        );
    };
    match state.handle.release_lease(parsed, source).await {
        Ok(Some(row)) => answer(StatusCode::OK, &json!({ "released": row })),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            Some("lease"),
            format!("no lease for {target}"),
        ),
        Err(_) => stopped(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_back_as_json() {
        assert_eq!(toml_json("\"2h\""), json!("2h"));
        assert_eq!(toml_json("1500"), json!(1500));
        assert_eq!(toml_json("[\"1.1.1.1\"]"), json!(["1.1.1.1"]));
        assert_eq!(toml_json("true"), json!(true));
    }
}
