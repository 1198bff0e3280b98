//! The `hubnat` command: parse the command line, load the configuration, run the gateway.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hubnat::config::{BackendKind, Config, HostDefaults, Loaded, LogFormat, Override, Sources};
use hubnat::control::{ControlOptions, ControlServer, PolicySource};
use hubnat::driver::{Gateway, GatewayHandle};

mod cli;
use tracing_subscriber::EnvFilter;

/// hubnat — a user-mode virtual NAT and virtual DHCP server for a virtual Ethernet segment.
///
/// hubnat appears on the segment as one ordinary host: it hands out addresses with DHCP,
/// answers ARP and ping for itself, forwards DNS, and carries the clients' TCP, UDP and ping to
/// the outside world through this process's own sockets (a user-mode NAT). Settings come from,
/// in rising order of precedence: built-in defaults, the file given with --config, HUBNAT_*
/// environment variables (HUBNAT_DHCP__LEASE=1h sets dhcp.lease), the changes made at run time
/// through the control API (kept in the state directory), and the flags of the command.
///
/// The operator commands (status, enable, disable, host, nat, dhcp, dns, policy) talk to a
/// running gateway through its control socket (control.sock in its state directory).
#[derive(Parser, Debug)]
#[command(name = "hubnat", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway on the configured backend until SIGINT or SIGTERM.
    ///
    /// The TAP backend (the default) needs CAP_NET_ADMIN to open the device. Leases are saved
    /// in the state directory on every change and reloaded at start. SIGHUP reloads the
    /// [[policy]] modules from the configuration (as `hubnat policy reload` does).
    Run(RunArgs),
    /// Print the effective configuration (after every layer and validation) as TOML.
    Config(ConfigArgs),
    /// Print the lease table saved in the state directory.
    Leases(ConfigArgs),
    /// Show a running gateway's status: functions on or off, sessions, leases, counters, and
    /// each value set by the configuration file, the environment, flags or at run time.
    Status(JsonArgs),
    /// Turn the whole function (NAT and DHCP) on in a running gateway.
    Enable(ClientArgs),
    /// Turn the whole function (NAT and DHCP) off in a running gateway.
    Disable(ClientArgs),
    /// The virtual host's settings (ip, mask, mac) in a running gateway.
    #[command(subcommand)]
    Host(SectionCommand),
    /// The virtual NAT in a running gateway: settings, on/off, the session table.
    #[command(subcommand)]
    Nat(NatCommand),
    /// The DHCP server in a running gateway: settings, on/off, the lease table.
    #[command(subcommand)]
    Dhcp(DhcpCommand),
    /// The DNS redirect's settings (upstream servers) in a running gateway.
    #[command(subcommand)]
    Dns(SectionCommand),
    /// The WASM policies of a running gateway: the list in force, reload.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

/// How a command finds the running gateway's control socket.
#[derive(Args, Debug, Clone)]
struct ClientArgs {
    /// The control socket; default: control.socket of the configuration, else control.sock in
    /// the state directory.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The configuration file the gateway runs with (to find its state directory).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The gateway's state directory.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct JsonArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
struct SetArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// KEY=VALUE with KEY within the section, e.g. range_end=192.168.30.100 lease=10m.
    #[arg(value_name = "KEY=VALUE", required = true)]
    changes: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum SectionCommand {
    /// Print the settings, with where each non-default value came from.
    Get(JsonArgs),
    /// Change settings at once (all or none); they are kept in the state directory.
    Set(SetArgs),
}

#[derive(Subcommand, Debug)]
enum NatCommand {
    /// Print the NAT settings.
    Get(JsonArgs),
    /// Change NAT settings, e.g. tcp_timeout=1h udp_timeout=5m.
    Set(SetArgs),
    /// Turn the NAT on.
    Enable(ClientArgs),
    /// Turn the NAT off (DHCP goes on).
    Disable(ClientArgs),
    /// Print the NAT session table.
    Table(TableArgs),
    /// End one session (TCP: a reset both ways).
    Kill {
        #[command(flatten)]
        client: ClientArgs,
        /// The session's id (the ID column of `hubnat nat table`).
        id: u64,
    },
}

#[derive(Args, Debug, Clone)]
struct TableArgs {
    #[command(flatten)]
    json: JsonArgs,
    /// Only the sessions of this client address.
    #[arg(long, value_name = "IP")]
    client: Option<std::net::Ipv4Addr>,
    /// Only the sessions of this protocol.
    #[arg(long, value_parser = ["tcp", "udp", "icmp"])]
    protocol: Option<String>,
}

#[derive(Subcommand, Debug)]
enum DhcpCommand {
    /// Print the DHCP settings (static reservations included).
    Get(JsonArgs),
    /// Change DHCP settings, e.g. range_end=192.168.30.100 lease=10m.
    Set(SetArgs),
    /// Turn the DHCP server on.
    Enable(ClientArgs),
    /// Turn the DHCP server off (the NAT goes on).
    Disable(ClientArgs),
    /// Print the lease table.
    Table(JsonArgs),
    /// Release one lease, by the client's MAC address or by the address.
    Release {
        #[command(flatten)]
        client: ClientArgs,
        /// A MAC address (52:54:00:12:34:56) or an IPv4 address.
        #[arg(value_name = "MAC|IP")]
        target: String,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// List the policies in force, in order, with their calls, verdicts and errors.
    List(JsonArgs),
    /// Reload every policy from the gateway's configuration (as SIGHUP does).
    ///
    /// The gateway re-reads its [[policy]] tables from the configuration file, environment
    /// and flags it was started with, and swaps the new modules in: open sessions are kept,
    /// new flows and DHCP replies meet the new policies. A module that fails to load keeps the
    /// previous one of its name in force; the exit status is then 1.
    Reload(ClientArgs),
}

#[derive(Args, Debug, Clone)]
struct ConfigArgs {
    /// Configuration file (TOML); see config/hubnat.toml for every key.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Set any configuration key, e.g. --set dhcp.lease=30m --set 'dhcp.dns=["1.1.1.1"]'.
    /// May be repeated; wins over the file and the environment.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
    /// State directory (leases, generated MAC); same as --set state.dir=DIR.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    common: ConfigArgs,
    /// Frame backend; same as --set backend.kind=KIND.
    #[arg(long, value_enum, value_name = "KIND")]
    backend: Option<BackendArg>,
    /// TAP device name; same as --set backend.tap.name=NAME.
    #[arg(long, value_name = "NAME")]
    tap_name: Option<String>,
    /// Interface the raw backend attaches to; same as --set backend.raw.interface=NAME.
    #[arg(long, value_name = "NAME")]
    raw_interface: Option<String>,
    /// Where the hub socket accepts peers, "unix:/path" or "tcp:IP:PORT"; may be repeated;
    /// same as --set 'backend.hub.listen=["unix:/path"]'.
    #[arg(long, value_name = "ADDRESS")]
    hub_listen: Vec<String>,
    /// A listening hub the hub socket connects to; same as --set backend.hub.connect=ADDRESS.
    #[arg(long, value_name = "ADDRESS")]
    hub_connect: Option<String>,
    /// Write every frame the backend passes to this pcap file; same as
    /// --set capture.path=FILE.
    #[arg(long, value_name = "FILE")]
    capture: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter such as
    /// "hubnat=debug"); same as --set log.level=LEVEL. RUST_LOG, when set, wins.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log output format; same as --set log.format=FORMAT.
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<FormatArg>,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum BackendArg {
    /// A TAP device (needs CAP_NET_ADMIN).
    Tap,
    /// An existing interface, through an AF_PACKET socket (needs CAP_NET_RAW).
    Raw,
    /// A hub socket: VMs (QEMU -netdev stream) and other peers connect to it.
    Hub,
    /// The in-memory hub (for embedding; refused by `hubnat run`).
    Memory,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum FormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn sources(args: &ConfigArgs, extra: Vec<Override>) -> Sources {
    let mut overrides = Vec::new();
    if let Some(dir) = &args.state_dir {
        overrides.push(Override {
            key: "state.dir".into(),
            value: format!("{:?}", dir.display().to_string()),
        });
    }
    overrides.extend(extra);
    // Explicit --set flags come last: they win over the dedicated flags.
    overrides.extend(args.set.iter().cloned());
    Sources {
        host: Some(HostDefaults::read()),
        file: args.config.clone(),
        env: true,
        persisted: true,
        overrides,
    }
}

fn quoted(key: &str, value: &str) -> Override {
    Override {
        key: key.into(),
        value: format!("{value:?}"),
    }
}

fn init_logging(config: &Config) -> Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v)
            .with_context(|| format!("RUST_LOG={v:?} is not a valid log filter"))?,
        _ => config.log.filter().with_context(|| {
            format!(
                "log.level = {:?} is not a valid log filter",
                config.log.level
            )
        })?,
    };
    let no_color = std::env::var_os("NO_COLOR");
    let ansi = config
        .log
        .ansi(std::io::stderr().is_terminal(), no_color.as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

fn run(args: RunArgs) -> Result<()> {
    hubnat::host::fix_mmap_threshold();
    let mut extra = Vec::new();
    if let Some(b) = args.backend {
        extra.push(quoted(
            "backend.kind",
            match b {
                BackendArg::Tap => "tap",
                BackendArg::Raw => "raw",
                BackendArg::Hub => "hub",
                BackendArg::Memory => "memory",
            },
        ));
    }
    if let Some(name) = &args.tap_name {
        extra.push(quoted("backend.tap.name", name));
    }
    if let Some(name) = &args.raw_interface {
        extra.push(quoted("backend.raw.interface", name));
    }
    if !args.hub_listen.is_empty() {
        extra.push(Override {
            key: "backend.hub.listen".into(),
            value: format!("{:?}", args.hub_listen),
        });
    }
    if let Some(address) = &args.hub_connect {
        extra.push(quoted("backend.hub.connect", address));
    }
    if let Some(path) = &args.capture {
        extra.push(quoted("capture.path", &path.display().to_string()));
    }
    if let Some(level) = &args.log_level {
        extra.push(quoted("log.level", level));
    }
    if let Some(f) = args.log_format {
        extra.push(quoted(
            "log.format",
            match f {
                FormatArg::Text => "text",
                FormatArg::Json => "json",
            },
        ));
    }
    let sources = sources(&args.common, extra);
    let Loaded { config, warnings } = Config::load(&sources)?;
    init_logging(&config)?;
    for warning in &warnings {
        tracing::warn!("{warning}");
    }

    let overridden = Config::overridden(&config, &sources);
    let gateway = Gateway::new(config.clone())?;
    // A reload re-reads the configuration from the sources it came from at start.
    let policy_source = {
        let sources = sources.clone();
        PolicySource::new(move || Config::load(&sources).map(|loaded| loaded.config.policy))
    };
    let mut options = ControlOptions::new(&config, overridden);
    options.policy_source = Some(policy_source.clone());
    let control = ControlServer::start(gateway.handle(), options)?;
    hubnat_backend::rt::block_on(async {
        use async_signal::Signal;
        let signals = async_signal::Signals::new([Signal::Term, Signal::Int, Signal::Hup])
            .context("cannot install the SIGTERM/SIGINT/SIGHUP handlers")?;
        let handle = gateway.handle();
        let shutdown = async move {
            use futures_lite::StreamExt;
            let mut signals = signals;
            while let Some(signal) = signals.next().await {
                match signal {
                    Ok(Signal::Hup) => reload_policies(&handle, &policy_source),
                    Ok(sig) => {
                        tracing::info!(signal = ?sig, "stopping");
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read signals; stopping");
                        break;
                    }
                }
            }
        };
        match config.backend.kind {
            BackendKind::Tap => {
                let mtu = config.tap_mtu();
                let name = &config.backend.tap.name;
                let tap = hubnat_tap::TapBackend::open_with(name, mtu, config.backend.tap.offload)
                    .with_context(|| format!("backend.tap.name = {name:?}: cannot open the TAP device"))?;
                run_backend(gateway, tap, shutdown, &config).await?;
            }
            BackendKind::Raw => {
                let name = &config.backend.raw.interface;
                let mut options = hubnat_raw::RawOptions::new(config.nat.mtu);
                options.own_mac = Some(gateway.mac().0);
                options.offload = config.backend.raw.offload;
                let raw = hubnat_raw::RawBackend::open(name, options)
                    .with_context(|| format!("backend.raw.interface = {name:?}: cannot attach to the interface"))?;
                run_backend(gateway, raw, shutdown, &config).await?;
            }
            BackendKind::Hub => {
                let mut hub_config = config.hub_socket_config();
                hub_config.own_mac = Some(gateway.mac().0);
                let hub = hubnat_hub::HubSocket::start(hub_config)
                    .context("backend.hub: cannot start the hub socket")?;
                run_backend(gateway, hub, shutdown, &config).await?;
            }
            BackendKind::Memory => bail!(
                "backend.kind = \"memory\" is for programs that embed hubnat (see examples/ and README.md); \
                 `hubnat run` needs a backend that reaches other processes, such as \"tap\""
            ),
        }
        Ok::<(), anyhow::Error>(())
    })?;
    control.stop();
    Ok(())
}

/// SIGHUP: re-reads the `[[policy]]` list and reloads the policies, on a thread of its own (the
/// gateway logs the report; a configuration that no longer loads changes nothing).
fn reload_policies(handle: &GatewayHandle, source: &PolicySource) {
    tracing::info!("SIGHUP: reloading the policies");
    let (handle, source) = (handle.clone(), source.clone());
    let spawned = std::thread::Builder::new()
        .name("hubnat-sighup".into())
        .spawn(move || match source.read() {
            Ok(configs) => {
                if let Err(e) = async_io::block_on(handle.reload_policies(configs, "SIGHUP")) {
                    tracing::error!(error = %e, "SIGHUP: the policies were not reloaded");
                }
            }
            Err(e) => tracing::error!(
                "SIGHUP: the configuration does not load, so the policies in force stay: {e}"
            ),
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "SIGHUP: cannot start the reload");
    }
}

/// Runs the gateway on `backend`, recording its frames to a pcap file when `capture.path` is set.
async fn run_backend<B: hubnat_backend::Backend>(
    gateway: Gateway,
    backend: B,
    shutdown: impl std::future::Future<Output = ()>,
    config: &Config,
) -> Result<()> {
    use hubnat_backend::capture::{Capture, PcapWriter};
    // Everything that needs root is open: give it up before anything else runs. Nothing
    // hubnat starts may gain privileges either way.
    hubnat::privilege::no_new_privs().context("cannot set no_new_privs")?;
    if let Some(account) = hubnat::privilege::resolve(&config.process)? {
        let log = config.security_log_path();
        hubnat::privilege::become_user(&account, &config.state.dir, &[log])?;
        tracing::info!(
            user = %account.user,
            uid = account.uid,
            gid = account.gid,
            "gave up root: running as this user from now on"
        );
    }
    let capture = match config.capture_options() {
        Some(options) => {
            let path = options.path.clone();
            let writer = PcapWriter::create(options).with_context(|| {
                format!(
                    "capture.path = {:?}: cannot start the capture",
                    path.display().to_string()
                )
            })?;
            tracing::info!(path = %path.display(), "capturing every frame of the segment");
            Some(writer)
        }
        None => None,
    };
    // Start-up is done: from here on every thread makes only the listed system calls.
    let installed = hubnat::seccomp::install(config.process.seccomp)?;
    match installed {
        hubnat::seccomp::Installed::Unsupported { .. } => tracing::warn!("{installed}"),
        _ => tracing::info!("{installed}"),
    }
    match capture {
        Some(writer) => {
            let backend = Capture::new(backend, writer)
                .on_error(|e| tracing::error!(error = %e, "the capture stopped; the gateway carries on without it"));
            gateway.run(backend, shutdown).await?;
        }
        None => gateway.run(backend, shutdown).await?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        // The printing commands end quietly when their reader goes away (`| head`).
        // SAFETY: restoring a signal's default disposition has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Config(args) => load_for_command(&args)
            .and_then(|c| toml::to_string_pretty(&c).context("cannot print the configuration"))
            .map(|text| print!("{text}")),
        Command::Leases(args) => load_for_command(&args).and_then(|c| print_leases(&c)),
        Command::Status(args) => cli::status(&args),
        Command::Enable(args) => cli::switch(&args, "/v1/enable"),
        Command::Disable(args) => cli::switch(&args, "/v1/disable"),
        Command::Host(c) => cli::section("host", c),
        Command::Nat(c) => cli::nat(c),
        Command::Dhcp(c) => cli::dhcp(c),
        Command::Dns(c) => cli::section("dns", c),
        Command::Policy(c) => cli::policy(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hubnat: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the configuration for a command that sets up no logging: warnings go to standard
/// error as plain lines.
fn load_for_command(args: &ConfigArgs) -> Result<Config> {
    let Loaded { config, warnings } = Config::load(&sources(args, Vec::new()))?;
    for warning in &warnings {
        eprintln!("hubnat: warning: {warning}");
    }
    Ok(config)
}

fn print_leases(config: &Config) -> Result<()> {
    let leases = hubnat::state::load_leases(&config.state.dir)?;
    println!(
        "{:<5} {:<17} {:<15} {:<9} {:<20} {:<20} HOSTNAME",
        "ID", "MAC", "IP", "STATE", "START", "EXPIRES"
    );
    for l in leases {
        let t = |s: u64| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
            )
            .to_string()
        };
        println!(
            "{:<5} {:<17} {:<15} {:<9} {:<20} {:<20} {}",
            l.id.0,
            hubnat::core::dhcp::server::fmt_mac(&l.mac),
            l.ip,
            format!("{:?}", l.state).to_lowercase(),
            t(l.start),
            t(l.expires),
            l.hostname.unwrap_or_default()
        );
    }
    Ok(())
}
