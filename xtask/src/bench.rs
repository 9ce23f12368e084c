//! `cargo xtask bench driver`: the igbvf driver's instructions per packet
//! in `rx_burst` and `tx_burst`, counted by callgrind on the device model
//! with the model's own work left out, and ns/packet measured natively.
//!
//! The workload is the driver's `burst_cost` example (its module docs say
//! how the model is kept out of the measured calls). Per batch size it runs
//! twice under callgrind:
//!
//! - driver only: collection toggled on by the example's
//!   `measured_rx_burst` / `measured_tx_burst` and off again inside the
//!   model's `RegisterSpace` methods; their inclusive costs are the figures;
//! - driver and model: the same without the model's toggles.
//!
//! The figures are refused unless the driver-only run shows no cost in any
//! function of `vfplane_driver::model`, the model's register functions did
//! run in the second (they were called out of line, so the toggles reached
//! them), and the two runs differ by exactly those functions' cost. A
//! change to the model therefore cannot pass for a faster driver.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};

/// The example's functions the counts are taken in.
const RX_FN: &str = "burst_cost::measured_rx_burst";
const TX_FN: &str = "burst_cost::measured_tx_burst";
/// Where the example zeroes the counts (bring-up and warm-up left out).
const START_FN: &str = "burst_cost::measurement_starts";
/// The model's register access: the driver's only way into model code.
const MODEL_REGS: &str = "<vfplane_driver::model::ModelRegisters as vfplane_driver::regs::RegisterSpace>::";
/// Any function of the model.
const MODEL_MODULE: &str = "vfplane_driver::model::";

/// What `bench driver` measures.
#[derive(Debug, Clone)]
pub struct DriverBenchOptions {
    /// Batch sizes, one row each.
    pub batches: Vec<usize>,
    /// Packets counted under callgrind per batch size.
    pub packets: usize,
    /// Packets per timed run.
    pub timed_packets: usize,
    /// Timed runs per batch size (the median is reported).
    pub runs: usize,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct DriverRow {
    /// Packets per burst.
    pub batch: usize,
    /// Driver instructions per packet in `rx_burst`.
    pub rx: f64,
    /// Driver instructions per packet in `tx_burst`.
    pub tx: f64,
    /// The model's instructions per packet behind the driver's register
    /// writes, left out of `rx` and `tx`.
    pub model: f64,
    /// Median ns per packet of `rx_burst` + `tx_burst`, natively.
    pub ns: f64,
}

/// The table and where the driver's instructions go.
#[derive(Debug, Clone)]
pub struct DriverReport {
    /// One row per batch size.
    pub rows: Vec<DriverRow>,
    /// For the batch nearest 32: (function, exclusive instructions per
    /// packet), most first.
    pub breakdown: (usize, Vec<(String, f64)>),
}

impl DriverReport {
    /// The table as printed.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "igbvf driver on the device model, 60-byte frames: instructions per packet (callgrind, \
             driver code only) and ns per packet (median of native runs)"
        );
        let _ = writeln!(
            out,
            "{:>5}  {:>8}  {:>8}  {:>8}  {:>13}  {:>9}",
            "batch", "rx", "tx", "total", "model (excl.)", "ns/packet"
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "{:>5}  {:>8.1}  {:>8.1}  {:>8.1}  {:>13.1}  {:>9.1}",
                r.batch,
                r.rx,
                r.tx,
                r.rx + r.tx,
                r.model,
                r.ns
            );
        }
        let (batch, functions) = &self.breakdown;
        let _ = writeln!(
            out,
            "\nwhere the driver's instructions go at batch {batch} (exclusive, per packet, inlined code counted in its caller):"
        );
        for (name, per_packet) in functions {
            let _ = writeln!(out, "  {per_packet:>7.1}  {name}");
        }
        out
    }
}

/// Builds the example, counts and times every batch size.
///
/// # Errors
/// When valgrind or the build is missing or fails, or the counts do not
/// separate the driver from the model.
pub fn driver(workspace: &Path, options: &DriverBenchOptions) -> Result<DriverReport> {
    let valgrind = Command::new("valgrind").arg("--version").output();
    ensure!(
        valgrind.is_ok_and(|o| o.status.success()),
        "valgrind not found: install it (Debian: apt-get install valgrind)"
    );
    let binary = build(workspace)?;
    let out_dir = workspace.join("target/bench/driver");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut rows = Vec::new();
    let mut breakdown = (0, Vec::new());
    let breakdown_batch = options
        .batches
        .iter()
        .copied()
        .min_by_key(|b| b.abs_diff(32))
        .unwrap_or(32);
    for &batch in &options.batches {
        let driver_only = callgrind(&binary, &out_dir, batch, options.packets, true)?;
        let with_model = callgrind(&binary, &out_dir, batch, options.packets, false)?;
        let packets = driver_only.packets as f64;
        let (rx, tx) = (driver_only.inclusive(RX_FN)?, driver_only.inclusive(TX_FN)?);
        if let Some((name, cost)) = driver_only
            .exclusive
            .iter()
            .find(|(name, cost)| name.contains(MODEL_MODULE) && **cost > 0)
        {
            bail!("batch {batch}: {cost} instructions of the model ({name}) counted as the driver's");
        }
        let model: u64 = with_model
            .inclusive
            .iter()
            .filter(|(name, _)| name.starts_with(MODEL_REGS))
            .map(|(_, cost)| cost)
            .sum();
        ensure!(
            model > 0,
            "batch {batch}: no cost in the model's register functions: inlined into the driver, \
             they cannot be told apart from it"
        );
        let difference = (with_model.inclusive(RX_FN)? + with_model.inclusive(TX_FN)?).checked_sub(rx + tx);
        ensure!(
            difference == Some(model),
            "batch {batch}: counting the model adds {difference:?} instructions, its register \
             functions cost {model}: some model work is not behind them"
        );
        if batch == breakdown_batch {
            let mut functions: Vec<(String, f64)> = driver_only
                .exclusive
                .iter()
                .filter(|(_, cost)| **cost > 0)
                .map(|(name, cost)| (name.clone(), *cost as f64 / packets))
                .collect();
            functions.sort_by(|a, b| b.1.total_cmp(&a.1));
            breakdown = (batch, functions);
        }
        let ns = timed(&binary, batch, options.timed_packets, options.runs)?;
        let row = DriverRow {
            batch,
            rx: rx as f64 / packets,
            tx: tx as f64 / packets,
            model: model as f64 / packets,
            ns,
        };
        eprintln!(
            "bench driver: batch {batch}: rx {:.1} + tx {:.1} = {:.1} instructions/packet, {:.1} ns/packet",
            row.rx,
            row.tx,
            row.rx + row.tx,
            row.ns
        );
        rows.push(row);
    }
    Ok(DriverReport { rows, breakdown })
}

/// Builds `burst_cost` optimised, as the guest's binaries are built (so
/// their compiled dependencies are reused); returns the executable.
fn build(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(&cargo)
        .current_dir(workspace)
        .env("RUSTFLAGS", xtask::testbed::GUEST_RUSTFLAGS)
        .args(["build", "--release", "--target", xtask::testbed::GUEST_TARGET])
        .args([
            "-p",
            "vfplane-driver",
            "--features",
            "model",
            "--example",
            "burst_cost",
        ])
        .arg("--message-format=json-render-diagnostics")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo build")?;
    ensure!(
        output.status.success(),
        "cargo build of the burst_cost example failed"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["target"]["name"] == "burst_cost")
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the burst_cost executable")
}

/// One callgrind run's costs.
#[derive(Debug)]
struct Profile {
    packets: u64,
    inclusive: BTreeMap<String, u64>,
    exclusive: BTreeMap<String, u64>,
}

impl Profile {
    fn inclusive(&self, function: &str) -> Result<u64> {
        self.inclusive
            .get(function)
            .copied()
            .with_context(|| format!("callgrind saw no {function}"))
    }
}

fn callgrind(
    binary: &Path,
    out_dir: &Path,
    batch: usize,
    packets: usize,
    driver_only: bool,
) -> Result<Profile> {
    let kind = if driver_only { "driver" } else { "driver+model" };
    let file = out_dir.join(format!("callgrind.batch{batch}.{kind}.out"));
    let mut command = Command::new("valgrind");
    command
        .args(["-q", "--tool=callgrind", "--collect-atstart=no"])
        .arg(format!("--callgrind-out-file={}", file.display()))
        .arg(format!("--zero-before=*{START_FN}"))
        .arg(format!("--toggle-collect=*{RX_FN}"))
        .arg(format!("--toggle-collect=*{TX_FN}"));
    if driver_only {
        command.arg(format!("--toggle-collect={MODEL_REGS}*"));
    }
    let output = command
        .arg(binary)
        .args(["--mode", "count", "--batch", &batch.to_string()])
        .args(["--packets", &packets.to_string()])
        .output()
        .context("running valgrind")?;
    ensure!(
        output.status.success(),
        "burst_cost under callgrind failed (batch {batch}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let packets: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .context("burst_cost printed no packet count")?;
    let costs = read_profile(&file)?;
    Ok(Profile {
        packets,
        inclusive: costs.inclusive,
        exclusive: costs.exclusive,
    })
}

/// Costs per function, read from callgrind's output file.
///
/// Not through `callgrind_annotate`: where calls were made before the
/// counts were zeroed (`--zero-before`), callgrind records them with
/// `calls=0`, and callgrind_annotate 3.19 then charges their inclusive
/// cost to the caller's own, so `main` showed every instruction as its own.
/// Here a cost line right after a `calls=` line is always a call's
/// (inclusive) cost, and every other cost line the function's own.
fn read_profile(file: &Path) -> Result<Costs> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    parse_callgrind(&text).with_context(|| format!("reading {}", file.display()))
}

/// Instructions per function: its own and with its callees.
#[derive(Debug, Default)]
struct Costs {
    exclusive: BTreeMap<String, u64>,
    inclusive: BTreeMap<String, u64>,
}

/// Parses callgrind's format (one event, Ir; name compression `(id) name`).
fn parse_callgrind(text: &str) -> Result<Costs> {
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    // Resolves `(id) name` (defining id) or `(id)` or a bare name.
    let mut resolve = |spec: &str| -> Result<String> {
        let spec = spec.trim();
        let Some(rest) = spec.strip_prefix('(') else {
            return Ok(spec.to_owned());
        };
        let (id, name) = rest.split_once(')').context("a bad compressed name")?;
        let name = name.trim();
        if name.is_empty() {
            names
                .get(id)
                .cloned()
                .with_context(|| format!("name ({id}) used before it is defined"))
        } else {
            names.insert(id.to_owned(), name.to_owned());
            Ok(name.to_owned())
        }
    };
    let mut costs = Costs::default();
    let mut function: Option<String> = None;
    let mut callee: Option<String> = None;
    let mut call_cost_next = false;
    for line in text.lines() {
        if let Some(spec) = line.strip_prefix("fn=") {
            let name = resolve(spec)?;
            costs.exclusive.entry(name.clone()).or_insert(0);
            costs.inclusive.entry(name.clone()).or_insert(0);
            function = Some(name);
        } else if let Some(spec) = line.strip_prefix("cfn=") {
            callee = Some(resolve(spec)?);
        } else if line.starts_with("calls=") {
            call_cost_next = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '*')) {
            let cost: u64 = match line.split_whitespace().nth(1) {
                Some(cost) => cost
                    .parse()
                    .with_context(|| format!("a bad cost line {line:?}"))?,
                None => 0,
            };
            let function = function.clone().context("a cost line before any fn=")?;
            *costs.inclusive.entry(function.clone()).or_insert(0) += cost;
            if call_cost_next {
                call_cost_next = false;
                callee.take().context("a call cost without cfn=")?;
            } else {
                *costs.exclusive.entry(function).or_insert(0) += cost;
            }
        }
    }
    ensure!(!costs.exclusive.is_empty(), "no functions in callgrind's output");
    Ok(costs)
}

/// Median ns/packet of `runs` native runs.
fn timed(binary: &Path, batch: usize, packets: usize, runs: usize) -> Result<f64> {
    let output = Command::new(binary)
        .args(["--mode", "time", "--batch", &batch.to_string()])
        .args(["--packets", &packets.to_string(), "--runs", &runs.to_string()])
        .output()
        .context("running burst_cost")?;
    ensure!(
        output.status.success(),
        "burst_cost --mode time failed (batch {batch}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .context("burst_cost printed no ns/packet")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callgrind_costs_are_read_per_function() {
        // As callgrind writes it after --zero-before: `main`'s call was made
        // before the zeroing (calls=0) and is still not its own cost.
        let text = "\
events: Ir
summary: 1100

ob=(1) /t/burst_cost
fl=(1) ???
fn=(2) burst_cost::measured_rx_burst
0 100
cfn=(3) vfplane_driver::mempool::Mempool::alloc
calls=8 0
0 900

fn=(3)
0 900

fn=(4) main
cfn=(2)
calls=0 0
0 1000
+2 100
totals: 1100
";
        let costs = parse_callgrind(text).unwrap();
        assert_eq!(costs.exclusive["burst_cost::measured_rx_burst"], 100);
        assert_eq!(costs.inclusive["burst_cost::measured_rx_burst"], 1000);
        assert_eq!(costs.exclusive["vfplane_driver::mempool::Mempool::alloc"], 900);
        assert_eq!(costs.exclusive["main"], 100);
        assert_eq!(costs.inclusive["main"], 1100);
    }
}
