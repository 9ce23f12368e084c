//! `cargo xtask`: the project's own tooling as a library, so the tests in
//! `tests/` boot the same testbed and cluster, and run the same demo, as the
//! command line does.

pub mod bench_limits;
pub mod bench_scale;
pub mod cache;
pub mod campaign;
pub mod claims;
pub mod cluster;
pub mod crdgen;
pub mod demo;
pub mod e2e;
pub mod helm;
pub mod oci;
pub mod process;
pub mod session;
pub mod testbed;
