//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cli;
pub mod inproc;
pub mod netns;
pub mod smol_client;
pub mod softether;
pub mod topology;
