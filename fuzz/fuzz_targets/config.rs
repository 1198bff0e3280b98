//! Configuration loading: any text as the TOML file layer of `Config::load` (over the built-in
//! defaults; no host defaults, environment or persisted layer, so the run does not depend on
//! the machine). Errors are fine; a panic is not. An error must render (it names the key and
//! the source); a configuration that loads must give the core settings it can run with: the
//! target builds a virtual host from it and hands it a DHCP DISCOVER and an ARP request.
#![no_main]

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::OnceLock;

use dhcproto::v4::MessageType;
use hubnat::config::{Config, MacAddr, Sources};
use hubnat::core::{testkit, VirtualHost};
use libfuzzer_sys::fuzz_target;

/// The file the text is written to: one per process (fuzzing jobs run in parallel).
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::var_os("FUZZ_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        dir.join(format!("hubnat-fuzz-config-{}.toml", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut f = std::fs::File::create(path()).expect("the scratch file");
    f.write_all(data).expect("write the scratch file");
    drop(f);
    let sources = Sources {
        file: Some(path().clone()),
        ..Sources::default()
    };
    match Config::load(&sources) {
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty());
        }
        Ok(loaded) => {
            let config = loaded.config;
            let mac = MacAddr([0x00, 0xac, 1, 2, 3, 4]);
            let settings = hubnat::driver::settings(&config, mac);
            let mut host = VirtualHost::new(settings.clone(), Vec::new(), 7, testkit::t(0));
            let discover = testkit::dhcp_frame(MessageType::Discover, None);
            host.handle_frame(testkit::t(0), &discover);
            host.handle_frame(
                testkit::t(0),
                &testkit::arp_request(Ipv4Addr::UNSPECIFIED, settings.host.ip),
            );
            let _ = testkit::sent(&mut host, testkit::t(0));
            host.drain_host_ops(|_| {});
            while host.poll_event().is_some() {}
            let _ = host.poll_timeout();
        }
    }
});
