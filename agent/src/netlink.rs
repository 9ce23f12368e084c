//! VF link settings through rtnetlink: what `ip link set <pf> vf N mac ...
//! vlan ... spoofchk ... trust ... max_tx_rate ...` does, and the read-back
//! of the same through `RTM_GETLINK` with the VF extension mask.
//!
//! [`VfLinkControl`] is the seam: [`RtNetlink`] talks to the kernel, and
//! tests use an in-memory implementation.

use std::fmt;

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkMessage, LinkVfInfo, VfInfo, VfInfoLinkState, VfInfoMac, VfInfoRate,
    VfInfoSpoofCheck, VfInfoTrust, VfInfoVlan, VfLinkState,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub use vfplane_proto::mac::{Mac, MacError};

/// A link state that is not `auto`, `enable` or `disable`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown linkState {0:?} (use auto, enable or disable)")]
pub struct LinkModeError(pub String);

/// The settings vfplane manages on one VF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfLinkSettings {
    /// Administrative MAC.
    pub mac: Mac,
    /// VLAN the PF tags with; 0 for none.
    pub vlan: u16,
    /// Anti-spoof checking.
    pub spoof_chk: bool,
    /// Trusted VF.
    pub trust: bool,
    /// Transmit limit in Mbit/s; 0 for none.
    pub max_tx_rate_mbps: u32,
    /// Link state to force, if any.
    pub link_state: Option<VfLinkMode>,
}

/// A VF's administrative link state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfLinkMode {
    /// Follows the PF's link.
    Auto,
    /// Always up.
    Enable,
    /// Always down.
    Disable,
}

impl std::str::FromStr for VfLinkMode {
    type Err = LinkModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "enable" => Ok(Self::Enable),
            "disable" => Ok(Self::Disable),
            other => Err(LinkModeError(other.to_owned())),
        }
    }
}

/// One setting the PF holds for a VF: what [`VfLinkInfo::differences`]
/// names and [`VfLinkControl::set_vf`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VfSetting {
    /// The administrative MAC.
    Mac,
    /// The port VLAN.
    Vlan,
    /// Anti-spoof checking.
    SpoofChk,
    /// Trust.
    Trust,
    /// The transmit rate limit.
    MaxTxRate,
    /// The link state.
    LinkState,
}

impl VfSetting {
    /// Every setting, in the order they are written.
    pub const ALL: [Self; 6] = [
        Self::Mac,
        Self::Vlan,
        Self::SpoofChk,
        Self::Trust,
        Self::MaxTxRate,
        Self::LinkState,
    ];

    /// Its name in messages (`ip link`'s words).
    pub fn name(self) -> &'static str {
        match self {
            Self::Mac => "mac",
            Self::Vlan => "vlan",
            Self::SpoofChk => "spoofchk",
            Self::Trust => "trust",
            Self::MaxTxRate => "max_tx_rate",
            Self::LinkState => "link_state",
        }
    }

    /// `mac, vlan`: the names of `settings`, for a message.
    pub fn list(settings: &[Self]) -> String {
        settings.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for VfSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the kernel reports for one VF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VfLinkInfo {
    /// VF index.
    pub vf: u32,
    /// Administrative MAC (zero when none was set).
    pub mac: Mac,
    /// VLAN.
    pub vlan: u16,
    /// Anti-spoof checking, when the driver reports it.
    pub spoof_chk: Option<bool>,
    /// Trust, when the driver reports it.
    pub trust: Option<bool>,
    /// Transmit limit, when the driver reports it.
    pub max_tx_rate_mbps: Option<u32>,
    /// Link state, when the driver reports it.
    pub link_state: Option<VfLinkMode>,
}

impl VfLinkInfo {
    /// The settings that differ from `want` (empty: all match). A setting
    /// the driver does not report is not a difference; a link state the
    /// spec leaves out is not either.
    pub fn differences(&self, want: &VfLinkSettings) -> Vec<VfSetting> {
        VfSetting::ALL
            .into_iter()
            .filter(|setting| match setting {
                VfSetting::Mac => self.mac != want.mac,
                VfSetting::Vlan => self.vlan != want.vlan,
                VfSetting::SpoofChk => self.spoof_chk.is_some_and(|v| v != want.spoof_chk),
                VfSetting::Trust => self.trust.is_some_and(|v| v != want.trust),
                VfSetting::MaxTxRate => self.max_tx_rate_mbps.is_some_and(|v| v != want.max_tx_rate_mbps),
                VfSetting::LinkState => want.link_state.is_some() && self.link_state != want.link_state,
            })
            .collect()
    }
}

/// A netlink failure, naming the interface and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be opened or used.
    #[error("netlink socket")]
    Socket(#[source] std::io::Error),
    /// The kernel refused a request.
    #[error("{what} on {ifname}")]
    Refused {
        /// What was asked.
        what: String,
        /// The PF interface.
        ifname: String,
        /// The kernel's errno.
        #[source]
        source: std::io::Error,
    },
    /// The kernel's answer could not be decoded.
    #[error("{what} on {ifname}: undecodable reply: {message}")]
    Decode {
        /// What was asked.
        what: String,
        /// The PF interface.
        ifname: String,
        /// The decoder's message.
        message: String,
    },
}

/// Reads and writes VF settings of a PF.
pub trait VfLinkControl {
    /// Every VF of the PF `ifname` as the kernel reports it.
    ///
    /// # Errors
    /// When the kernel refuses or the reply is garbled.
    fn vf_links(&self, ifname: &str) -> Result<Vec<VfLinkInfo>, NetlinkError>;

    /// Writes the `settings` of `want` (as [`VfLinkInfo::differences`]
    /// gives them) to VF `vf` of `ifname`, in that order.
    ///
    /// # Errors
    /// The first setting the kernel refuses, by name.
    fn set_vf(
        &self,
        ifname: &str,
        vf: u32,
        want: &VfLinkSettings,
        settings: &[VfSetting],
    ) -> Result<(), NetlinkError>;

    /// Sets the MTU of an interface.
    ///
    /// # Errors
    /// When the kernel refuses.
    fn set_mtu(&self, ifname: &str, mtu: u32) -> Result<(), NetlinkError>;
}

/// The kernel's rtnetlink.
#[derive(Debug, Default)]
pub struct RtNetlink;

impl RtNetlink {
    fn request(
        &self,
        ifname: &str,
        what: &str,
        message: LinkMessage,
        dump_reply: bool,
    ) -> Result<Vec<LinkMessage>, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        let payload = if dump_reply {
            RouteNetlinkMessage::GetLink(message)
        } else {
            RouteNetlinkMessage::SetLink(message)
        };
        let mut packet = NetlinkMessage::from(payload);
        packet.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        packet.header.sequence_number = 1;
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        socket.send(&buf, 0).map_err(NetlinkError::Socket)?;

        let decode = |message: String| NetlinkError::Decode {
            what: what.to_owned(),
            ifname: ifname.to_owned(),
            message,
        };
        let mut replies = Vec::new();
        loop {
            let (data, _) = socket.recv_from_full().map_err(NetlinkError::Socket)?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| decode(e.to_string()))?;
                let length = reply.header.length as usize;
                if length == 0 {
                    return Err(decode("zero-length message".to_owned()));
                }
                offset += length.next_multiple_of(4);
                match reply.payload {
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            None => Ok(replies),
                            Some(code) => Err(NetlinkError::Refused {
                                what: what.to_owned(),
                                ifname: ifname.to_owned(),
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => replies.push(link),
                    _ => {}
                }
            }
        }
    }

    fn link_named(ifname: &str) -> LinkMessage {
        let mut message = LinkMessage::default();
        message.attributes.push(LinkAttribute::IfName(ifname.to_owned()));
        message
    }
}

impl VfLinkControl for RtNetlink {
    fn vf_links(&self, ifname: &str) -> Result<Vec<VfLinkInfo>, NetlinkError> {
        let mut message = Self::link_named(ifname);
        message
            .attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::Vf]));
        let replies = self.request(ifname, "reading VF settings", message, true)?;
        let mut vfs = Vec::new();
        for reply in replies {
            for attribute in reply.attributes {
                if let LinkAttribute::VfInfoList(list) = attribute {
                    vfs.extend(list.iter().map(vf_link_info));
                }
            }
        }
        vfs.sort_by_key(|vf| vf.vf);
        Ok(vfs)
    }

    fn set_vf(
        &self,
        ifname: &str,
        vf: u32,
        want: &VfLinkSettings,
        settings: &[VfSetting],
    ) -> Result<(), NetlinkError> {
        for &setting in settings {
            let info = match setting {
                VfSetting::Mac => VfInfo::Mac(VfInfoMac::new(vf, &want.mac.0)),
                VfSetting::Vlan => VfInfo::Vlan(VfInfoVlan::new(vf, u32::from(want.vlan), 0)),
                VfSetting::SpoofChk => VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf, want.spoof_chk)),
                VfSetting::Trust => VfInfo::Trust(VfInfoTrust::new(vf, want.trust)),
                VfSetting::MaxTxRate => VfInfo::Rate(VfInfoRate::new(vf, 0, want.max_tx_rate_mbps)),
                VfSetting::LinkState => {
                    let state = match want.link_state {
                        Some(VfLinkMode::Enable) => VfLinkState::Enable,
                        Some(VfLinkMode::Disable) => VfLinkState::Disable,
                        _ => VfLinkState::Auto,
                    };
                    VfInfo::LinkState(VfInfoLinkState::new(vf, state))
                }
            };
            let mut message = Self::link_named(ifname);
            message
                .attributes
                .push(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![info])]));
            self.request(ifname, &format!("setting {setting} of VF {vf}"), message, false)?;
        }
        Ok(())
    }

    fn set_mtu(&self, ifname: &str, mtu: u32) -> Result<(), NetlinkError> {
        let mut message = Self::link_named(ifname);
        message.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(ifname, &format!("setting MTU {mtu}"), message, false)
            .map(|_| ())
    }
}

fn vf_link_info(list: &LinkVfInfo) -> VfLinkInfo {
    let mut info = VfLinkInfo::default();
    for item in &list.0 {
        match item {
            VfInfo::Mac(mac) => {
                info.vf = mac.vf_id;
                info.mac.0.copy_from_slice(&mac.mac[..6]);
            }
            VfInfo::Vlan(vlan) => info.vlan = u16::try_from(vlan.vlan_id).unwrap_or(u16::MAX),
            VfInfo::SpoofCheck(spoof) => info.spoof_chk = Some(spoof.enabled),
            VfInfo::Trust(trust) => info.trust = Some(trust.enabled),
            VfInfo::Rate(rate) => info.max_tx_rate_mbps = Some(rate.max_tx_rate),
            VfInfo::LinkState(state) => {
                info.link_state = match state.state {
                    VfLinkState::Auto => Some(VfLinkMode::Auto),
                    VfLinkState::Enable => Some(VfLinkMode::Enable),
                    VfLinkState::Disable => Some(VfLinkMode::Disable),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    info
}

/// A stable locally administered unicast MAC for VF `index` of `pf` on
/// `node`: the same inputs always give the same MAC, so VFs come back with
/// the addresses they had after a restart or a re-creation.
pub fn derived_mac(node: &str, pf: &str, index: u16) -> Mac {
    // FNV-1a, 64 bits: small, stable across Rust versions (unlike std's hasher).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node
        .bytes()
        .chain([0])
        .chain(pf.bytes())
        .chain([0])
        .chain(index.to_le_bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let b = hash.to_le_bytes();
    // Locally administered (bit 1 set), unicast (bit 0 clear).
    Mac([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
}

#[cfg(any(test, feature = "fake"))]
pub mod fake;

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// Any text is a MAC or an error that quotes it; a MAC prints back
        /// to the text it came from (lower-cased).
        #[test]
        fn any_text_is_a_mac_that_prints_back_or_an_error_naming_it(
            text in proptest::prop_oneof![
                "[0-9a-fA-F+ -]{2}(:[0-9a-fA-F+ -]{2}){5}",
                ".{0,20}",
            ],
        ) {
            match text.parse::<Mac>() {
                Ok(mac) => proptest::prop_assert_eq!(mac.to_string(), text.to_ascii_lowercase()),
                Err(error) => proptest::prop_assert!(
                    error.to_string().contains(&format!("{text:?}"))
                        || error.to_string().contains(&text),
                    "{}",
                    error
                ),
            }
        }
    }

    #[test]
    fn mac_parses_prints_and_refuses_bad_input() {
        let mac: Mac = "02:00:00:aa:bb:0c".parse().unwrap();
        assert_eq!(mac.to_string(), "02:00:00:aa:bb:0c");
        for bad in [
            "02:00:00:aa:bb",
            "02:00:00:aa:bb:0g",
            "0200.00aa.bb0c",
            "",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn derived_macs_are_stable_local_unicast_and_distinct() {
        let a = derived_mac("node-1", "0000:00:02.0", 0);
        assert_eq!(a, derived_mac("node-1", "0000:00:02.0", 0));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered unicast");
        let mut all: Vec<Mac> = (0..64)
            .map(|i| derived_mac("node-1", "0000:00:02.0", i))
            .collect();
        all.push(derived_mac("node-2", "0000:00:02.0", 0));
        all.push(derived_mac("node-1", "0000:00:03.0", 0));
        let count = all.len();
        all.sort_by_key(|m| m.0);
        all.dedup();
        assert_eq!(all.len(), count);
    }

    #[test]
    fn differences_ignore_settings_the_driver_does_not_report() {
        let want = VfLinkSettings {
            mac: Mac([2, 0, 0, 0, 0, 1]),
            vlan: 10,
            spoof_chk: true,
            trust: false,
            max_tx_rate_mbps: 0,
            link_state: Some(VfLinkMode::Disable),
        };
        let mut have = VfLinkInfo {
            vf: 0,
            mac: want.mac,
            vlan: 10,
            link_state: Some(VfLinkMode::Disable),
            ..VfLinkInfo::default()
        };
        assert!(have.differences(&want).is_empty());
        have.spoof_chk = Some(false);
        have.vlan = 0;
        assert_eq!(have.differences(&want), [VfSetting::Vlan, VfSetting::SpoofChk]);
        have.link_state = Some(VfLinkMode::Auto);
        assert_eq!(
            have.differences(&want),
            [VfSetting::Vlan, VfSetting::SpoofChk, VfSetting::LinkState]
        );
        assert_eq!(
            VfSetting::list(&have.differences(&want)),
            "vlan, spoofchk, link_state",
            "messages keep ip link's words"
        );
    }
}
