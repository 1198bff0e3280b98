//! Real DHCP clients over a real TAP device, in network namespaces.
//!
//! hubnat runs in a namespace of its own and opens a TAP device there; the test moves the
//! device's interface into a client namespace, where ISC dhclient or busybox udhcpc configure
//! it. Nothing has a route anywhere else: the only link in either namespace is the TAP device.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::netns::{
    fields, hubnat_bin, read, require_programs, require_root, unique, wait_until, Netns, Proc,
};

const HOST_MAC: &str = "00:ac:11:22:33:44";
const GW: &str = "192.168.30.1";
const CLIENT_MAC: &str = "52:54:00:aa:bb:cc";

struct TapGateway {
    gw: Netns,
    client: Netns,
    tap: String,
    dir: tempfile::TempDir,
    hubnat: Option<Proc>,
}

impl TapGateway {
    fn start() -> TapGateway {
        let dir = tempfile::tempdir().unwrap();
        let tap = unique("hnt");
        let gw = Netns::new("hngw");
        let client = Netns::new("hncl");
        let config = dir.path().join("hubnat.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[host]
mac = "{HOST_MAC}"

[dhcp]
lease = "20s"
domain = "hubnat.test"
dns = ["192.168.30.1", "192.168.30.53"]

[dns]
upstream = []

[backend]
kind = "tap"
[backend.tap]
name = "{tap}"

[state]
dir = "{state}"

[log]
level = "debug"
"#,
                state = dir.path().join("state").display()
            ),
        )
        .unwrap();
        let hubnat = launch(&gw, &client, &tap, dir.path());
        TapGateway {
            gw,
            client,
            tap,
            dir,
            hubnat: Some(hubnat),
        }
    }

    /// Kills hubnat with SIGKILL (no chance to save anything) and starts it again on the same
    /// configuration and state directory.
    fn kill_and_restart(&mut self) {
        let mut old = self.hubnat.take().unwrap();
        old.signal(libc::SIGKILL);
        wait_until(Duration::from_secs(10), "hubnat to die", || {
            !old.is_running()
        });
        self.hubnat = Some(launch(&self.gw, &self.client, &self.tap, self.dir.path()));
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn security_log(&self) -> String {
        read(&self.path("state").join("security.log"))
    }

    fn hubnat_log(&self) -> String {
        read(&self.path("hubnat.log"))
    }

    /// The client can ping the virtual host, and ARP resolved it to the configured MAC.
    fn check_ping_and_arp(&self) {
        let out = self
            .client
            .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", GW]);
        assert!(
            out.status.success(),
            "ping {GW} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let neigh = self
            .client
            .exec_ok(&["ip", "neigh", "show", GW, "dev", &self.tap]);
        assert!(
            neigh.contains(&format!("lladdr {HOST_MAC}")),
            "ARP for {GW}: {neigh:?}"
        );
    }

    /// Stops hubnat by PID with SIGTERM; it must exit cleanly and leave its leases saved.
    fn stop(mut self) -> String {
        let status = self.hubnat.take().unwrap().stop();
        assert!(
            status.success(),
            "hubnat exit status {status}:\n{}",
            self.hubnat_log()
        );
        let log = self.security_log();
        assert!(log.contains("GATEWAY stopped: reason=shutdown"), "{log}");
        assert!(self.path("state").join("leases.json").exists());
        let _ = (&self.gw, &self.client);
        log
    }
}

/// Starts hubnat on `dir`/hubnat.toml in `gw` and hands its TAP device to `client`.
fn launch(gw: &Netns, client: &Netns, tap: &str, dir: &Path) -> Proc {
    let config = dir.join("hubnat.toml");
    let log = dir.join("hubnat.log");
    let mut cmd = gw.command(hubnat_bin().to_str().unwrap());
    cmd.args(["run", "--config", config.to_str().unwrap()]);
    let mut hubnat = Proc::spawn(cmd, "hubnat", &log);
    wait_until(
        Duration::from_secs(15),
        "hubnat to open its TAP device",
        || {
            assert!(hubnat.is_running(), "hubnat exited early:\n{}", read(&log));
            gw.exec(&["ip", "link", "show", "dev", tap])
                .status
                .success()
        },
    );
    // The kernel side of the TAP device becomes the client's network interface, with a fixed
    // MAC so that a restarted gateway sees the same client.
    gw.exec_ok(&["ip", "link", "set", tap, "netns", &client.name]);
    client.exec_ok(&["ip", "link", "set", tap, "address", CLIENT_MAC]);
    client.exec_ok(&["ip", "link", "set", tap, "up"]);
    hubnat
}

fn assert_in_range(ip: &str) {
    let last: u8 = ip
        .strip_prefix("192.168.30.")
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("{ip} not in 192.168.30.0/24"));
    assert!(
        (10..=200).contains(&last),
        "{ip} outside the range .10-.200"
    );
}

fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn isc_dhclient_gets_renews_and_releases_a_lease() {
    if !require_root("isc_dhclient_gets_renews_and_releases_a_lease") {
        return;
    }
    require_programs(&["dhclient", "ping", "ip"]);
    let gw = TapGateway::start();
    let events = gw.path("dhclient-events.log");
    let script = gw.path("dhclient-script");
    write_script(
        &script,
        &format!(
            r#"#!/bin/sh
# Configure first, then record: the test reads the record and then looks at the address.
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT) ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface" ;;
  RELEASE|EXPIRE|STOP|FAIL) ip addr flush dev "$interface" ;;
esac
echo "reason=$reason ip=$new_ip_address mask=$new_subnet_mask routers=$new_routers dns=$new_domain_name_servers domain=$new_domain_name lease=$new_dhcp_lease_time server=$new_dhcp_server_identifier" >> {events}
exit 0
"#,
            events = events.display()
        ),
    );
    let conf = gw.path("dhclient.conf");
    std::fs::write(
        &conf,
        "send host-name \"dhclient-test\";\n\
         request subnet-mask, broadcast-address, routers, domain-name, domain-name-servers, dhcp-lease-time, dhcp-renewal-time, dhcp-rebinding-time;\n",
    )
    .unwrap();
    let (leases, pidfile) = (gw.path("dhclient.leases"), gw.path("dhclient.pid"));
    let args = |extra: &[&str]| {
        let mut c = gw.client.command("dhclient");
        c.args(extra).args([
            "-v",
            "-cf",
            conf.to_str().unwrap(),
            "-sf",
            script.to_str().unwrap(),
            "-lf",
            leases.to_str().unwrap(),
            "-pf",
            pidfile.to_str().unwrap(),
            &gw.tap,
        ]);
        c
    };

    let started = Instant::now();
    let dhclient = Proc::spawn(args(&["-d", "-1"]), "dhclient", &gw.path("dhclient.log"));
    wait_until(Duration::from_secs(30), "dhclient to bind", || {
        read(&events).contains("reason=BOUND")
    });
    let took = started.elapsed();
    let bound = fields(&read(&events), "reason=BOUND");
    eprintln!("dhclient: lease acquired in {took:?}: {bound:?}");
    assert_in_range(&bound["ip"]);
    assert_eq!(bound["mask"], "255.255.255.0");
    assert_eq!(bound["routers"], GW);
    assert_eq!(bound["dns"], "192.168.30.1 192.168.30.53");
    assert_eq!(bound["domain"], "hubnat.test");
    assert_eq!(bound["lease"], "20");
    assert_eq!(bound["server"], GW);
    let ip = bound["ip"].clone();
    let addr = gw
        .client
        .exec_ok(&["ip", "-4", "addr", "show", "dev", &gw.tap]);
    assert!(addr.contains(&format!("inet {ip}/24")), "{addr}");
    gw.check_ping_and_arp();

    // T1 is half the 20 s lease: dhclient renews by itself.
    wait_until(Duration::from_secs(30), "dhclient to renew", || {
        read(&events).contains("reason=RENEW")
    });
    let renewed = fields(&read(&events), "reason=RENEW");
    assert_eq!(renewed["ip"], ip);
    let log = gw.security_log();
    assert!(
        log.contains(&"DHCP lease created: id=1 mac=".to_string()),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("DHCP lease renewed")
            && l.contains(&format!("ip={ip} "))
            && l.contains("hostname=\"dhclient-test\"")),
        "{log}"
    );

    // dhclient -r releases the lease it recorded.
    let status = dhclient.stop();
    let _ = status;
    let _ = std::fs::remove_file(&pidfile);
    let out = args(&["-r"]).output().unwrap();
    assert!(
        out.status.success(),
        "dhclient -r: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        Duration::from_secs(10),
        "the release in the security log",
        || gw.security_log().contains("DHCP lease released"),
    );

    // The lease table says so too.
    let table = std::process::Command::new(hubnat_bin())
        .args(["leases", "--state-dir", gw.path("state").to_str().unwrap()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.contains(&ip) && l.contains("released") && l.contains("dhclient-test")),
        "{table}"
    );
    gw.stop();
}

#[test]
fn busybox_udhcpc_gets_renews_and_releases_a_lease() {
    if !require_root("busybox_udhcpc_gets_renews_and_releases_a_lease") {
        return;
    }
    require_programs(&["udhcpc", "ping", "ip"]);
    let gw = TapGateway::start();
    let events = gw.path("udhcpc-events.log");
    let script = gw.path("udhcpc-script");
    write_script(
        &script,
        &format!(
            r#"#!/bin/sh
echo "event=$1 ip=$ip subnet=$subnet router=$router dns=$dns domain=$domain lease=$lease serverid=$serverid" >> {events}
case "$1" in
  bound|renew) ip addr replace "$ip/$subnet" dev "$interface" ;;
  deconfig) ip addr flush dev "$interface" ;;
esac
exit 0
"#,
            events = events.display()
        ),
    );
    let started = Instant::now();
    let mut cmd = gw.client.command("udhcpc");
    cmd.args([
        "-f",
        "-i",
        &gw.tap,
        "-s",
        script.to_str().unwrap(),
        "-t",
        "10",
        "-T",
        "1",
        "-x",
        "hostname:udhcpc-test",
    ]);
    let udhcpc = Proc::spawn(cmd, "udhcpc", &gw.path("udhcpc.log"));
    wait_until(Duration::from_secs(30), "udhcpc to bind", || {
        read(&events).contains("event=bound")
    });
    let took = started.elapsed();
    let bound = fields(&read(&events), "event=bound");
    eprintln!("udhcpc: lease acquired in {took:?}: {bound:?}");
    assert_in_range(&bound["ip"]);
    assert_eq!(bound["subnet"], "255.255.255.0");
    assert_eq!(bound["router"], GW);
    assert_eq!(bound["dns"], "192.168.30.1 192.168.30.53");
    assert_eq!(bound["domain"], "hubnat.test");
    assert_eq!(bound["lease"], "20");
    assert_eq!(bound["serverid"], GW);
    let ip = bound["ip"].clone();
    gw.check_ping_and_arp();

    // SIGUSR1 makes udhcpc renew now.
    udhcpc.signal(libc::SIGUSR1);
    wait_until(Duration::from_secs(20), "udhcpc to renew", || {
        read(&events).contains("event=renew")
    });
    assert_eq!(fields(&read(&events), "event=renew")["ip"], ip);
    wait_until(
        Duration::from_secs(5),
        "the renewal in the security log",
        || {
            gw.security_log().lines().any(|l| {
                l.contains("DHCP lease renewed")
                    && l.contains(&format!("ip={ip} "))
                    && l.contains("hostname=\"udhcpc-test\"")
            })
        },
    );

    // SIGUSR2 makes udhcpc release.
    udhcpc.signal(libc::SIGUSR2);
    wait_until(
        Duration::from_secs(10),
        "the release in the security log",
        || {
            gw.security_log()
                .lines()
                .any(|l| l.contains("DHCP lease released") && l.contains(&format!("ip={ip} ")))
        },
    );
    udhcpc.stop();
    gw.stop();
}

#[test]
fn a_killed_gateway_restarts_with_its_leases() {
    if !require_root("a_killed_gateway_restarts_with_its_leases") {
        return;
    }
    require_programs(&["udhcpc", "ip"]);
    let mut gw = TapGateway::start();
    let events = gw.path("udhcpc-events.log");
    let script = gw.path("udhcpc-script");
    write_script(
        &script,
        &format!(
            "#!/bin/sh\necho \"event=$1 ip=$ip\" >> {}\nexit 0\n",
            events.display()
        ),
    );
    let lease = |gw: &TapGateway| {
        let out = gw
            .client
            .command("udhcpc")
            .args([
                "-q",
                "-f",
                "-n",
                "-i",
                &gw.tap,
                "-s",
                script.to_str().unwrap(),
                "-t",
                "10",
                "-T",
                "1",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "udhcpc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fields(&read(&events), "event=bound")["ip"].clone()
    };
    let first = lease(&gw);
    gw.kill_and_restart();
    let log = gw.security_log();
    assert!(log.contains("leases_restored=1"), "{log}");
    let table = std::process::Command::new(hubnat_bin())
        .args(["leases", "--state-dir", gw.path("state").to_str().unwrap()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.contains(&first) && l.contains("bound") && l.contains(CLIENT_MAC)),
        "{table}"
    );
    // Another client asks first: the restarted gateway knows the first address is taken.
    gw.client
        .exec_ok(&["ip", "link", "set", &gw.tap, "address", "52:54:00:dd:ee:ff"]);
    let other = lease(&gw);
    assert_ne!(other, first, "the killed gateway's lease was forgotten");
    // The first client (udhcpc -q starts from DISCOVER, with no memory of its own) gets its
    // address back.
    gw.client
        .exec_ok(&["ip", "link", "set", &gw.tap, "address", CLIENT_MAC]);
    assert_eq!(lease(&gw), first);
    gw.stop();
}
