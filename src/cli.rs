//! The operator commands (`hubnat status`, `hubnat nat table`, …): requests to a running
//! gateway's control API, answers printed as aligned tables for people or as JSON for scripts.

use anyhow::{Context, Result};
use hubnat::config::{Config, Sources};
use hubnat::control::client::Client;
use hyper::Method;
use serde_json::{Map, Value};

use crate::{
    ClientArgs, DhcpCommand, JsonArgs, NatCommand, PolicyCommand, SectionCommand, SetArgs,
    TableArgs,
};

/// The client of the socket `args` point to: `--control`, else the configuration's.
fn client(args: &ClientArgs) -> Result<Client> {
    if let Some(path) = &args.control {
        return Ok(Client::new(path));
    }
    let mut overrides = Vec::new();
    if let Some(dir) = &args.state_dir {
        overrides.push(hubnat::config::Override::new(
            "state.dir",
            format!("{:?}", dir.display().to_string()),
        ));
    }
    let sources = Sources {
        host: None,
        file: args.config.clone(),
        env: true,
        persisted: false,
        overrides,
    };
    let config = Config::load(&sources)
        .context("cannot find the control socket in the configuration")?
        .config;
    Ok(Client::new(config.control_socket_path()))
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows under headers, each column as wide as its widest cell.
/// Prints `rows` (a JSON array of objects) as a table, one column per (heading, key).
fn print_objects(rows: &Value, columns: &[(&str, &str)]) {
    let cells: Vec<Vec<String>> = rows
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|r| columns.iter().map(|(_, key)| cell(&r[*key])).collect())
        .collect();
    let headings: Vec<&str> = columns.iter().map(|(heading, _)| *heading).collect();
    print_table(&headings, &cells);
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<width$}", width = widths[i])
                }
            })
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// A JSON value as a cell: strings bare, null empty, the rest as JSON.
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn on(v: &Value) -> &'static str {
    if v.as_bool().unwrap_or(false) {
        "on"
    } else {
        "off"
    }
}

pub fn status(args: &JsonArgs) -> Result<()> {
    let s = client(&args.client)?.get("/v1/status")?;
    if args.json {
        return print_json(&s);
    }
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let rows = vec![
        vec!["function".into(), on(&s["enabled"]).into()],
        vec!["nat".into(), on(&s["nat_enabled"]).into()],
        vec!["dhcp".into(), on(&s["dhcp_enabled"]).into()],
        vec![
            "virtual host".into(),
            format!(
                "{} mask {} mac {}",
                cell(&s["ip"]),
                cell(&s["mask"]),
                cell(&s["mac"])
            ),
        ],
        vec!["backend".into(), cell(&s["backend"])],
        vec![
            "uptime".into(),
            humantime::format_duration(std::time::Duration::from_secs(n(&s["uptime_secs"])))
                .to_string(),
        ],
        vec![
            "sessions".into(),
            format!(
                "tcp {}, udp {}, icmp {}",
                n(&s["sessions"]["tcp"]),
                n(&s["sessions"]["udp"]),
                n(&s["sessions"]["icmp"])
            ),
        ],
        vec![
            "leases".into(),
            format!("{} bound, pool of {}", n(&s["leases"]), n(&s["pool_size"])),
        ],
        vec![
            "bytes".into(),
            format!(
                "{} to remotes, {} to clients",
                n(&s["bytes_to_remote"]),
                n(&s["bytes_to_client"])
            ),
        ],
        vec![
            "frames".into(),
            format!(
                "{} in, {} out",
                n(&s["counters"]["frames_in"]),
                n(&s["counters"]["frames_out"])
            ),
        ],
        vec!["icmp echo".into(), cell(&s["icmp_mode"])],
    ];
    print_table(&["STATUS", ""], &rows);
    let overridden: Vec<Vec<String>> = s["overridden"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|o| vec![cell(&o["key"]), cell(&o["value"]), cell(&o["origin"])])
                .collect()
        })
        .unwrap_or_default();
    if !overridden.is_empty() {
        println!();
        print_table(&["SETTING", "VALUE", "FROM"], &overridden);
    }
    Ok(())
}

pub fn switch(args: &ClientArgs, path: &str) -> Result<()> {
    let answer = client(args)?.request(Method::POST, path, None)?;
    print_changes(&answer);
    Ok(())
}

fn print_changes(answer: &Value) {
    let changed = answer["changed"].as_array().cloned().unwrap_or_default();
    if changed.is_empty() {
        println!("no change");
    }
    for c in &changed {
        println!("{} = {} (was {})", cell(&c["key"]), c["new"], c["old"]);
    }
    if let Some(w) = answer["warning"].as_str() {
        eprintln!("hubnat: warning: {w}");
    }
}

fn get(section: &str, args: &JsonArgs) -> Result<()> {
    let answer = client(&args.client)?.get(&format!("/v1/{section}"))?;
    if args.json {
        return print_json(&answer["settings"]);
    }
    let empty = Map::new();
    let settings = answer["settings"].as_object().unwrap_or(&empty);
    let rows: Vec<Vec<String>> = settings
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => format!("{s:?}"),
                other => other.to_string(),
            };
            vec![k.clone(), value, cell(&answer["origins"][k])]
        })
        .collect();
    print_table(&["KEY", "VALUE", "FROM"], &rows);
    Ok(())
}

fn set(section: &str, args: &SetArgs) -> Result<()> {
    let mut body = Map::new();
    for change in &args.changes {
        let (key, value) = change
            .split_once('=')
            .with_context(|| format!("{change:?}: expected KEY=VALUE"))?;
        body.insert(key.trim().to_string(), Value::from(value));
    }
    let answer = client(&args.client)?.request(
        Method::PATCH,
        &format!("/v1/{section}"),
        Some(&Value::Object(body)),
    )?;
    print_changes(&answer);
    Ok(())
}

pub fn section(section: &str, command: SectionCommand) -> Result<()> {
    match command {
        SectionCommand::Get(args) => get(section, &args),
        SectionCommand::Set(args) => set(section, &args),
    }
}

pub fn nat(command: NatCommand) -> Result<()> {
    match command {
        NatCommand::Get(args) => get("nat", &args),
        NatCommand::Set(args) => set("nat", &args),
        NatCommand::Enable(args) => switch(&args, "/v1/nat/enable"),
        NatCommand::Disable(args) => switch(&args, "/v1/nat/disable"),
        NatCommand::Table(args) => nat_table(&args),
        NatCommand::Kill { client: c, id } => {
            client(&c)?.request(Method::DELETE, &format!("/v1/nat/sessions/{id}"), None)?;
            println!("session {id} ended");
            Ok(())
        }
    }
}

fn nat_table(args: &TableArgs) -> Result<()> {
    let mut query = Vec::new();
    if let Some(ip) = args.client {
        query.push(format!("client={ip}"));
    }
    if let Some(p) = &args.protocol {
        query.push(format!("protocol={p}"));
    }
    let path = match query.is_empty() {
        true => "/v1/nat/sessions".to_string(),
        false => format!("/v1/nat/sessions?{}", query.join("&")),
    };
    let rows = client(&args.json.client)?.get(&path)?;
    if args.json.json {
        return print_json(&rows);
    }
    print_objects(
        &rows,
        &[
            ("ID", "id"),
            ("PROTO", "protocol"),
            ("CLIENT", "client"),
            ("REMOTE", "remote"),
            ("NAME", "remote_name"),
            ("STATE", "state"),
            ("CREATED", "created"),
            ("LAST", "last_activity"),
            ("TO-REMOTE", "bytes_to_remote"),
            ("TO-CLIENT", "bytes_to_client"),
        ],
    );
    Ok(())
}

pub fn dhcp(command: DhcpCommand) -> Result<()> {
    match command {
        DhcpCommand::Get(args) => get("dhcp", &args),
        DhcpCommand::Set(args) => set("dhcp", &args),
        DhcpCommand::Enable(args) => switch(&args, "/v1/dhcp/enable"),
        DhcpCommand::Disable(args) => switch(&args, "/v1/dhcp/disable"),
        DhcpCommand::Table(args) => {
            let rows = client(&args.client)?.get("/v1/dhcp/leases")?;
            if args.json {
                return print_json(&rows);
            }
            print_objects(
                &rows,
                &[
                    ("ID", "id"),
                    ("MAC", "mac"),
                    ("IP", "ip"),
                    ("STATE", "state"),
                    ("START", "start"),
                    ("EXPIRES", "expires"),
                    ("HOSTNAME", "hostname"),
                ],
            );
            Ok(())
        }
        DhcpCommand::Release { client: c, target } => {
            let answer =
                client(&c)?.request(Method::DELETE, &format!("/v1/dhcp/leases/{target}"), None)?;
            let r = &answer["released"];
            println!("released {} ({})", cell(&r["ip"]), cell(&r["mac"]));
            Ok(())
        }
    }
}

pub fn policy(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::List(args) => {
            let list = client(&args.client)?.get("/v1/policies")?;
            if args.json {
                return print_json(&list);
            }
            print_policies(&list);
            Ok(())
        }
        PolicyCommand::Reload(args) => {
            let report = client(&args)?.request(Method::POST, "/v1/policies/reload", None)?;
            let names = |key: &str| -> Vec<String> {
                report[key]
                    .as_array()
                    .map(|a| a.iter().map(cell).collect())
                    .unwrap_or_default()
            };
            let (in_force, kept) = (names("in_force"), names("kept_previous"));
            match in_force.is_empty() {
                true => println!("reloaded: no policy in force"),
                false => println!("reloaded: in force {}", in_force.join(", ")),
            }
            let errors = report["errors"].as_array().cloned().unwrap_or_default();
            for e in &errors {
                let name = cell(&e["name"]);
                let outcome = match kept.contains(&name) {
                    true => "its previous module stays in force",
                    false => "it is not in force",
                };
                eprintln!(
                    "hubnat: error: policy {name:?} ({}): {}; {outcome}",
                    cell(&e["path"]),
                    cell(&e["reason"])
                );
            }
            if !in_force.is_empty() {
                println!();
                print_policies(&report["policies"]);
            }
            match errors.len() {
                0 => Ok(()),
                n => anyhow::bail!("{n} of the configured policies failed to load (see above)"),
            }
        }
    }
}

/// Bytes as people write them in the configuration ("16MiB"), exact.
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => b.to_string(),
    }
}

/// The policies in force (`GET /v1/policies`) as a table.
fn print_policies(list: &Value) {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let c = &p["calls"];
            let hooks: Vec<&str> = [("session", "session_filter"), ("dhcp", "dhcp_customizer")]
                .iter()
                .filter(|(_, key)| p[*key].as_bool().unwrap_or(false))
                .map(|(name, _)| *name)
                .collect();
            let errors =
                n(&c["timeouts"]) + n(&c["out_of_memory"]) + n(&c["traps"]) + n(&c["broken"]);
            vec![
                cell(&p["name"]),
                hooks.join("+"),
                cell(&p["on_error"]),
                cell(&p["timeout"]),
                size(n(&p["memory"])),
                format!("{}/{}", n(&c["session"]), n(&c["dhcp"])),
                format!(
                    "{}/{}/{}",
                    n(&c["rejected"]),
                    n(&c["dropped"]),
                    n(&c["redirected"])
                ),
                format!("{}/{}", n(&c["dhcp_changed"]), n(&c["dhcp_no_reply"])),
                errors.to_string(),
                cell(&p["loaded"]),
                cell(&p["path"]),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "HOOKS",
            "ON-ERROR",
            "TIMEOUT",
            "MEMORY",
            "CALLS(S/D)",
            "REJ/DROP/REDIR",
            "CHANGED/NOREPLY",
            "ERRORS",
            "LOADED",
            "PATH",
        ],
        &rows,
    );
}
