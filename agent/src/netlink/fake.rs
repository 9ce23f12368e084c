//! The one in-memory stand-in for the PF's VF settings ([`VfLinkControl`]),
//! for tests of this crate and others (feature `fake`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{NetlinkError, VfLinkControl, VfLinkInfo, VfLinkMode, VfLinkSettings, VfSetting};

/// VF settings kept in memory per (interface, VF), as a PF driver keeps
/// them; every setting written is logged as `"<ifname> vf <n> <setting>"`.
#[derive(Debug, Default)]
pub struct FakeNetlink {
    vfs: Mutex<BTreeMap<(String, u32), VfLinkInfo>>,
    writes: Mutex<Vec<String>>,
    refuse: Mutex<Option<VfSetting>>,
    fail_reads_from: Mutex<Option<usize>>,
    reads: AtomicUsize,
    lost_mac_writes: Mutex<BTreeMap<u32, usize>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeNetlink {
    /// `count` VFs on `ifname` as igb reports fresh ones: no MAC, no VLAN,
    /// spoof checking on, not trusted, no rate limit, link state auto.
    pub fn with_fresh_vfs(ifname: &str, count: u32) -> Self {
        let netlink = Self::default();
        netlink.add_fresh_vfs(ifname, count);
        netlink
    }

    /// Adds `count` fresh VFs (as [`FakeNetlink::with_fresh_vfs`] makes
    /// them) on `ifname`: a second PF of the same node.
    pub fn add_fresh_vfs(&self, ifname: &str, count: u32) {
        for vf in 0..count {
            self.insert(
                ifname,
                VfLinkInfo {
                    vf,
                    spoof_chk: Some(true),
                    trust: Some(false),
                    max_tx_rate_mbps: Some(0),
                    link_state: Some(VfLinkMode::Auto),
                    ..VfLinkInfo::default()
                },
            );
        }
    }

    /// Sets what the PF reports for one VF.
    pub fn insert(&self, ifname: &str, info: VfLinkInfo) {
        lock(&self.vfs).insert((ifname.to_owned(), info.vf), info);
    }

    /// What the PF reports for one VF.
    pub fn get(&self, ifname: &str, vf: u32) -> Option<VfLinkInfo> {
        lock(&self.vfs).get(&(ifname.to_owned(), vf)).copied()
    }

    /// The settings written so far, in order.
    pub fn writes(&self) -> Vec<String> {
        lock(&self.writes).clone()
    }

    /// Forgets the writes logged so far.
    pub fn clear_writes(&self) {
        lock(&self.writes).clear();
    }

    /// Refuses every write of setting `name` (`"vlan"`, ...), as a PF
    /// driver without it does.
    pub fn refuse(&self, setting: VfSetting) {
        *lock(&self.refuse) = Some(setting);
    }

    /// Reads fail from read number `from` on (0-based), as a netlink socket
    /// that broke.
    pub fn fail_reads_from(&self, from: usize) {
        *lock(&self.fail_reads_from) = Some(from);
    }

    /// The next `count` MAC writes to VF `vf` are lost, the PF keeping the
    /// MAC it had (a VF driver's reset handshake racing the write).
    pub fn lose_mac_writes(&self, vf: u32, count: usize) {
        lock(&self.lost_mac_writes).insert(vf, count);
    }
}

impl VfLinkControl for FakeNetlink {
    fn vf_links(&self, ifname: &str) -> Result<Vec<VfLinkInfo>, NetlinkError> {
        let read = self.reads.fetch_add(1, Ordering::Relaxed);
        if lock(&self.fail_reads_from).is_some_and(|from| read >= from) {
            return Err(NetlinkError::Socket(std::io::Error::from_raw_os_error(
                libc::ENOBUFS,
            )));
        }
        Ok(lock(&self.vfs)
            .iter()
            .filter(|((i, _), _)| i == ifname)
            .map(|(_, v)| *v)
            .collect())
    }

    fn set_vf(
        &self,
        ifname: &str,
        vf: u32,
        want: &VfLinkSettings,
        settings: &[VfSetting],
    ) -> Result<(), NetlinkError> {
        let refuse = *lock(&self.refuse);
        for &setting in settings {
            if refuse == Some(setting) {
                return Err(NetlinkError::Refused {
                    what: format!("setting {setting} of VF {vf}"),
                    ifname: ifname.to_owned(),
                    source: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP),
                });
            }
            lock(&self.writes).push(format!("{ifname} vf {vf} {setting}"));
        }
        let mut vfs = lock(&self.vfs);
        let entry = vfs.entry((ifname.to_owned(), vf)).or_insert(VfLinkInfo {
            vf,
            ..VfLinkInfo::default()
        });
        let mut lost = lock(&self.lost_mac_writes);
        match lost.get_mut(&vf).filter(|n| **n > 0) {
            Some(left) if settings.contains(&VfSetting::Mac) => *left -= 1,
            _ => entry.mac = want.mac,
        }
        entry.vlan = want.vlan;
        entry.spoof_chk = Some(want.spoof_chk);
        entry.trust = Some(want.trust);
        entry.max_tx_rate_mbps = Some(want.max_tx_rate_mbps);
        entry.link_state = want.link_state.or(entry.link_state);
        Ok(())
    }

    fn set_mtu(&self, ifname: &str, mtu: u32) -> Result<(), NetlinkError> {
        lock(&self.writes).push(format!("{ifname} mtu {mtu}"));
        Ok(())
    }
}
