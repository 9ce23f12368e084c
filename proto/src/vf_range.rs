//! VF index ranges as people write them (`"0-3"`, `"2"`, `"0-1,4"`), and
//! PF name selectors with an optional range (`"ens1f0#0-3"`), shared by the
//! agent, the controller and the admission webhook so all three read them
//! the same way.

use std::collections::BTreeSet;

/// Why a VF range does not parse; each names the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VfRangeError {
    /// Nothing was given.
    #[error("vfRange is empty")]
    Empty,
    /// A part is not `N` or `N-M` with indexes up to 65535.
    #[error("vfRange part {0:?} is not N or N-M")]
    NotARange(String),
    /// A part ends before it starts.
    #[error("vfRange part {0:?} runs backwards")]
    Backwards(String),
    /// An index is in two parts.
    #[error("vfRange {range:?} names VF {index} twice")]
    Twice {
        /// The whole range.
        range: String,
        /// The index.
        index: u16,
    },
}

/// Why a `nicSelector.pfNames` entry does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PfNameError {
    /// Nothing before `#`.
    #[error("pfNames entry {0:?} has no interface name")]
    NoName(String),
    /// Longer than an interface name can be, or with `/`, ` ` or `:`.
    #[error("pfNames entry {entry:?}: {name:?} is not an interface name")]
    BadName {
        /// The entry.
        entry: String,
        /// The name part.
        name: String,
    },
    /// The range after `#` does not parse.
    #[error("pfNames entry {entry:?}")]
    Range {
        /// The entry.
        entry: String,
        /// Why.
        #[source]
        source: VfRangeError,
    },
}

/// Parses `"0-3"`, `"2"`, `"0-1,4"` into sorted VF indexes.
///
/// # Errors
/// [`VfRangeError`], naming the bad part: empty, not a number, backwards,
/// or an index named twice.
pub fn parse_vf_range(text: &str) -> Result<Vec<u16>, VfRangeError> {
    let mut indexes = BTreeSet::new();
    if text.trim().is_empty() {
        return Err(VfRangeError::Empty);
    }
    for part in text.split(',') {
        let part = part.trim();
        let bad = || VfRangeError::NotARange(part.to_owned());
        let (start, end) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse::<u16>().map_err(|_| bad())?,
                b.trim().parse::<u16>().map_err(|_| bad())?,
            ),
            None => {
                let n = part.parse::<u16>().map_err(|_| bad())?;
                (n, n)
            }
        };
        if start > end {
            return Err(VfRangeError::Backwards(part.to_owned()));
        }
        for index in start..=end {
            if !indexes.insert(index) {
                return Err(VfRangeError::Twice {
                    range: text.to_owned(),
                    index,
                });
            }
        }
    }
    Ok(indexes.into_iter().collect())
}

/// The shortest range text for `indexes` (any order, duplicates ignored):
/// `[0, 1, 2, 5]` -> `"0-2,5"`; empty -> `""`.
pub fn format_vf_range(indexes: impl IntoIterator<Item = u16>) -> String {
    let sorted: BTreeSet<u16> = indexes.into_iter().collect();
    let mut parts: Vec<String> = Vec::new();
    let mut run: Option<(u16, u16)> = None;
    for i in sorted {
        run = match run {
            Some((start, end)) if end.checked_add(1) == Some(i) => Some((start, i)),
            Some(done) => {
                parts.push(run_text(done));
                Some((i, i))
            }
            None => Some((i, i)),
        };
    }
    if let Some(done) = run {
        parts.push(run_text(done));
    }
    parts.join(",")
}

fn run_text((start, end): (u16, u16)) -> String {
    if start == end {
        start.to_string()
    } else {
        format!("{start}-{end}")
    }
}

/// A `nicSelector.pfNames` entry: an interface name, and the VFs the policy
/// takes of it when a range follows `#`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PfNameSelector {
    /// The PF's interface name.
    pub name: String,
    /// Sorted VF indexes; `None` means every VF the policy creates.
    pub vfs: Option<Vec<u16>>,
}

impl PfNameSelector {
    /// Parses `"ens1f0"` or `"ens1f0#0-3"`.
    ///
    /// # Errors
    /// [`PfNameError`]: an empty or over-long interface name, or a bad range.
    pub fn parse(text: &str) -> Result<Self, PfNameError> {
        let (name, range) = match text.split_once('#') {
            Some((name, range)) => (name, Some(range)),
            None => (text, None),
        };
        if name.is_empty() {
            return Err(PfNameError::NoName(text.to_owned()));
        }
        // IFNAMSIZ is 16 with the terminating NUL.
        if name.len() > 15 || name.contains(['/', ' ', ':']) {
            return Err(PfNameError::BadName {
                entry: text.to_owned(),
                name: name.to_owned(),
            });
        }
        let vfs = range
            .map(|r| {
                parse_vf_range(r).map_err(|source| PfNameError::Range {
                    entry: text.to_owned(),
                    source,
                })
            })
            .transpose()?;
        Ok(Self {
            name: name.to_owned(),
            vfs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_by_name() {
        assert_eq!(parse_vf_range("0-3").unwrap(), [0, 1, 2, 3]);
        assert_eq!(parse_vf_range("5").unwrap(), [5]);
        assert_eq!(parse_vf_range("0-1, 4").unwrap(), [0, 1, 4]);
        assert_eq!(
            parse_vf_range("3-1").unwrap_err(),
            VfRangeError::Backwards("3-1".into())
        );
        assert_eq!(parse_vf_range("").unwrap_err(), VfRangeError::Empty);
        assert_eq!(
            parse_vf_range("1,1").unwrap_err().to_string(),
            "vfRange \"1,1\" names VF 1 twice"
        );
        assert_eq!(
            parse_vf_range("a-2").unwrap_err().to_string(),
            "vfRange part \"a-2\" is not N or N-M"
        );
    }

    #[test]
    fn ranges_format_to_their_shortest_text_and_back() {
        assert_eq!(format_vf_range([5, 0, 1, 2]), "0-2,5");
        assert_eq!(format_vf_range([3]), "3");
        assert_eq!(format_vf_range([]), "");
        assert_eq!(format_vf_range([u16::MAX - 1, u16::MAX]), "65534-65535");
        for text in ["0-2,5", "1,3,5", "0-255"] {
            assert_eq!(format_vf_range(parse_vf_range(text).unwrap()), text);
        }
    }

    #[test]
    fn pf_name_selectors_parse_with_and_without_ranges() {
        assert_eq!(
            PfNameSelector::parse("ens1f0").unwrap(),
            PfNameSelector {
                name: "ens1f0".into(),
                vfs: None
            }
        );
        assert_eq!(
            PfNameSelector::parse("ens1f0#0-1,6").unwrap().vfs,
            Some(vec![0, 1, 6])
        );
        assert_eq!(
            PfNameSelector::parse("#0-3").unwrap_err().to_string(),
            "pfNames entry \"#0-3\" has no interface name"
        );
        // The range's error is the source, said once.
        assert_eq!(
            crate::error_chain(&PfNameSelector::parse("ens1f0#3-1").unwrap_err()),
            "pfNames entry \"ens1f0#3-1\": vfRange part \"3-1\" runs backwards"
        );
        assert!(PfNameSelector::parse("a-very-long-interface-name").is_err());
    }
}
