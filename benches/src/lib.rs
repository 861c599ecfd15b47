//! Flotilla's benchmarks.
//!
//! - [`workload`]: the requests, built the way propeller would send them.
//! - [`load`]: the closed-loop load generator (tonic clients, HDR histograms).
//! - [`procs`]: server processes, killed on drop, and their CPU and memory from `/proc`.
//! - [`fleet`]: starting each compared target and timing its cold start.
//! - [`floor`]: the machine's bare loopback round trip, the floor under every latency.
//! - [`results`]: the markdown that `flotilla-compare` writes into `RESULTS.md`.
//!
//! Two binaries sit on top: `flotilla-bench` runs one load against one
//! address, and `flotilla-compare` runs the whole comparison (Flotilla through
//! the gateway, `flotilla-echo` directly, upstream's `pyflyte serve agent`).
//! Traffic only ever goes to 127.0.0.1.

pub mod fleet;
pub mod floor;
pub mod load;
pub mod procs;
pub mod results;
pub mod workload;
