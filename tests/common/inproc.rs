//! The real gateway (driver, core, state directory) on a thread of the test process, with a
//! port of an in-memory hub as its backend.

use std::thread::JoinHandle;

use hubnat::config::Config;
use hubnat::driver::{Gateway, GatewayError};
use hubnat_hub::MemoryHub;

/// A gateway running on its own thread until [`Running::stop`].
pub struct Running {
    stop: async_channel::Sender<()>,
    thread: JoinHandle<Result<(), GatewayError>>,
}

/// Starts `config`'s gateway on a new port of `hub`.
pub fn start(config: Config, hub: &MemoryHub) -> Running {
    let port = hub.connect();
    let gateway = Gateway::new(config).expect("gateway starts");
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let thread = std::thread::spawn(move || {
        async_io::block_on(gateway.run(port, async move {
            let _ = stopped.recv().await;
        }))
    });
    Running { stop, thread }
}

impl Running {
    /// Shuts the gateway down as SIGTERM would; it must have run cleanly.
    pub fn stop(self) {
        self.stop.send_blocking(()).unwrap();
        self.thread.join().unwrap().expect("gateway ran cleanly");
    }
}
