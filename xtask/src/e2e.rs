//! End-to-end tests need what a plain `cargo test` cannot count on: root,
//! QEMU, the testbed's kernel, the cluster's Go binaries, the network (or
//! the project's caches). `cargo xtask test` sets [`ENV`] and runs every one
//! of them, so one that cannot set up fails; a plain `cargo test
//! --workspace` skips each with one line saying why, and passes without any
//! of that.

use std::io::Write as _;

/// Set to `1` by `cargo xtask test`: the end-to-end tests run.
pub const ENV: &str = "VFPLANE_E2E";

/// Whether the end-to-end test `test`, which needs `needs`, runs. When it
/// does not, says so on stderr, past the test harness's capture (which
/// would hide the line of a test that passes).
pub fn enabled(test: &str, needs: &str) -> bool {
    if std::env::var_os(ENV).is_some_and(|value| value == "1") {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: not run: end-to-end, needs {needs}; `cargo xtask test` runs it ({ENV}=1)"
    );
    false
}

/// What a test on the emulated node needs.
pub const TESTBED: &str = "root, QEMU and the testbed's Debian kernel";
/// What a test on the real cluster needs.
pub const CLUSTER: &str =
    "root, QEMU, the testbed's Debian kernel and the cluster's Go binaries (built from the Go module proxy)";
