//! Guest instructions per frame on the testbed, counted by QEMU itself.
//!
//! Under TCG every guest instruction passes through QEMU's translator, so a
//! TCG plugin can count them exactly, kernel and user, on every vCPU. This
//! crate is both halves of that measurement:
//!
//! - [`marker`]: the markers a guest program executes around what it
//!   wants counted (a multi-byte NOP carrying a tag, harmless on any x86
//!   CPU, so the same binary runs with or without the plugin);
//! - with the `plugin` feature, the plugin QEMU loads (`-plugin
//!   libvfplane_guest_insns.so,out=FILE`): it counts the instructions of
//!   every translated block as it runs, per vCPU, and at each marker
//!   writes what was counted since the matching one to `FILE`, one JSON
//!   line per span.
//!
//! The figures are instructions the guest executed, not time: under TCG
//! the time per frame is mostly the emulated NIC's, so instructions are the
//! guest's CPU cost per frame, the part a driver can change.

pub mod marker;

#[cfg(feature = "plugin")]
mod plugin;
