//! The policy host against real components: the examples of `policies/examples/` and the
//! misbehaving `policies/tests/misbehave`, built by `scripts/build-policies.sh` into
//! `target/policies/`, and small hand-made components for the load errors.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::config::{OnError, PolicyConfig};
use crate::core::nat::{
    Decision, FlowInfo, FlowTicket, PolicyAnswer, Protocol, SessionPolicy, Verdict,
};

use super::built_component as component;

/// A policy with a generous time bound: the tests that are not about the bound must not
/// depend on how busy the machine is (a debug build of wasmtime is slow).
fn policy(name: &str, file: &str, config: &[(&str, &str)]) -> PolicyConfig {
    PolicyConfig {
        name: name.into(),
        path: component(file),
        timeout: Duration::from_secs(2),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..PolicyConfig::default()
    }
}

fn flow(protocol: Protocol, remote: &str) -> FlowInfo {
    FlowInfo {
        protocol,
        client_mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        client: SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 10), 40000),
        remote: remote.parse().expect("remote"),
        client_hostname: Some("laptop".into()),
        remote_name: None,
    }
}

fn tcp(remote: &str) -> FlowInfo {
    flow(Protocol::Tcp, remote)
}

fn load(configs: &[PolicyConfig]) -> PolicySet {
    PolicySet::load(configs).unwrap_or_else(|e| panic!("loading: {e}"))
}

fn rejected_by(name: &str) -> Decision {
    Decision {
        verdict: Verdict::Reject,
        by: Some(name.into()),
    }
}

fn failures(notes: &[PolicyNote]) -> Vec<(String, Failure)> {
    notes
        .iter()
        .filter_map(|n| match &n.kind {
            NoteKind::Failed { failure, .. } => Some((n.policy.clone(), failure.clone())),
            _ => None,
        })
        .collect()
}

fn misbehave(on_error: OnError) -> PolicyConfig {
    PolicyConfig {
        on_error,
        timeout: Duration::from_millis(20),
        memory: 4 << 20,
        ..policy("m", "misbehave", &[("wpad", "http://wpad/")])
    }
}

#[test]
fn deny_destinations_refuses_its_ports_and_networks() {
    let mut set = load(&[policy(
        "no-smtp",
        "deny-destinations",
        &[
            ("ports", "25, 465,587"),
            ("cidrs", "203.0.113.0/24,10.9.9.9"),
        ],
    )]);
    assert_eq!(set.names(), ["no-smtp"]);
    assert!(set.has_session_filter() && !set.has_dhcp_customizer());

    let (d, notes) = set.check_session(&tcp("198.51.100.7:25"));
    assert_eq!(d, rejected_by("no-smtp"));
    // The first call reads the configuration and says so.
    assert_eq!(
        notes,
        [PolicyNote {
            policy: "no-smtp".into(),
            kind: NoteKind::Log {
                level: LogLevel::Info,
                message: "refusing 3 ports and 2 networks".into()
            }
        }]
    );
    for (remote, verdict) in [
        ("198.51.100.7:587", Verdict::Reject),
        ("198.51.100.7:80", Verdict::Allow),
        ("203.0.113.200:443", Verdict::Reject),
        ("10.9.9.9:53", Verdict::Reject),
        ("10.9.9.8:53", Verdict::Allow),
    ] {
        let (d, notes) = set.check_session(&tcp(remote));
        assert_eq!(d.verdict, verdict, "{remote}");
        assert!(notes.is_empty(), "{notes:?}");
    }
    // Allowed: by nobody. ICMP has no port to refuse.
    assert_eq!(
        set.check_session(&tcp("198.51.100.7:80")).0,
        Decision::allow()
    );
    let (d, _) = set.check_session(&flow(Protocol::Icmp, "198.51.100.7:0"));
    assert_eq!(d, Decision::allow());

    let mut quiet = load(&[policy(
        "quiet",
        "deny-destinations",
        &[("ports", "25"), ("verdict", "drop")],
    )]);
    let (d, _) = quiet.check_session(&flow(Protocol::Udp, "198.51.100.7:25"));
    assert_eq!(
        d,
        Decision {
            verdict: Verdict::Drop,
            by: Some("quiet".into())
        }
    );
}

#[test]
fn the_first_verdict_other_than_allow_wins() {
    let mut set = load(&[
        misbehave(OnError::Allow),
        policy("d", "deny-destinations", &[("ports", "25,5")]),
    ]);
    assert_eq!(
        set.check_session(&tcp("198.51.100.7:25")).0,
        rejected_by("d")
    );
    // Both refuse port 5: the first one configured names the decision.
    assert_eq!(
        set.check_session(&tcp("198.51.100.7:5")).0,
        rejected_by("m")
    );
    assert_eq!(
        set.check_session(&tcp("198.51.100.7:4")).0,
        Decision {
            verdict: Verdict::Redirect("192.0.2.1:8080".parse().expect("addr")),
            by: Some("m".into())
        }
    );
    assert_eq!(
        set.check_session(&tcp("198.51.100.7:80")).0,
        Decision::allow()
    );
}

#[test]
fn a_timeout_applies_on_error_and_the_policy_keeps_serving() {
    for (on_error, verdict) in [
        (OnError::Allow, Verdict::Allow),
        (OnError::Deny, Verdict::Reject),
    ] {
        let mut set = load(&[misbehave(on_error)]);
        let start = Instant::now();
        let (d, notes) = set.check_session(&tcp("198.51.100.7:1"));
        let took = start.elapsed();
        assert_eq!(d.verdict, verdict);
        assert_eq!(failures(&notes), [("m".to_string(), Failure::Timeout)]);
        assert!(
            matches!(&notes[0].kind, NoteKind::Failed { on_error: o, .. } if *o == on_error),
            "{notes:?}"
        );
        // 20 ms, at most 2 ticks more, and the instance made afresh; generous for a busy box.
        assert!(
            took >= Duration::from_millis(20) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // The next call runs on a fresh instance.
        assert_eq!(
            set.check_session(&tcp("198.51.100.7:5")).0,
            rejected_by("m")
        );
        assert_eq!(
            set.check_session(&tcp("198.51.100.7:80")).0,
            Decision::allow()
        );
    }
}

#[test]
fn running_out_of_memory_applies_on_error() {
    let mut set = load(&[misbehave(OnError::Deny)]);
    let (d, notes) = set.check_session(&tcp("198.51.100.7:2"));
    assert_eq!(d, rejected_by("m"));
    assert_eq!(failures(&notes), [("m".to_string(), Failure::OutOfMemory)]);
    assert_eq!(
        set.check_session(&tcp("198.51.100.7:80")).0,
        Decision::allow()
    );

    let mut set = load(&[misbehave(OnError::Allow)]);
    let (d, notes) = set.check_session(&tcp("198.51.100.7:2"));
    assert_eq!(d, Decision::allow());
    assert_eq!(failures(&notes), [("m".to_string(), Failure::OutOfMemory)]);
}

#[test]
fn a_trap_applies_on_error_and_logs_are_bounded() {
    let mut set = load(&[misbehave(OnError::Deny)]);
    let (d, notes) = set.check_session(&tcp("198.51.100.7:3"));
    assert_eq!(d, rejected_by("m"));
    let failed = failures(&notes);
    assert!(matches!(&failed[..], [(_, Failure::Trap(_))]), "{failed:?}");

    let (d, notes) = set.check_session(&tcp("198.51.100.7:6"));
    assert_eq!(d, Decision::allow());
    assert_eq!(notes.len(), MAX_LOG_LINES_PER_CALL + 1, "{notes:?}");
    assert_eq!(
        notes.last().map(|n| &n.kind),
        Some(&NoteKind::LogLinesDropped(100 - MAX_LOG_LINES_PER_CALL))
    );
}

/// A file with these bytes, kept until the end of the test.
fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    std::io::Write::write_all(&mut f, bytes).expect("write");
    f
}

fn load_error(path: PathBuf) -> String {
    let cfg = PolicyConfig {
        name: "broken".into(),
        path: path.clone(),
        ..PolicyConfig::default()
    };
    let err = PolicySet::load(&[cfg]).expect_err("must not load");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("policy \"broken\" ({}): ", path.display())),
        "{text}"
    );
    text
}

#[test]
fn load_errors_name_the_policy_its_file_and_the_problem() {
    let text = load_error("/nonexistent/policy.wasm".into());
    assert!(text.contains("cannot read it"), "{text}");

    let text_file = file_with(b"not wasm at all");
    let text = load_error(text_file.path().into());
    assert!(text.ends_with("is not a WebAssembly component"), "{text}");

    let module = file_with(&wat::parse_str("(module)").expect("wat"));
    let text = load_error(module.path().into());
    assert!(
        text.contains("is a core WebAssembly module, not a component"),
        "{text}"
    );

    let nothing = file_with(&wat::parse_str("(component)").expect("wat"));
    let text = load_error(nothing.path().into());
    assert!(
        text.contains(
            "exports neither hubnat:policy/session-filter@0.1.0 nor \
             hubnat:policy/dhcp-customizer@0.1.0 (it exports nothing)"
        ),
        "{text}"
    );

    let stranger = file_with(
        &wat::parse_str(r#"(component (import "evil:net/socket@1.0.0" (instance)))"#).expect("wat"),
    );
    let text = load_error(stranger.path().into());
    assert!(
        text.contains("imports evil:net/socket@1.0.0, which hubnat does not provide"),
        "{text}"
    );

    // The right name with the wrong shape: `check` takes nothing and returns nothing.
    let wrong = file_with(
        &wat::parse_str(
            r#"(component
                 (core module $m (func (export "check")))
                 (core instance $i (instantiate $m))
                 (func $check (canon lift (core func $i "check")))
                 (instance $filter (export "check" (func $check)))
                 (export "hubnat:policy/session-filter@0.1.0" (instance $filter)))"#,
        )
        .expect("wat"),
    );
    let text = load_error(wrong.path().into());
    assert!(
        text.contains("does not match") || text.contains("cannot be instantiated"),
        "{text}"
    );
}

fn client(mac: [u8; 6], hostname: Option<&str>) -> DhcpClientInfo {
    DhcpClientInfo {
        message_type: DhcpMessageKind::Request,
        mac,
        client_id: None,
        hostname: hostname.map(Into::into),
        vendor_class: None,
        requested_options: vec![1, 3, 6, 15, 121],
    }
}

fn reply() -> DhcpReplyInfo {
    DhcpReplyInfo {
        your_address: Ipv4Addr::new(192, 168, 30, 10),
        lease_seconds: Some(7200),
        options: vec![
            OptionBytes {
                code: 1,
                value: vec![255, 255, 255, 0],
            },
            OptionBytes {
                code: 3,
                value: vec![192, 168, 30, 1],
            },
            OptionBytes {
                code: 6,
                value: vec![192, 168, 30, 1],
            },
        ],
    }
}

fn option(code: u8, value: &[u8]) -> OptionBytes {
    OptionBytes {
        code,
        value: value.to_vec(),
    }
}

const LAB_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const OTHER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0xab, 0xcd, 0xef];

fn per_mac() -> PolicyConfig {
    policy(
        "lab",
        "per-mac-dhcp",
        &[
            ("mac_prefix", "52:54:00"),
            ("dns", "10.1.1.1, 10.1.1.2"),
            ("domain", "lab.example"),
            (
                "routes",
                "10.20.0.0/16 via 192.168.30.254, 0.0.0.0/0 via 192.168.30.1",
            ),
            ("lease", "600"),
        ],
    )
}

#[test]
fn per_mac_dhcp_gives_matching_clients_their_own_options() {
    let mut set = load(&[per_mac()]);
    assert!(set.has_dhcp_customizer() && !set.has_session_filter());

    let (outcome, notes) = set.customize_dhcp(client(LAB_MAC, None), reply());
    let changed = PolicyNote {
        policy: "lab".into(),
        kind: NoteKind::ChangedReply,
    };
    assert_eq!(
        notes,
        [changed],
        "the change is noted with the policy's name"
    );
    let mut expected = reply();
    // Option 6 replaced where it was; 15 and 121 added after.
    expected.options[2] = option(6, &[10, 1, 1, 1, 10, 1, 1, 2]);
    expected.options.push(option(15, b"lab.example"));
    expected.options.push(option(
        121,
        &[16, 10, 20, 192, 168, 30, 254, 0, 192, 168, 30, 1],
    ));
    expected.lease_seconds = Some(600);
    assert_eq!(outcome, DhcpOutcome::Reply(expected));

    let (outcome, _) = set.customize_dhcp(client(OTHER_MAC, None), reply());
    assert_eq!(outcome, DhcpOutcome::Reply(reply()));
}

#[test]
fn dhcp_changes_apply_in_order_and_no_reply_ends_the_chain() {
    let mut set = load(&[per_mac(), misbehave(OnError::Deny)]);
    let (outcome, _) = set.customize_dhcp(client(LAB_MAC, Some("laptop")), reply());
    let DhcpOutcome::Reply(r) = outcome else {
        panic!("{outcome:?}")
    };
    let codes: Vec<u8> = r.options.iter().map(|o| o.code).collect();
    assert_eq!(codes, [1, 3, 6, 15, 121, 252]);
    assert_eq!(r.options[5].value, b"http://wpad/");

    let (outcome, _) = set.customize_dhcp(client(LAB_MAC, Some("silence")), reply());
    assert_eq!(outcome, DhcpOutcome::NoReply { by: "m".into() });

    // A timeout: deny means no reply; allow means the reply as it was before that policy.
    let (outcome, notes) = set.customize_dhcp(client(OTHER_MAC, Some("spin")), reply());
    assert_eq!(outcome, DhcpOutcome::NoReply { by: "m".into() });
    assert_eq!(failures(&notes), [("m".to_string(), Failure::Timeout)]);
    let mut lenient = load(&[per_mac(), misbehave(OnError::Allow)]);
    let (outcome, notes) = lenient.customize_dhcp(client(OTHER_MAC, Some("hog")), reply());
    assert_eq!(outcome, DhcpOutcome::Reply(reply()));
    assert_eq!(failures(&notes), [("m".to_string(), Failure::OutOfMemory)]);
}

#[test]
fn a_reload_keeps_the_previous_module_of_a_policy_that_fails_to_load() {
    let mut set = load(&[policy("d", "deny-destinations", &[("ports", "25")])]);
    let broken = PolicyConfig {
        path: "/nonexistent/d.wasm".into(),
        ..policy("d", "deny-destinations", &[("ports", "80")])
    };
    let report = set.apply_reload(PolicyReload::load(
        &[misbehave(OnError::Allow), broken],
        None,
    ));
    assert_eq!(report.in_force, ["m", "d"]);
    assert_eq!(report.kept_previous, ["d"]);
    assert_eq!(report.errors.len(), 1);
    assert!(
        report.errors[0].to_string().contains("/nonexistent/d.wasm"),
        "{}",
        report.errors[0]
    );
    // The old "d" (port 25), not the new one (port 80).
    assert_eq!(
        set.check_session(&tcp("198.51.100.7:25")).0,
        rejected_by("d")
    );
    assert_eq!(
        set.check_session(&tcp("198.51.100.7:80")).0,
        Decision::allow()
    );
    // A policy left out of the reload is gone.
    let report = set.apply_reload(PolicyReload::load(&[], None));
    assert!(report.in_force.is_empty() && report.errors.is_empty());
    assert!(set.is_empty());
}

#[test]
fn the_thread_answers_every_request_and_survives_a_timeout() {
    let set = load(&[misbehave(OnError::Allow)]);
    let (mut client_, answers, thread) = PolicyThread::spawn(set).expect("spawn");
    assert_eq!(
        client_.check(FlowTicket(1), &tcp("198.51.100.7:1")),
        PolicyAnswer::Later
    );
    assert_eq!(
        client_.check(FlowTicket(2), &tcp("198.51.100.7:5")),
        PolicyAnswer::Later
    );
    client_
        .customize_dhcp(DhcpRequestId(7), client(OTHER_MAC, None), reply())
        .expect("queued");

    // The checks in order; the DHCP reply may overtake them (it is served first).
    let mut verdicts = Vec::new();
    for _ in 0..3 {
        match answers.recv_blocking().expect("answer") {
            PolicyResponse::Verdict {
                ticket,
                decision,
                notes,
            } => verdicts.push((ticket, decision, failures(&notes))),
            PolicyResponse::Dhcp { id, outcome, .. } => {
                assert_eq!(id, DhcpRequestId(7));
                let DhcpOutcome::Reply(r) = outcome else {
                    panic!("{outcome:?}")
                };
                assert_eq!(r.options.last(), Some(&option(252, b"http://wpad/")));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        verdicts,
        [
            (
                FlowTicket(1),
                Decision::allow(),
                vec![("m".to_string(), Failure::Timeout)]
            ),
            (FlowTicket(2), rejected_by("m"), vec![]),
        ]
    );

    // The counters saw the three calls.
    let listed = client_.policies();
    assert_eq!(listed.len(), 1);
    let (info, calls) = (&listed[0], listed[0].calls);
    assert_eq!(
        (
            info.name.as_str(),
            info.session_filter,
            info.dhcp_customizer
        ),
        ("m", true, true)
    );
    assert_eq!((calls.session, calls.dhcp), (2, 1), "{calls:?}");
    assert_eq!(
        (calls.timeouts, calls.rejected, calls.dhcp_changed),
        (1, 1, 1),
        "{calls:?}"
    );
    assert_eq!(calls.errors(), 1);
    assert!(client_.customizes_dhcp());

    // A reload to a set with no session filter: flows are allowed without a round trip.
    client_
        .reload_from(vec![per_mac()], ReloadId(9))
        .expect("reload thread");
    match answers.recv_blocking().expect("answer") {
        PolicyResponse::Reloaded { id, report } => {
            assert_eq!(id, ReloadId(9));
            assert_eq!(report.in_force, ["lab"]);
            assert!(report.errors.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client_.check(FlowTicket(3), &tcp("198.51.100.7:5")),
        PolicyAnswer::Decided(Decision::allow())
    );
    let listed = client_.policies();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].name.as_str(), listed[0].calls.session),
        ("lab", 0)
    );

    drop(client_);
    thread.join().expect("the policy thread ends cleanly");
}

/// A storm of session checks that each use the whole time budget does not hold up a DHCP
/// reply: it is answered next, after at most the call under way.
#[test]
fn a_dhcp_reply_overtakes_queued_session_checks() {
    let set = load(&[misbehave(OnError::Allow)]);
    let (mut client_, answers, thread) = PolicyThread::spawn(set).expect("spawn");
    // Port 1 loops until the 20 ms timeout: ten of them are 200 ms of work.
    for t in 0..10 {
        assert_eq!(
            client_.check(FlowTicket(t), &tcp("198.51.100.7:1")),
            PolicyAnswer::Later
        );
    }
    client_
        .customize_dhcp(DhcpRequestId(7), client(OTHER_MAC, None), reply())
        .expect("queued");
    let mut before = 0;
    loop {
        match answers.recv_blocking().expect("answer") {
            PolicyResponse::Verdict { .. } => before += 1,
            PolicyResponse::Dhcp { id, .. } => {
                assert_eq!(id, DhcpRequestId(7));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        before <= 1,
        "{before} session checks were answered before the DHCP reply"
    );
    for _ in before..10 {
        assert!(matches!(
            answers.recv_blocking().expect("answer"),
            PolicyResponse::Verdict { .. }
        ));
    }
    drop(client_);
    thread.join().expect("the policy thread ends cleanly");
}

#[test]
fn compiled_modules_are_kept_and_taken_only_for_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("policy-cache");
    let deny = policy("p", "deny-destinations", &[("ports", "25")]);
    let mut set = PolicySet::load_cached(std::slice::from_ref(&deny), Some(cache.clone())).unwrap();
    assert_eq!(
        set.check_session(&tcp("198.51.100.7:25")).0,
        rejected_by("p")
    );
    let code = cache.join("p.cwasm");
    let kept = std::fs::read(&code).expect("the machine code is kept");
    assert_eq!(
        std::fs::read(cache.join("p.wasm")).unwrap(),
        std::fs::read(&deny.path).unwrap()
    );
    // Taken, not compiled again: the code file is left as it was.
    let modified = std::fs::metadata(&code).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut again =
        PolicySet::load_cached(std::slice::from_ref(&deny), Some(cache.clone())).unwrap();
    assert_eq!(
        again.check_session(&tcp("198.51.100.7:25")).0,
        rejected_by("p")
    );
    assert_eq!(
        std::fs::metadata(&code).unwrap().modified().unwrap(),
        modified
    );
    // Another module under the same name: compiled, not taken for the old one.
    let other = policy("p", "misbehave", &[]);
    let mut changed =
        PolicySet::load_cached(std::slice::from_ref(&other), Some(cache.clone())).unwrap();
    assert_eq!(
        changed.check_session(&tcp("198.51.100.7:25")).0,
        Decision::allow()
    );
    assert_eq!(
        changed.check_session(&tcp("198.51.100.7:5")).0,
        rejected_by("p")
    );
    assert_ne!(std::fs::read(&code).unwrap(), kept);
    // Code wasmtime refuses is compiled afresh.
    std::fs::write(&code, b"not machine code").unwrap();
    let mut fresh = PolicySet::load_cached(std::slice::from_ref(&other), Some(cache)).unwrap();
    assert_eq!(
        fresh.check_session(&tcp("198.51.100.7:5")).0,
        rejected_by("p")
    );
    assert_ne!(std::fs::read(&code).unwrap(), b"not machine code");
}
