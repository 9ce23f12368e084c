//! What the example programs share: arguments, opening the VF, JSON lines.
#![allow(dead_code)]

use std::time::Duration;

use vfplane_driver::igbvf::{IgbVf, IgbVfConfig};
use vfplane_driver::vfio::VfioVf;
use vfplane_driver::{MacAddress, NicDevice};
use vfplane_guest_insns::marker::{Mark, mark};

/// Ethertype of test frames (IEEE local experimental 1).
pub const ETHERTYPE_TEST: u16 = 0x88b5;
/// Ethertype of warm-up frames (local experimental 2).
pub const ETHERTYPE_WARMUP: u16 = 0x88b6;

/// Parsed `--name value` arguments.
#[derive(Debug, Default)]
pub struct Args {
    pairs: Vec<(String, String)>,
}

impl Args {
    pub fn parse() -> Result<Self, String> {
        let mut pairs = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(name) = it.next() {
            let Some(name) = name.strip_prefix("--") else {
                return Err(format!("unexpected argument {name:?}"));
            };
            let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            pairs.push((name.to_owned(), value));
        }
        Ok(Self { pairs })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{name} {v:?} is not a number")),
        }
    }

    /// `--pci`, else the first VF of `PCIDEVICE_VFPLANE_IO_*`.
    pub fn pci(&self) -> Result<String, String> {
        if let Some(pci) = self.get("pci") {
            return Ok(pci.to_owned());
        }
        let vfs = vfplane_driver::env::vfs_from_env().map_err(|e| e.to_string())?;
        vfs.first()
            .map(|v| v.pci.clone())
            .ok_or_else(|| "no VF".to_owned())
    }
}

/// Opens the VF and waits for link (`--link-timeout` seconds, default 20).
pub fn open(args: &Args) -> Result<IgbVf<VfioVf>, String> {
    let pci = args.pci()?;
    let mut config = IgbVfConfig::default();
    if let Some(mac) = args.get("mac") {
        config.mac = Some(mac.parse::<MacAddress>().map_err(|e| e.to_string())?);
    }
    config.rx_ring_size = args.num("rx-ring", config.rx_ring_size)?;
    config.tx_ring_size = args.num("tx-ring", config.tx_ring_size)?;
    let pages = match (args.get("pages"), args.get("hugepages-dir")) {
        (Some(_), Some(_)) => return Err("--pages and --hugepages-dir exclude each other".to_owned()),
        (None, Some(dir)) => vfplane_driver::dma::PagePolicy::HugetlbfsDir(dir.into()),
        (None | Some("auto"), None) => vfplane_driver::dma::PagePolicy::Auto,
        (Some("huge"), None) => vfplane_driver::dma::PagePolicy::Hugepages,
        (Some("small"), None) => vfplane_driver::dma::PagePolicy::SmallPages,
        (Some(other), None) => return Err(format!("--pages {other:?}: auto, huge or small")),
    };
    let mut dev = vfplane_driver::open_igbvf_with(&pci, &config, pages).map_err(|e| chain(&e))?;
    let link_timeout = Duration::from_secs_f64(args.num("link-timeout", 20.0)?);
    dev.wait_for_link(link_timeout).map_err(|e| chain(&e))?;
    Ok(dev)
}

/// An error with its sources, one line.
pub use vfplane_driver::error_chain as chain;

/// The device's identity as JSON fields, with the pages behind its DMA
/// memory (`dma_page_size`: 2097152 for 2 MiB hugepages, 4096 for 4 KiB
/// pages, null when its regions differ) and the NUMA nodes it is on
/// (`dma_numa_nodes`, or `dma_numa_nodes_error`).
pub fn identity(dev: &IgbVf<VfioVf>, pci: &str) -> serde_json::Value {
    let pages = dev.dma_page_sizes();
    let numa = match dev.dma_numa_nodes() {
        Ok(nodes) => serde_json::json!({ "dma_numa_nodes": nodes }),
        Err(error) => serde_json::json!({ "dma_numa_nodes_error": error.to_string() }),
    };
    let mut identity = serde_json::json!({
        "pci": pci,
        "mac": dev.mac().to_string(),
        "link_up": dev.link().up,
        "speed_mbps": dev.link().speed_mbps,
        "dma_page_size": pages.uniform(),
        "dma_pages": {"mempool": pages.mempool, "rx_ring": pages.rx_ring, "tx_ring": pages.tx_ring},
    });
    if let (Some(fields), serde_json::Value::Object(numa)) = (identity.as_object_mut(), numa) {
        fields.extend(numa);
    }
    identity
}

/// User plus system CPU time of this process so far, in seconds, from
/// `/proc/self/stat` (fields 14 and 15, in clock ticks).
pub fn cpu_seconds() -> Result<f64, String> {
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(|e| format!("/proc/self/stat: {e}"))?;
    // The command name (field 2) may hold spaces: count from after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("/proc/self/stat: no ')'")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let ticks = |i: usize| -> Result<u64, String> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("/proc/self/stat: field {i}"))
    };
    // SAFETY: sysconf reads a system constant; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return Err("sysconf(_SC_CLK_TCK) failed".to_owned());
    }
    Ok((ticks(14)? + ticks(15)?) as f64 / hz as f64)
}

/// Prints one JSON line and flushes.
pub fn emit(value: &serde_json::Value) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Runs `body`, printing `{"tool":..,"error":..}` and exiting 1 on error.
pub fn run(tool: &str, body: impl FnOnce() -> Result<(), String>) {
    // Driver logs on stderr, filtered by VFPLANE_LOG (default: warnings).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VFPLANE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    if let Err(error) = body() {
        emit(&serde_json::json!({"tool": tool, "error": error}));
        std::process::exit(1);
    }
}

/// Writes a test frame: dst, src, ethertype, sequence number, pattern.
pub fn fill_frame(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16, seq: u32) {
    buf[..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
    buf[14..18].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in buf.iter_mut().enumerate().skip(18) {
        *b = (i as u32 ^ seq) as u8;
    }
}

/// Whether `frame` is a well-formed test frame; its sequence number if so.
pub fn check_frame(frame: &[u8]) -> Option<u32> {
    if frame.len() < 18 || frame[12..14] != ETHERTYPE_TEST.to_be_bytes() {
        return None;
    }
    let seq = u32::from_be_bytes([frame[14], frame[15], frame[16], frame[17]]);
    frame
        .iter()
        .enumerate()
        .skip(18)
        .all(|(i, &b)| b == (i as u32 ^ seq) as u8)
        .then_some(seq)
}

/// A receiver's span of the testbed's instruction count
/// (`vfplane-guest-insns`): it begins once the first frames are in (the
/// wait for them left out) and runs to the last.
#[derive(Debug, Default)]
pub struct ReceiveSpan {
    from: Option<u64>,
}

impl ReceiveSpan {
    /// After frames were received and handled, `good` counted so far.
    pub fn received(&mut self, good: u64) {
        if self.from.is_none() {
            mark(Mark::SpanBegin);
            self.from = Some(good);
        } else {
            mark(Mark::SpanPoint);
        }
    }

    /// Ends the span; returns the frames in it (those after its beginning).
    pub fn end(self, good: u64) -> u64 {
        mark(Mark::SpanEnd);
        self.from.map_or(0, |from| good - from)
    }
}
