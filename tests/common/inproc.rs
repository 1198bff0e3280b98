//! The real gateway (driver, core, state directory) on a thread of the test process, with a
//! port of an in-memory hub as its backend.

use std::thread::JoinHandle;

use hubnat::config::Config;
use hubnat::driver::{Gateway, GatewayError, GatewayHandle, WallClock};
use hubnat_hub::MemoryHub;

/// A gateway running on its own thread until [`Running::stop`].
pub struct Running {
    /// Commands into the running gateway (status, tables, settings).
    pub handle: GatewayHandle,
    stop: async_channel::Sender<()>,
    thread: JoinHandle<Result<(), GatewayError>>,
}

/// Starts `config`'s gateway on a new port of `hub`.
pub fn start(config: Config, hub: &MemoryHub) -> Running {
    start_with(config, hub, None)
}

/// Starts `config`'s gateway on a new port of `hub`, with `wall` for its wall clock (the
/// system's when `None`). Returns once the gateway's loop answers its handle, so frames sent
/// from now on meet a running gateway.
pub fn start_with(config: Config, hub: &MemoryHub, wall: Option<WallClock>) -> Running {
    let port = hub.connect();
    let mut gateway = Gateway::new(config).expect("gateway starts");
    if let Some(wall) = wall {
        gateway = gateway.with_wall_clock(wall);
    }
    let handle = gateway.handle();
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let thread = std::thread::spawn(move || {
        hubnat::rt::block_on(gateway.run(port, async move {
            let _ = stopped.recv().await;
        }))
    });
    async_io::block_on(handle.status()).expect("the gateway answers its handle");
    Running {
        handle,
        stop,
        thread,
    }
}

impl Running {
    /// Shuts the gateway down as SIGTERM would; it must have run cleanly.
    pub fn stop(self) {
        self.stop.send_blocking(()).unwrap();
        self.thread.join().unwrap().expect("gateway ran cleanly");
    }
}
