//! `cargo xtask`: the project's own tooling as a library, so the tests in
//! `tests/` can boot the same testbed the command line does.

pub mod cluster;
pub mod crdgen;
pub mod helm;
pub mod oci;
pub mod testbed;
