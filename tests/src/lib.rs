//! Cross-crate and testbed end-to-end tests live in `tests/`; their shared
//! helpers live in `xtask` (the testbed, the cluster, the wire), which the
//! command line uses too.
