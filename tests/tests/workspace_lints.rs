//! The workspace's lint tables: unsafe code is forbidden in every crate but
//! the driver and the QEMU plugin (`guest-insns`, a C ABI), and their own
//! copies of the tables differ from the workspace's by that line only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::path::Path;

/// The lines of `[section]` (up to the next section), trimmed, without
/// comments and blank lines.
fn section(text: &str, name: &str) -> Vec<String> {
    let header = format!("[{name}]");
    text.lines()
        .map(str::trim)
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn unsafe_code_is_forbidden_everywhere_but_in_the_driver_and_the_qemu_plugin() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let workspace = read(&root.join("Cargo.toml"));
    let rust = section(&workspace, "workspace.lints.rust");
    assert!(
        rust.iter().any(|l| l == "unsafe_code = \"forbid\""),
        "[workspace.lints.rust]: {rust:?}"
    );
    let members: Vec<String> = section(&workspace, "workspace")
        .iter()
        .skip_while(|l| !l.starts_with("members"))
        .skip(1)
        .take_while(|l| *l != "]")
        .map(|l| l.trim_matches([' ', '"', ',']).to_owned())
        .collect();
    assert!(members.len() >= 8, "members: {members:?}");
    for member in &members {
        let manifest = read(&root.join(member).join("Cargo.toml"));
        if member == "driver" || member == "guest-insns" {
            let without: Vec<&String> = rust.iter().filter(|l| !l.starts_with("unsafe_code")).collect();
            let own: Vec<String> = section(&manifest, "lints.rust");
            assert_eq!(own.iter().collect::<Vec<_>>(), without, "{member}'s [lints.rust]");
            assert_eq!(
                section(&manifest, "lints.clippy"),
                section(&workspace, "workspace.lints.clippy"),
                "{member}'s [lints.clippy]"
            );
        } else {
            assert_eq!(
                section(&manifest, "lints"),
                ["workspace = true"],
                "{member} takes the workspace's lints"
            );
        }
    }
}
