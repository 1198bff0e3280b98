//! The wasmtime side: the engine, the deadline ticker, loading a policy, calling it.
//!
//! One [`Engine`] serves every policy (and every reload), with epoch interruption on; one
//! ticker thread advances its epoch every [`TICK`] while at least one call runs, and sleeps
//! otherwise. A call sets its store's deadline to `timeout` rounded up to whole ticks, plus
//! one (the first tick may come at once), so a call runs at least `timeout` and at most
//! `timeout` + 2 ticks. Memory is bounded by [`Limiter`], which refuses (and traps) any growth
//! of linear memory past the policy's `memory`, and records that it did so the failure is
//! reported as [`Failure::OutOfMemory`] rather than as the trap it causes.
//!
//! A policy keeps one instance between calls (its globals, such as a parsed configuration,
//! survive). After a failed call the instance is dropped and a new one made from the
//! [`InstancePre`], so a policy never runs on in a state a trap left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, InstancePre, Linker, ResourceType};
use wasmtime::{Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap};

use super::stats::Stats;
use super::{
    DhcpClientInfo, DhcpMessageKind, DhcpOutcome, DhcpReplyInfo, Failure, LogLevel, NoteKind,
    OptionBytes, PolicyError, PolicyNote, MAX_LOG_LINE, MAX_LOG_LINES_PER_CALL, RESERVED_OPTIONS,
};
use crate::config::{OnError, PolicyConfig};
use crate::core::nat::{Decision, FlowInfo, Protocol, Verdict};

mod bindings {
    wasmtime::component::bindgen!({
        path: "policies/wit",
        world: "policy",
    });
}

use bindings::exports::hubnat::policy::{dhcp_customizer as dhcp, session_filter as session};
use bindings::hubnat::policy::{host, types};

/// The resolution of policy deadlines: the ticker's period.
pub const TICK: Duration = Duration::from_millis(1);

/// The interfaces a policy may import; anything under `wasi:` is stubbed with traps.
const HOST_IMPORTS: [&str; 2] = ["hubnat:policy/host@", "hubnat:policy/types@"];
/// The exports hubnat looks for.
const SESSION_EXPORT: &str = "hubnat:policy/session-filter@0.1.0";
const DHCP_EXPORT: &str = "hubnat:policy/dhcp-customizer@0.1.0";

/// The engine every policy runs on.
fn engine() -> Result<&'static Engine, String> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut config = wasmtime::Config::new();
            config.epoch_interruption(true);
            config.wasm_component_model(true);
            Engine::new(&config).map_err(|e| format!("cannot set up wasmtime: {e:#}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The epoch ticker: one thread for every policy, awake only while a call runs.
struct Ticker {
    running: Arc<AtomicUsize>,
    thread: thread::Thread,
}

/// A call in progress; the ticker runs while one exists.
struct Running<'a>(&'a Ticker);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Ticker {
    fn get(engine: &'static Engine) -> Result<&'static Ticker, String> {
        static TICKER: OnceLock<Result<Ticker, String>> = OnceLock::new();
        TICKER
            .get_or_init(|| {
                let running = Arc::new(AtomicUsize::new(0));
                let count = running.clone();
                let handle = thread::Builder::new()
                    .name("hubnat-policy-ticker".into())
                    .spawn(move || loop {
                        if count.load(Ordering::Acquire) == 0 {
                            thread::park();
                            continue;
                        }
                        thread::sleep(TICK);
                        engine.increment_epoch();
                    })
                    .map_err(|e| format!("cannot start the deadline ticker thread: {e}"))?;
                Ok(Ticker {
                    running,
                    thread: handle.thread().clone(),
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    fn begin(&self) -> Running<'_> {
        if self.running.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        Running(self)
    }
}

/// Bounds a store's memory (and tables and instances), remembering a refused growth.
struct Limiter {
    memory: usize,
    refused: bool,
    others: StoreLimits,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> anyhow::Result<bool> {
        if desired > self.memory {
            self.refused = true;
            anyhow::bail!(
                "linear memory of {desired} bytes refused: the policy's memory limit is {} bytes",
                self.memory
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> anyhow::Result<bool> {
        self.others.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.others.instances()
    }

    fn tables(&self) -> usize {
        self.others.tables()
    }

    fn memories(&self) -> usize {
        self.others.memories()
    }
}

/// What a policy's store holds: its configuration, its limiter, and the call's log.
struct HostState {
    config: Arc<BTreeMap<String, String>>,
    limiter: Limiter,
    notes: Vec<NoteKind>,
    logs: usize,
}

impl HostState {
    fn new(config: Arc<BTreeMap<String, String>>, memory: usize) -> Self {
        HostState {
            config,
            limiter: Limiter {
                memory,
                refused: false,
                others: StoreLimitsBuilder::new()
                    .table_elements(100_000)
                    .instances(100)
                    .tables(100)
                    .memories(100)
                    .build(),
            },
            notes: Vec::new(),
            logs: 0,
        }
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: host::Level, mut message: String) {
        self.logs += 1;
        if self.logs > MAX_LOG_LINES_PER_CALL {
            return;
        }
        truncate(&mut message, MAX_LOG_LINE);
        let level = match level {
            host::Level::Debug => LogLevel::Debug,
            host::Level::Info => LogLevel::Info,
            host::Level::Warn => LogLevel::Warn,
            host::Level::Error => LogLevel::Error,
        };
        self.notes.push(NoteKind::Log { level, message });
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }
}

/// A live instance of a policy and its exports.
struct Live {
    store: Store<HostState>,
    session: Option<session::Guest>,
    dhcp: Option<dhcp::Guest>,
}

/// One loaded policy.
pub(super) struct Policy {
    name: String,
    on_error: OnError,
    timeout_ticks: u64,
    memory: usize,
    config: Arc<BTreeMap<String, String>>,
    engine: &'static Engine,
    ticker: &'static Ticker,
    pre: InstancePre<HostState>,
    session: Option<session::GuestIndices>,
    dhcp: Option<dhcp::GuestIndices>,
    /// The instance, or why it could not be made afresh.
    live: Result<Live, String>,
    /// What its calls did.
    stats: Arc<Stats>,
}

impl Policy {
    /// Reads, compiles (or takes from `cache`), checks and instantiates the policy `cfg` names.
    fn load(cfg: &PolicyConfig, cache: Option<&Path>) -> Result<Policy, PolicyError> {
        let fail = |reason: String| PolicyError {
            name: cfg.name.clone(),
            path: cfg.path.clone(),
            reason,
        };
        let engine = engine().map_err(fail)?;
        let ticker = Ticker::get(engine).map_err(fail)?;
        let bytes = std::fs::read(&cfg.path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', _, _, 1, 0]) => {}
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {
                return Err(fail(
                    "is a core WebAssembly module, not a component; build it for \
                     wasm32-wasip2, or wrap it with `wasm-tools component new`"
                        .into(),
                ))
            }
            _ => return Err(fail("is not a WebAssembly component".into())),
        }
        let component = match cache.and_then(|dir| cached(engine, dir, &cfg.name, &bytes)) {
            Some(component) => component,
            None => {
                let component = Component::from_binary(engine, &bytes)
                    .map_err(|e| fail(format!("is not a valid WebAssembly component: {e:#}")))?;
                if let Some(dir) = cache {
                    store(dir, &cfg.name, &bytes, &component);
                }
                component
            }
        };

        let ty = component.component_type();
        let mut linker: Linker<HostState> = Linker::new(engine);
        for (name, _) in ty.imports(engine) {
            if HOST_IMPORTS.iter().any(|p| name.starts_with(p)) || name.starts_with("wasi:") {
                continue;
            }
            return Err(fail(format!(
                "imports {name}, which hubnat does not provide; a policy may import only \
                 hubnat:policy/host (and WASI interfaces, whose functions trap)"
            )));
        }
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        let exports_session = exports.iter().any(|n| n == SESSION_EXPORT);
        let exports_dhcp = exports.iter().any(|n| n == DHCP_EXPORT);
        if !exports_session && !exports_dhcp {
            let found = if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            };
            return Err(fail(format!(
                "exports neither {SESSION_EXPORT} nor {DHCP_EXPORT} (it exports {found})"
            )));
        }

        let wiring = (|| {
            host::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
            types::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
            stub_wasi(&mut linker, engine, &component)
        })();
        wiring.map_err(|e| fail(format!("cannot link its imports: {e:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| fail(format!("its imports do not match hubnat's: {e:#}")))?;
        let session = exports_session
            .then(|| session::GuestIndices::new(&pre))
            .transpose()
            .map_err(|e| fail(format!("its {SESSION_EXPORT} does not match: {e:#}")))?;
        let dhcp = exports_dhcp
            .then(|| dhcp::GuestIndices::new(&pre))
            .transpose()
            .map_err(|e| fail(format!("its {DHCP_EXPORT} does not match: {e:#}")))?;

        let tick = TICK.as_nanos();
        let timeout_ticks = u64::try_from(cfg.timeout.as_nanos().div_ceil(tick) + 1)
            .expect("invariant: validated timeouts are at most seconds");
        let mut policy = Policy {
            name: cfg.name.clone(),
            on_error: cfg.on_error,
            timeout_ticks,
            memory: usize::try_from(cfg.memory).unwrap_or(usize::MAX),
            config: Arc::new(cfg.config.clone()),
            engine,
            ticker,
            pre,
            session,
            dhcp,
            live: Err(String::new()),
            stats: Arc::new(Stats::new(cfg, exports_session, exports_dhcp)),
        };
        policy.live = Ok(policy
            .instantiate()
            .map_err(|e| fail(format!("cannot be instantiated: {e:#}")))?);
        Ok(policy)
    }

    /// A fresh instance (its start-up code bounded by the timeout).
    fn instantiate(&self) -> anyhow::Result<Live> {
        let mut store = Store::new(
            self.engine,
            HostState::new(self.config.clone(), self.memory),
        );
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(self.timeout_ticks);
        let _running = self.ticker.begin();
        let instance = self.pre.instantiate(&mut store)?;
        let session = self
            .session
            .as_ref()
            .map(|i| i.load(&mut store, &instance))
            .transpose()?;
        let dhcp = self
            .dhcp
            .as_ref()
            .map(|i| i.load(&mut store, &instance))
            .transpose()?;
        store.data_mut().notes.clear();
        Ok(Live {
            store,
            session,
            dhcp,
        })
    }

    /// Runs `f` on the live instance with a fresh deadline; the notes are the call's log
    /// lines and, on failure, what failed (the instance is then made afresh).
    fn call<R>(
        &mut self,
        notes: &mut Vec<PolicyNote>,
        f: impl FnOnce(&mut Live) -> anyhow::Result<R>,
    ) -> Result<R, Failure> {
        if let Err(why) = &self.live {
            // An earlier failure left no instance; try again.
            let why = why.clone();
            match self.instantiate() {
                Ok(live) => self.live = Ok(live),
                Err(e) => {
                    let failure = Failure::Broken(format!("{why}; again: {e:#}"));
                    self.note_failure(notes, &failure);
                    return Err(failure);
                }
            }
        }
        let live = self
            .live
            .as_mut()
            .expect("invariant: instantiated just above");
        live.store.set_epoch_deadline(self.timeout_ticks);
        let result = {
            let _running = self.ticker.begin();
            f(live)
        };
        let state = live.store.data_mut();
        let dropped = state.logs.saturating_sub(MAX_LOG_LINES_PER_CALL);
        let refused = std::mem::take(&mut state.limiter.refused);
        notes.extend(state.notes.drain(..).map(|kind| PolicyNote {
            policy: self.name.clone(),
            kind,
        }));
        state.logs = 0;
        if dropped > 0 {
            notes.push(self.note(NoteKind::LogLinesDropped(dropped)));
        }
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                let failure = if refused {
                    Failure::OutOfMemory
                } else if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                    Failure::Timeout
                } else {
                    let mut text = format!("{e:#}");
                    truncate(&mut text, MAX_LOG_LINE);
                    Failure::Trap(text)
                };
                self.note_failure(notes, &failure);
                self.live = self.instantiate().map_err(|e| format!("{e:#}"));
                Err(failure)
            }
        }
    }

    fn note(&self, kind: NoteKind) -> PolicyNote {
        PolicyNote {
            policy: self.name.clone(),
            kind,
        }
    }

    fn note_failure(&self, notes: &mut Vec<PolicyNote>, failure: &Failure) {
        self.stats.failure(failure);
        notes.push(self.note(NoteKind::Failed {
            failure: failure.clone(),
            on_error: self.on_error,
        }));
    }

    /// This policy's verdict on `s`: `None` if it has no session filter.
    fn check(&mut self, s: &session::Session, notes: &mut Vec<PolicyNote>) -> Option<Verdict> {
        self.session.as_ref()?;
        let on_error = self.on_error;
        let result = self.call(notes, |live| {
            let guest = live
                .session
                .as_ref()
                .expect("invariant: a live instance has the exports its indices name");
            guest.call_check(&mut live.store, s)
        });
        let verdict = match result {
            Ok(v) => from_wit_verdict(v),
            Err(_) => match on_error {
                OnError::Allow => Verdict::Allow,
                OnError::Deny => Verdict::Reject,
            },
        };
        self.stats.session_call(&verdict);
        Some(verdict)
    }

    /// This policy's answer for `reply`: `None` if it has no DHCP customizer.
    fn customize(
        &mut self,
        client: &dhcp::Client,
        reply: &dhcp::Reply,
        notes: &mut Vec<PolicyNote>,
    ) -> Option<Result<dhcp::Decision, Failure>> {
        self.dhcp.as_ref()?;
        Some(self.call(notes, |live| {
            let guest = live
                .dhcp
                .as_ref()
                .expect("invariant: a live instance has the exports its indices name");
            guest.call_customize(&mut live.store, client, reply)
        }))
    }
}

/// The policies in force, in the configured order.
#[derive(Default)]
pub struct PolicySet {
    policies: Vec<Policy>,
    /// Where compiled modules are kept ([`PolicySet::load_cached`]).
    cache: Option<PathBuf>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("policies", &self.names())
            .finish()
    }
}

impl PolicySet {
    /// No policies: every session is allowed, every reply unchanged.
    pub fn empty() -> PolicySet {
        PolicySet::default()
    }

    /// Loads every policy of `configs`, in order (compiling each: this takes time, so call it
    /// at start-up or off the frame path). Fails on the first that cannot be loaded, naming it,
    /// its file and what is wrong: the file is missing, is not a component, exports neither
    /// interface, imports something hubnat does not provide, or does not match the contract.
    pub fn load(configs: &[PolicyConfig]) -> Result<PolicySet, PolicyError> {
        Self::load_cached(configs, None)
    }

    /// [`load`](Self::load), keeping each module's machine code in `cache` (a directory only
    /// this process writes, such as one in the state directory) and taking it from there
    /// when the module is the same file byte for byte: a start or a reload then takes
    /// milliseconds instead of a compilation per module. Reloads through the set's thread use
    /// the same cache.
    pub fn load_cached(
        configs: &[PolicyConfig],
        cache: Option<PathBuf>,
    ) -> Result<PolicySet, PolicyError> {
        let policies = configs
            .iter()
            .map(|c| Policy::load(c, cache.as_deref()))
            .collect::<Result<_, _>>()?;
        Ok(PolicySet { policies, cache })
    }

    /// The directory of compiled modules, if the set has one.
    pub fn cache(&self) -> Option<&Path> {
        self.cache.as_deref()
    }

    /// The names of the policies in force, in order.
    pub fn names(&self) -> Vec<&str> {
        self.policies.iter().map(|p| p.name.as_str()).collect()
    }

    /// Whether there are no policies.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Each policy's counters, in order.
    pub(super) fn stats(&self) -> Vec<Arc<Stats>> {
        self.policies.iter().map(|p| p.stats.clone()).collect()
    }

    /// Whether any policy exports `session-filter`.
    pub fn has_session_filter(&self) -> bool {
        self.policies.iter().any(|p| p.session.is_some())
    }

    /// Whether any policy exports `dhcp-customizer`.
    pub fn has_dhcp_customizer(&self) -> bool {
        self.policies.iter().any(|p| p.dhcp.is_some())
    }

    /// Runs the session filters on `flow`, in order: the first verdict other than allow wins,
    /// with `by` set to its policy's name; a failed call counts as its `on_error` (allow, or
    /// reject). Allow by nobody when every filter allows (or there are none). The notes are
    /// for the caller to log ([`PolicyNote::emit`]).
    pub fn check_session(&mut self, flow: &FlowInfo) -> (Decision, Vec<PolicyNote>) {
        let mut notes = Vec::new();
        if !self.has_session_filter() {
            return (Decision::allow(), notes);
        }
        let s = to_wit_session(flow);
        for p in &mut self.policies {
            match p.check(&s, &mut notes) {
                None | Some(Verdict::Allow) => {}
                Some(verdict) => {
                    let by = Some(p.name.clone());
                    return (Decision { verdict, by }, notes);
                }
            }
        }
        (Decision::allow(), notes)
    }

    /// Runs the DHCP customizers on `reply`, in order: each sees the reply as the ones before
    /// changed it; within one answer, `remove-options` applies before `set-options`. The first
    /// "no reply" ends the chain. A failed call counts as its `on_error` (unchanged, or no
    /// reply). Changes to options hubnat owns ([`RESERVED_OPTIONS`]), values longer than 255
    /// bytes, and a lease time for an INFORM are ignored with a note.
    ///
    /// [`RESERVED_OPTIONS`]: super::RESERVED_OPTIONS
    pub fn customize_dhcp(
        &mut self,
        client: DhcpClientInfo,
        mut reply: DhcpReplyInfo,
    ) -> (DhcpOutcome, Vec<PolicyNote>) {
        let mut notes = Vec::new();
        if !self.has_dhcp_customizer() {
            return (DhcpOutcome::Reply(reply), notes);
        }
        let c = to_wit_client(&client);
        for p in &mut self.policies {
            let r = to_wit_reply(&reply);
            let decision = match p.customize(&c, &r, &mut notes) {
                None => continue,
                Some(Ok(decision)) => decision,
                Some(Err(_)) => match p.on_error {
                    OnError::Allow => continue,
                    OnError::Deny => dhcp::Decision::NoReply,
                },
            };
            p.stats.dhcp_call(
                matches!(decision, dhcp::Decision::Change(_)),
                matches!(decision, dhcp::Decision::NoReply),
            );
            match decision {
                dhcp::Decision::Unchanged => {}
                dhcp::Decision::NoReply => {
                    let by = p.name.clone();
                    return (DhcpOutcome::NoReply { by }, notes);
                }
                dhcp::Decision::Change(changes) => {
                    notes.push(p.note(NoteKind::ChangedReply));
                    for why in apply_changes(&mut reply, changes) {
                        notes.push(p.note(NoteKind::Ignored(why)));
                    }
                }
            }
        }
        (DhcpOutcome::Reply(reply), notes)
    }

    /// Swaps in a reload: the policies of `reload` in its order; one that failed to load is
    /// replaced by the policy of the same name in force before, if there was one.
    pub fn apply_reload(&mut self, reload: PolicyReload) -> ReloadReport {
        let mut old = std::mem::take(&mut self.policies);
        let mut report = ReloadReport::default();
        for entry in reload.entries {
            match entry {
                Ok(p) => {
                    report.in_force.push(p.name.clone());
                    self.policies.push(p);
                }
                Err(e) => {
                    if let Some(i) = old.iter().position(|p| p.name == e.name) {
                        let p = old.swap_remove(i);
                        report.in_force.push(p.name.clone());
                        report.kept_previous.push(p.name.clone());
                        self.policies.push(p);
                    }
                    report.errors.push(e);
                }
            }
        }
        report
    }
}

/// Policies loaded for a reload, each loaded or not; see [`PolicySet::apply_reload`].
pub struct PolicyReload {
    entries: Vec<Result<Policy, PolicyError>>,
}

impl std::fmt::Debug for PolicyReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: Vec<String> = self
            .entries
            .iter()
            .map(|e| match e {
                Ok(p) => p.name.clone(),
                Err(e) => e.to_string(),
            })
            .collect();
        f.debug_struct("PolicyReload")
            .field("entries", &entries)
            .finish()
    }
}

impl PolicyReload {
    /// Loads every policy of `configs` (compiling each; call it off the frame path), keeping
    /// the errors of those that fail.
    pub fn load(configs: &[PolicyConfig], cache: Option<&Path>) -> PolicyReload {
        PolicyReload {
            entries: configs.iter().map(|c| Policy::load(c, cache)).collect(),
        }
    }
}

/// What a reload did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadReport {
    /// The policies in force afterwards, in order.
    pub in_force: Vec<String>,
    /// Those of them that failed to load and stay as they were.
    pub kept_previous: Vec<String>,
    /// Why each failing policy failed.
    pub errors: Vec<PolicyError>,
}

/// The compiled module of policy `name` from `dir`, if the module kept beside it is `bytes`
/// byte for byte and wasmtime accepts the machine code (same version and settings).
fn cached(engine: &Engine, dir: &Path, name: &str, bytes: &[u8]) -> Option<Component> {
    let source = std::fs::read(dir.join(format!("{name}.wasm"))).ok()?;
    if source != bytes {
        return None;
    }
    let compiled = dir.join(format!("{name}.cwasm"));
    // SAFETY: `deserialize_file` runs machine code from the file as it is, so the file must
    // be wasmtime's own output: the cache directory is in the state directory (mode 0700,
    // this process's user's) and only `store` below writes `.cwasm` files into it, from
    // `Component::serialize`. wasmtime checks its version and settings in the header and
    // refuses a file made by another.
    match unsafe { Component::deserialize_file(engine, &compiled) } {
        Ok(component) => {
            tracing::debug!(policy = name, path = %compiled.display(), "policy module taken from the cache");
            Some(component)
        }
        Err(e) => {
            tracing::debug!(policy = name, error = %e, "policy cache entry not usable; compiling");
            None
        }
    }
}

/// Keeps `component`'s machine code and the module it came from in `dir` (each written to a
/// temporary file and renamed, so a reader sees a whole file or none). A failure only costs
/// the next start a compilation.
fn store(dir: &Path, name: &str, bytes: &[u8], component: &Component) {
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let code = component.serialize().map_err(std::io::Error::other)?;
        // The module copy goes first and comes back last: while the code is replaced, no
        // module beside it can match, so stale code is never taken for a new module.
        let _ = std::fs::remove_file(dir.join(format!("{name}.wasm")));
        for (ext, data) in [("cwasm", code.as_slice()), ("wasm", bytes)] {
            let path = dir.join(format!("{name}.{ext}"));
            let tmp = dir.join(format!("{name}.{ext}.tmp"));
            std::fs::write(&tmp, data)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        tracing::debug!(policy = name, error = %e, dir = %dir.display(), "cannot keep the compiled policy");
    }
}

/// Links every function of every `wasi:` interface `component` imports to one that traps,
/// and every resource type to a host type nothing ever makes: a policy gets no WASI.
fn stub_wasi(
    linker: &mut Linker<HostState>,
    engine: &Engine,
    component: &Component,
) -> anyhow::Result<()> {
    for (name, item) in component.component_type().imports(engine) {
        let ComponentItem::ComponentInstance(instance) = item else {
            continue;
        };
        if !name.starts_with("wasi:") {
            continue;
        }
        let mut stub = linker.instance(name)?;
        for (item_name, item) in instance.exports(engine) {
            match item {
                ComponentItem::ComponentFunc(_) => {
                    let what = format!("{name}#{item_name}");
                    stub.func_new(item_name, move |_, _, _| {
                        anyhow::bail!("{what} called: a policy gets no WASI")
                    })?;
                }
                ComponentItem::Resource(_) => {
                    stub.resource(item_name, ResourceType::host::<()>(), |_, _| Ok(()))?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Applies a policy's changes to `reply`; returns what was ignored, and why.
fn apply_changes(reply: &mut DhcpReplyInfo, changes: dhcp::Changes) -> Vec<String> {
    let mut ignored = Vec::new();
    for code in changes.remove_options {
        if RESERVED_OPTIONS.contains(&code) {
            ignored.push(format!("remove-options: option {code} is hubnat's"));
            continue;
        }
        reply.options.retain(|o| o.code != code);
    }
    for o in changes.set_options {
        if RESERVED_OPTIONS.contains(&o.code) {
            ignored.push(format!("set-options: option {} is hubnat's", o.code));
        } else if o.value.len() > 255 {
            ignored.push(format!(
                "set-options: option {} has {} bytes, more than 255",
                o.code,
                o.value.len()
            ));
        } else if let Some(slot) = reply.options.iter_mut().find(|x| x.code == o.code) {
            slot.value = o.value;
        } else {
            reply.options.push(OptionBytes {
                code: o.code,
                value: o.value,
            });
        }
    }
    if let Some(secs) = changes.lease_seconds {
        if reply.lease_seconds.is_some() {
            reply.lease_seconds = Some(secs);
        } else {
            ignored.push("lease-seconds: this reply has no lease (INFORM)".into());
        }
    }
    ignored
}

/// Cuts `text` to at most `max` bytes, at a character boundary.
fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

fn v4(ip: std::net::Ipv4Addr) -> types::IpAddress {
    let [a, b, c, d] = ip.octets();
    types::IpAddress::Ipv4((a, b, c, d))
}

fn mac(m: [u8; 6]) -> types::MacAddress {
    (m[0], m[1], m[2], m[3], m[4], m[5])
}

fn to_wit_session(flow: &FlowInfo) -> session::Session {
    let socket = |a: std::net::SocketAddrV4| types::SocketAddress {
        address: v4(*a.ip()),
        port: a.port(),
    };
    session::Session {
        protocol: match flow.protocol {
            Protocol::Tcp => types::Protocol::Tcp,
            Protocol::Udp => types::Protocol::Udp,
            Protocol::Icmp => types::Protocol::Icmp,
        },
        client_mac: mac(flow.client_mac),
        client: socket(flow.client),
        remote: socket(flow.remote),
        client_hostname: flow.client_hostname.clone(),
        remote_name: flow.remote_name.clone(),
    }
}

fn from_wit_verdict(v: session::Verdict) -> Verdict {
    match v {
        session::Verdict::Allow => Verdict::Allow,
        session::Verdict::Reject => Verdict::Reject,
        session::Verdict::Drop => Verdict::Drop,
        session::Verdict::Redirect(to) => {
            let ip: std::net::IpAddr = match to.address {
                types::IpAddress::Ipv4((a, b, c, d)) => std::net::Ipv4Addr::new(a, b, c, d).into(),
                types::IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => {
                    std::net::Ipv6Addr::new(a, b, c, d, e, f, g, h).into()
                }
            };
            Verdict::Redirect(std::net::SocketAddr::new(ip, to.port))
        }
    }
}

fn to_wit_client(c: &DhcpClientInfo) -> dhcp::Client {
    dhcp::Client {
        message_type: match c.message_type {
            DhcpMessageKind::Discover => dhcp::MessageType::Discover,
            DhcpMessageKind::Request => dhcp::MessageType::Request,
            DhcpMessageKind::Inform => dhcp::MessageType::Inform,
        },
        mac: mac(c.mac),
        client_id: c.client_id.clone(),
        hostname: c.hostname.clone(),
        vendor_class: c.vendor_class.clone(),
        requested_options: c.requested_options.clone(),
    }
}

fn to_wit_reply(r: &DhcpReplyInfo) -> dhcp::Reply {
    dhcp::Reply {
        your_address: v4(r.your_address),
        lease_seconds: r.lease_seconds,
        options: r
            .options
            .iter()
            .map(|o| dhcp::DhcpOption {
                code: o.code,
                value: o.value.clone(),
            })
            .collect(),
    }
}

#[allow(dead_code)]
fn _assert_send() {
    fn send<T: Send>() {}
    send::<PolicySet>();
    send::<PolicyReload>();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(code: u8, value: &[u8]) -> dhcp::DhcpOption {
        dhcp::DhcpOption {
            code,
            value: value.to_vec(),
        }
    }

    #[test]
    fn changes_leave_hubnats_options_alone_and_apply_removals_first() {
        let mut reply = DhcpReplyInfo {
            your_address: std::net::Ipv4Addr::UNSPECIFIED,
            lease_seconds: None,
            options: vec![
                OptionBytes {
                    code: 3,
                    value: vec![192, 168, 30, 1],
                },
                OptionBytes {
                    code: 15,
                    value: b"old".to_vec(),
                },
            ],
        };
        let ignored = apply_changes(
            &mut reply,
            dhcp::Changes {
                set_options: vec![
                    opt(53, &[5]),
                    opt(54, &[1, 2, 3, 4]),
                    opt(200, &[0; 256]),
                    opt(15, b"new"),
                    opt(3, &[10, 0, 0, 1]),
                ],
                remove_options: vec![3, 255],
                lease_seconds: Some(60),
            },
        );
        assert_eq!(
            ignored,
            [
                "remove-options: option 255 is hubnat's",
                "set-options: option 53 is hubnat's",
                "set-options: option 54 is hubnat's",
                "set-options: option 200 has 256 bytes, more than 255",
                "lease-seconds: this reply has no lease (INFORM)",
            ]
        );
        let codes: Vec<(u8, &[u8])> = reply
            .options
            .iter()
            .map(|o| (o.code, o.value.as_slice()))
            .collect();
        // 3 removed, then set again (at the end); 15 replaced in place.
        assert_eq!(codes, [(15, &b"new"[..]), (3, &[10, 0, 0, 1][..])]);
        assert_eq!(reply.lease_seconds, None);
    }
}
