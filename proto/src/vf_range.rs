//! VF index ranges as people write them (`"0-3"`, `"2"`, `"0-1,4"`), and
//! PF name selectors with an optional range (`"ens1f0#0-3"`), shared by the
//! agent, the controller and the admission webhook so all three read them
//! the same way.

use std::collections::BTreeSet;

/// Parses `"0-3"`, `"2"`, `"0-1,4"` into sorted VF indexes.
///
/// # Errors
/// A sentence naming the bad part: empty, not a number, backwards, or an
/// index named twice.
pub fn parse_vf_range(text: &str) -> Result<Vec<u16>, String> {
    let mut indexes = BTreeSet::new();
    if text.trim().is_empty() {
        return Err("vfRange is empty".to_owned());
    }
    for part in text.split(',') {
        let part = part.trim();
        let bad = || format!("vfRange part {part:?} is not N or N-M");
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
            return Err(format!("vfRange part {part:?} runs backwards"));
        }
        for index in start..=end {
            if !indexes.insert(index) {
                return Err(format!("vfRange {text:?} names VF {index} twice"));
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
    /// An empty or over-long interface name, or a bad range.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, range) = match text.split_once('#') {
            Some((name, range)) => (name, Some(range)),
            None => (text, None),
        };
        if name.is_empty() {
            return Err(format!("pfNames entry {text:?} has no interface name"));
        }
        // IFNAMSIZ is 16 with the terminating NUL.
        if name.len() > 15 || name.contains(['/', ' ', ':']) {
            return Err(format!(
                "pfNames entry {text:?}: {name:?} is not an interface name"
            ));
        }
        let vfs = range
            .map(|r| parse_vf_range(r).map_err(|e| format!("pfNames entry {text:?}: {e}")))
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
        assert!(parse_vf_range("3-1").unwrap_err().contains("backwards"));
        assert!(parse_vf_range("").unwrap_err().contains("empty"));
        assert!(parse_vf_range("1,1").unwrap_err().contains("twice"));
        assert!(parse_vf_range("a-2").unwrap_err().contains("\"a-2\""));
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
        assert!(
            PfNameSelector::parse("#0-3")
                .unwrap_err()
                .contains("no interface name")
        );
        assert!(
            PfNameSelector::parse("ens1f0#3-1")
                .unwrap_err()
                .contains("backwards")
        );
        assert!(PfNameSelector::parse("a-very-long-interface-name").is_err());
    }
}
