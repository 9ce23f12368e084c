//! The network namespace a cluster lives in. The control plane, QEMU and
//! every client (kubectl, helm) run inside it, so the cluster's addresses
//! (the node, pods, Services) exist nowhere else and vanish with it.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::process::run_checked;

const PREFIX: &str = "vfplane-";

/// A network namespace deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `vfplane-<pid>` with loopback up, after deleting any
    /// `vfplane-<pid>` whose process is gone (a run that was killed).
    ///
    /// # Errors
    /// When `ip netns add` fails (not root, no iproute2).
    pub fn create() -> Result<Self> {
        remove_stale();
        let name = format!("{PREFIX}{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_checked(Command::new("ip").args(["netns", "add", &name]))
            .context("creating the cluster's network namespace (needs root and iproute2)")?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program.as_ref());
        command
    }

    /// Runs `ip -n <netns> ARGS`.
    ///
    /// # Errors
    /// When `ip` fails; the error holds its output.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Deletes namespaces of runs whose process no longer exists.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name.strip_prefix(PREFIX) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}
