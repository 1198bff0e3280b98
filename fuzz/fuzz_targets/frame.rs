//! Any bytes as one frame from the segment into the core (`VirtualHost::handle_frame`), then
//! what the driver does after a batch (poll, take the frames, carry out the host requests, read
//! the events), then the next timer. The same frame again a second later (a retransmission).
//!
//! Seeds: whole frames clients sent to hubnat (fuzz/corpus/frame, see fuzz/README.md).
#![no_main]

use hubnat_fuzz::Harness;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut h = Harness::reference();
    h.frame(data);
    h.advance(1000);
    h.frame(data);
    h.next_timeout();
});
