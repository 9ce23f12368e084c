//! MAC addresses as vfplane gives them to VFs: the policy's `macs`, the
//! agent's derived ones and a claim's `VfConfig`.

use std::fmt;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Why a text is not a MAC a VF can have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six pairs of hex digits.
    #[error("invalid MAC {0:?} (expected six hex pairs like 02:00:00:00:00:01)")]
    Syntax(String),
    /// The group bit is set.
    #[error("MAC {0} is a multicast address; a VF needs a unicast one")]
    Multicast(String),
    /// 00:00:00:00:00:00.
    #[error("MAC {0} is all zeros")]
    Zero(String),
}

impl std::str::FromStr for Mac {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || MacError::Syntax(s.to_owned());
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(parts) {
            // Two hex digits: `from_str_radix` alone also takes a sign
            // ("+a").
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 == 1 {
            return Err(MacError::Multicast(s.to_owned()));
        }
        if mac == [0; 6] {
            return Err(MacError::Zero(s.to_owned()));
        }
        Ok(Self(mac))
    }
}
