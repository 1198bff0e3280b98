//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod smol_client;
pub mod netns;
pub mod topology;
pub mod inproc;
