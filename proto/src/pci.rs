//! PCI addresses: the device IDs the kubelet sees, the addresses in
//! `PCIDEVICE_*` variables and CDI names, and what sysfs is keyed by.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A PCI function address in the extended BDF form sysfs uses: `0000:00:02.0`
/// (domain, bus, device, function). `Debug` prints the same form, so logs
/// and assertion messages that list addresses read as sysfs does.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI segment (domain), 16 bits on every platform Linux supports for SR-IOV.
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

/// Why a string is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address {input:?}: {reason} (expected the form 0000:00:02.0)")]
pub struct ParsePciAddressError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl PciAddress {
    /// Builds an address, checking the device and function ranges.
    ///
    /// # Errors
    /// When `device` > 31 or `function` > 7.
    pub fn new(domain: u16, bus: u8, device: u8, function: u8) -> Result<Self, ParsePciAddressError> {
        let addr = Self {
            domain,
            bus,
            device,
            function,
        };
        if device > 31 {
            return Err(ParsePciAddressError {
                input: addr.to_string(),
                reason: "device number above 31",
            });
        }
        if function > 7 {
            return Err(ParsePciAddressError {
                input: addr.to_string(),
                reason: "function number above 7",
            });
        }
        Ok(addr)
    }
}

impl fmt::Debug for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = ParsePciAddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParsePciAddressError {
            input: s.to_owned(),
            reason,
        };
        let (domain, rest) = s
            .split_once(':')
            .ok_or_else(|| err("missing ':' after the domain"))?;
        let (bus, rest) = rest
            .split_once(':')
            .ok_or_else(|| err("missing ':' after the bus"))?;
        let (device, function) = rest
            .split_once('.')
            .ok_or_else(|| err("missing '.' before the function"))?;
        let hex = |text: &str, width: usize, what| {
            if text.len() != width || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err(what));
            }
            u32::from_str_radix(text, 16).map_err(|_| err(what))
        };
        let domain = hex(domain, 4, "domain must be 4 hex digits")?;
        let bus = hex(bus, 2, "bus must be 2 hex digits")?;
        let device = hex(device, 2, "device must be 2 hex digits")?;
        let function = hex(function, 1, "function must be 1 digit")?;
        let narrow = |v: u32| u8::try_from(v).map_err(|_| err("value out of range"));
        let domain = u16::try_from(domain).map_err(|_| err("domain out of range"))?;
        Self::new(domain, narrow(bus)?, narrow(device)?, narrow(function)?).map_err(|e| {
            ParsePciAddressError {
                input: s.to_owned(),
                reason: e.reason,
            }
        })
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses the `0x`-prefixed hexadecimal values sysfs prints for `vendor`,
/// `device` and `class` (`0x8086`), and the bare form of `sriov_vf_device`
/// (`10ca`).
pub fn parse_sysfs_hex(text: &str) -> Option<u32> {
    let text = text.trim();
    let digits = text.strip_prefix("0x").unwrap_or(text);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    u32::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let addr: PciAddress = "0000:21:10.6".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            addr,
            PciAddress {
                domain: 0,
                bus: 0x21,
                device: 0x10,
                function: 6
            }
        );
        assert_eq!(addr.to_string(), "0000:21:10.6");
    }

    #[test]
    fn rejects_malformed_addresses_with_a_reason() {
        for bad in [
            "",
            "00:02.0",
            "0000:00:02",
            "0000:0g:02.0",
            "0000:00:20.0",
            "0000:00:02.8",
            "0000:00:02.0x",
            "00000:00:02.0",
        ] {
            let err = bad.parse::<PciAddress>().expect_err(bad);
            assert_eq!(err.input, bad);
            assert!(err.to_string().contains("invalid PCI address"), "{err}");
        }
    }

    #[test]
    fn parses_sysfs_hex_forms() {
        assert_eq!(parse_sysfs_hex("0x8086\n"), Some(0x8086));
        assert_eq!(parse_sysfs_hex("10ca\n"), Some(0x10ca));
        assert_eq!(parse_sysfs_hex("0x020000"), Some(0x020000));
        assert_eq!(parse_sysfs_hex("zz"), None);
        assert_eq!(parse_sysfs_hex(""), None);
        assert_eq!(parse_sysfs_hex("0x"), None);
    }

    #[test]
    fn serde_uses_the_text_form() {
        let addr = PciAddress {
            domain: 0,
            bus: 0,
            device: 2,
            function: 0,
        };
        let json = serde_json::to_string(&addr).unwrap_or_default();
        assert_eq!(json, "\"0000:00:02.0\"");
        let back: PciAddress = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, addr);
        assert!(serde_json::from_str::<PciAddress>("\"nope\"").is_err());
    }

    #[test]
    fn debug_reads_as_sysfs_does() {
        let addrs: Vec<PciAddress> = ["0000:00:12.2", "0001:3b:1f.7"]
            .iter()
            .map(|a| a.parse().unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert_eq!(format!("{addrs:?}"), "[0000:00:12.2, 0001:3b:1f.7]");
    }
}
