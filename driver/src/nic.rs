//! What every NIC driver of this crate offers an application: batch
//! receive and transmit of [`PacketBuf`]s, link state, MAC address, counters.

use std::fmt;
use std::rc::Rc;

use crate::mempool::{Mempool, PacketBuf};

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// Whether the address is a locally administered unicast address.
    pub fn is_local_unicast(self) -> bool {
        self.0[0] & 0x03 == 0x02
    }

    /// Whether the address is all zeroes.
    pub fn is_zero(self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A text that is not `xx:xx:xx:xx:xx:xx` in hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (six hex pairs like 02:00:00:00:00:01)")]
pub struct MacAddressError(pub String);

impl std::str::FromStr for MacAddress {
    type Err = MacAddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MacAddressError(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            // Two hex digits: `from_str_radix` alone also takes a sign
            // ("+a").
            let part = parts
                .next()
                .filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(bad)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

/// Link state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStatus {
    /// Carrier present.
    pub up: bool,
    /// Speed in Mb/s (0 when unknown or down).
    pub speed_mbps: u32,
}

/// Software counters of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Frames handed to the application.
    pub rx_packets: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames the driver discarded (errored or spanning several buffers).
    pub rx_drops: u64,
    /// Frames the device flagged with a receive error.
    pub rx_errors: u64,
    /// Times a receive stopped early because the mempool was empty.
    pub rx_no_buffer: u64,
    /// Frames queued on the TX ring.
    pub tx_packets: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Frames refused (empty or larger than the device takes) and freed.
    pub tx_drops: u64,
    /// Transmit errors reported by the device.
    pub tx_errors: u64,
}

/// A NIC queue pair an application polls.
///
/// Both burst calls move buffers, never copy them, and never allocate:
/// give `rx_burst` a `Vec` with spare capacity reserved once.
pub trait NicDevice {
    /// The driver's name.
    fn driver_name(&self) -> &'static str;

    /// Moves up to `max` received frames onto the end of `out` (never past
    /// its spare capacity); returns how many.
    fn rx_burst(&mut self, out: &mut Vec<PacketBuf>, max: usize) -> usize;

    /// Queues frames from the front of `packets` for transmission and
    /// removes them; returns how many were taken. Frames left in `packets`
    /// did not fit on the ring: offer them again later.
    fn tx_burst(&mut self, packets: &mut Vec<PacketBuf>) -> usize;

    /// Link state now.
    fn link(&self) -> LinkStatus;

    /// The device's MAC address.
    fn mac(&self) -> MacAddress;

    /// Software counters.
    fn stats(&self) -> Stats;

    /// The pool receive buffers come from, and transmit buffers should.
    fn mempool(&self) -> &Rc<Mempool>;
}

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
            match text.parse::<MacAddress>() {
                Ok(mac) => proptest::prop_assert_eq!(mac.to_string(), text.to_ascii_lowercase()),
                Err(error) => proptest::prop_assert!(error.to_string().contains(&format!("{text:?}")), "{}", error),
            }
        }
    }

    #[test]
    fn macs_parse_and_bad_ones_are_named() {
        assert_eq!(
            "02:00:00:00:01:0a".parse::<MacAddress>(),
            Ok(MacAddress([2, 0, 0, 0, 1, 0x0a]))
        );
        for bad in [
            "02:00:00:00:01",
            "02:00:00:00:01:0a:ff",
            "2:0:0:0:1:a",
            "zz:00:00:00:00:00",
            "",
        ] {
            assert_eq!(
                bad.parse::<MacAddress>(),
                Err(MacAddressError(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert_eq!(
            MacAddressError("x".to_owned()).to_string(),
            "\"x\" is not a MAC address (six hex pairs like 02:00:00:00:00:01)"
        );
    }
}
