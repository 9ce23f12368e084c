//! What the scale bench reads off the processes it measures: Prometheus
//! text (the API server's and etcd's own metrics) and a process's CPU time
//! and memory from `/proc`.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::Duration;

/// Why a reading failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadingError {
    /// A `/proc` file or a socket could not be read.
    #[error("reading {what}")]
    Io {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `/proc` file did not hold what it should.
    #[error("{what}: {problem}")]
    Malformed {
        /// What.
        what: String,
        /// What was wrong.
        problem: String,
    },
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric's name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// The samples of a Prometheus text exposition. Comment lines and lines
/// that do not parse are skipped.
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (series, value) = match line.find('}') {
        Some(end) => (&line[..=end], line[end + 1..].split_whitespace().next()?),
        None => {
            let mut parts = line.split_whitespace();
            (parts.next()?, parts.next()?)
        }
    };
    let value = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some(Sample {
            name: series.to_owned(),
            labels: BTreeMap::new(),
            value,
        });
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest.strip_suffix('}')?;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut chars = after.char_indices();
        let mut text = String::new();
        let end = loop {
            let (at, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => text.push('\n'),
                    other => text.push(other),
                },
                '"' => break at,
                other => text.push(other),
            }
        };
        labels.insert(key.trim_start_matches(',').trim().to_owned(), text);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Sums of `name`'s samples grouped by the values of `keys` (joined by
/// ` `, an absent label as `-`).
pub fn sum_by(samples: &[Sample], name: &str, keys: &[&str]) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for sample in samples.iter().filter(|s| s.name == name) {
        let key = keys
            .iter()
            .map(|k| {
                sample
                    .labels
                    .get(*k)
                    .map_or("-", |v| if v.is_empty() { "-" } else { v })
            })
            .collect::<Vec<_>>()
            .join(" ");
        *sums.entry(key).or_insert(0.0) += sample.value;
    }
    sums
}

/// `after - before` for every key, keeping those that grew.
pub fn growth(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    let mut grown: Vec<(String, f64)> = after
        .iter()
        .map(|(key, value)| (key.clone(), value - before.get(key).copied().unwrap_or(0.0)))
        .filter(|(_, delta)| *delta > 0.0)
        .collect();
    grown.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    grown
}

/// The body of `GET <path>` over plain HTTP/1.0 to `address` (etcd's
/// metrics on its client port).
///
/// # Errors
/// Connecting, writing or reading failed.
pub fn http_get(address: &str, path: &str) -> Result<String, ReadingError> {
    let io = |source| ReadingError::Io {
        what: format!("http://{address}{path}"),
        source,
    };
    let mut stream = std::net::TcpStream::connect(address).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").map_err(io)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(response.as_str(), |(_, body)| body)
        .to_owned())
}

/// A process's CPU time and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessReading {
    /// User plus system CPU time since it started.
    pub cpu: Duration,
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// The largest resident set size so far, KiB.
    pub peak_rss_kib: u64,
}

/// Reads `<proc_root>/<pid>/stat` and `status`; `ticks_per_second` is the
/// kernel's clock tick (`sysconf(_SC_CLK_TCK)`).
///
/// # Errors
/// Missing or malformed files (the process is gone).
pub fn read_process(
    proc_root: &Path,
    pid: u32,
    ticks_per_second: u64,
) -> Result<ProcessReading, ReadingError> {
    let dir = proc_root.join(pid.to_string());
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|source| ReadingError::Io {
            what: dir.join(name).display().to_string(),
            source,
        })
    };
    let malformed = |problem: &str| ReadingError::Malformed {
        what: dir.display().to_string(),
        problem: problem.to_owned(),
    };
    let stat = read("stat")?;
    // Fields after the command (which may hold spaces) in parentheses;
    // utime and stime are the 14th and 15th fields of the line.
    let after = stat
        .rsplit_once(')')
        .ok_or_else(|| malformed("no ')' in stat"))?
        .1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64, ReadingError> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| malformed("stat too short"))
    };
    let total_ticks = ticks(11)? + ticks(12)?;
    let status = read("status")?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let ticks_per_second = ticks_per_second.max(1);
    Ok(ProcessReading {
        cpu: Duration::from_millis(total_ticks * 1000 / ticks_per_second),
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

/// The process that does the work under `pid`: `pid` itself, or its one
/// child when `pid` is a supervisor (the bench's restart loop around a
/// controller, standing for the kubelet restarting a pod's container).
pub fn working_process(proc_root: &Path, pid: u32) -> u32 {
    let children =
        std::fs::read_to_string(proc_root.join(format!("{pid}/task/{pid}/children"))).unwrap_or_default();
    let mut children = children.split_whitespace().filter_map(|c| c.parse::<u32>().ok());
    match (children.next(), children.next()) {
        (Some(child), None) => child,
        _ => pid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_lines_parse_with_labels_escapes_and_without() {
        let text = "# HELP x y\n# TYPE apiserver_request_total counter\n\
            apiserver_request_total{code=\"200\",resource=\"nodestates\",subresource=\"status\",verb=\"APPLY\"} 42\n\
            apiserver_request_total{code=\"201\",resource=\"events\",subresource=\"\",verb=\"POST\"} 3\n\
            odd{path=\"a\\\"b,c\"} 1.5e3\n\
            etcd_mvcc_db_total_size_in_bytes 1.2288e+06\n\
            garbage line\n";
        let samples = parse_prometheus(text);
        assert_eq!(samples.len(), 4, "{samples:?}");
        assert_eq!(samples[0].labels["subresource"], "status");
        assert_eq!(samples[0].value, 42.0);
        assert_eq!(samples[2].labels["path"], "a\"b,c");
        assert_eq!(samples[2].value, 1500.0);
        assert_eq!(samples[3].name, "etcd_mvcc_db_total_size_in_bytes");
        assert_eq!(samples[3].value, 1_228_800.0);
        let by = sum_by(
            &samples,
            "apiserver_request_total",
            &["verb", "resource", "subresource"],
        );
        assert_eq!(by["APPLY nodestates status"], 42.0);
        assert_eq!(by["POST events -"], 3.0);
    }

    #[test]
    fn growth_keeps_what_grew_largest_first() {
        let before = BTreeMap::from([("a".to_owned(), 5.0), ("b".to_owned(), 1.0)]);
        let after = BTreeMap::from([
            ("a".to_owned(), 5.0),
            ("b".to_owned(), 4.0),
            ("c".to_owned(), 9.0),
        ]);
        assert_eq!(
            growth(&before, &after),
            [("c".to_owned(), 9.0), ("b".to_owned(), 3.0)]
        );
    }

    #[test]
    fn a_process_reading_comes_from_stat_and_status() {
        let dir = std::env::temp_dir().join(format!("vfplane-readings-{}", std::process::id()));
        let proc_dir = dir.join("77");
        std::fs::create_dir_all(&proc_dir).unwrap();
        std::fs::write(
            proc_dir.join("stat"),
            "77 (vfplane-contr oller) S 1 77 77 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1 2 3\n",
        )
        .unwrap();
        std::fs::write(
            proc_dir.join("status"),
            "Name:\tx\nVmHWM:\t  20480 kB\nVmRSS:\t  10240 kB\n",
        )
        .unwrap();
        let reading = read_process(&dir, 77, 100).unwrap();
        assert_eq!(
            reading,
            ProcessReading {
                cpu: Duration::from_secs(3),
                rss_kib: 10240,
                peak_rss_kib: 20480
            }
        );
        assert!(read_process(&dir, 78, 100).is_err(), "a gone process is an error");
        let _ = std::fs::remove_dir_all(dir);
    }
}
