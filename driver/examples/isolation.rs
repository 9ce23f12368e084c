//! IOMMU isolation proof, for the testbed only: tells the VF to DMA to and
//! from memory this process never mapped for it, and shows nothing got
//! through.
//!
//! A 4 KiB canary page is filled with 0xA5 and locked; its *physical*
//! address (from /proc/self/pagemap, root only) is what a device without an
//! IOMMU would reach. Then:
//! 1. TX: a descriptor pointing at the canary's physical address, followed
//!    by one ordinary marker frame (seq 0xC0FFEE). The device's read must be
//!    refused (a DMAR read fault), so only the marker leaves the NIC.
//! 2. RX: the next RX descriptor is pointed at the canary's physical address;
//!    after `{"phase":"rx_armed"}` the host sends frames. The device's write
//!    must be refused (a DMAR write fault) and the canary stay 0xA5; then the
//!    descriptor is restored and a later frame is received normally.
//!
//! `isolation [--pci ..] [--dst MAC] [--timeout 30]`

mod common;

use std::time::{Duration, Instant};

use common::{Args, ETHERTYPE_TEST, check_frame, emit, fill_frame, identity, open, run};
use vfplane_driver::{MacAddress, NicDevice};

const PAGE: usize = 4096;
const MARKER: u32 = 0x00C0_FFEE;

/// A locked, 0xA5-filled page and its physical address.
struct Canary {
    ptr: *mut u8,
    phys: u64,
}

impl Canary {
    fn new() -> Result<Self, String> {
        // SAFETY: a fresh private anonymous page; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let ptr = ptr.cast::<u8>();
        // SAFETY: `ptr` is a fresh mapping of PAGE bytes that only we use.
        unsafe { std::ptr::write_bytes(ptr, 0xA5, PAGE) };
        // SAFETY: locking our own mapping keeps its physical page fixed.
        if unsafe { libc::mlock(ptr.cast(), PAGE) } != 0 {
            return Err(format!("mlock: {}", std::io::Error::last_os_error()));
        }
        let entry = {
            use std::os::unix::fs::FileExt as _;
            let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
            let mut word = [0u8; 8];
            pagemap
                .read_exact_at(&mut word, (ptr as u64 / PAGE as u64) * 8)
                .map_err(|e| format!("pagemap: {e}"))?;
            u64::from_le_bytes(word)
        };
        let pfn = entry & ((1 << 55) - 1);
        if entry >> 63 == 0 || pfn == 0 {
            return Err("the canary's physical address is not readable (run as root)".to_owned());
        }
        Ok(Self {
            ptr,
            phys: pfn * PAGE as u64,
        })
    }

    fn intact(&self) -> bool {
        // SAFETY: our own mapped page; volatile because we ask whether
        // anything outside the program changed it.
        (0..PAGE).all(|i| unsafe { self.ptr.add(i).read_volatile() } == 0xA5)
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), PAGE) };
    }
}

fn main() {
    run("isolation", || {
        let args = Args::parse()?;
        let timeout = Duration::from_secs_f64(args.num("timeout", 30.0)?);
        let dst = args
            .get("dst")
            .unwrap_or("ff:ff:ff:ff:ff:ff")
            .parse::<MacAddress>()
            .map_err(|e| e.to_string())?
            .0;
        let pci = args.pci()?;
        let mut dev = open(&args)?;
        let canary = Canary::new()?;
        let mut line = identity(&dev, &pci);
        line["tool"] = "isolation".into();
        line["canary_phys"] = format!("{:#x}", canary.phys).into();

        // 1. TX from unmapped memory, then a marker frame.
        let (_, tx0, _, _) = dev.hw_counters();
        // SAFETY: the canary is never mapped for the device's DMA (its
        // physical address is used as an IOVA no mapping covers), which is
        // what this test proves the IOMMU enforces.
        if !unsafe { dev.tx_raw_descriptor_for_isolation_test(canary.phys, 64) } {
            return Err("TX ring full".to_owned());
        }
        let mut marker = dev.mempool().alloc().ok_or("mempool empty")?;
        marker.set_len(64);
        let src = dev.mac().0;
        fill_frame(marker.as_mut_slice(), dst, src, ETHERTYPE_TEST, MARKER);
        let mut batch = vec![marker];
        while dev.tx_burst(&mut batch) == 0 {}
        std::thread::sleep(Duration::from_millis(200));
        let (_, tx1, _, _) = dev.hw_counters();
        line["tx_hw_packets"] = tx1.wrapping_sub(tx0).into();
        line["tx_reclaimed"] = (dev.tx_reclaim_all() as u64).into();
        line["canary_intact_after_tx"] = canary.intact().into();

        // 2. RX into unmapped memory.
        // SAFETY: as above, an IOVA no DMA mapping of the device covers.
        unsafe { dev.rx_point_next_descriptor_for_isolation_test(Some(canary.phys)) };
        let mut armed = identity(&dev, &pci);
        armed["tool"] = "isolation".into();
        armed["phase"] = "rx_armed".into();
        armed["canary_phys"] = format!("{:#x}", canary.phys).into();
        emit(&armed);
        let mut out = Vec::with_capacity(64);
        let deadline = Instant::now() + timeout;
        // The first frame lands in the redirected descriptor.
        let mut first_len = None;
        while first_len.is_none() && Instant::now() < deadline {
            if dev.rx_burst(&mut out, 1) > 0 {
                first_len = out.first().map(|b| b.len());
            }
        }
        let intact = canary.intact();
        out.clear();
        // SAFETY: `None` puts the descriptor's own buffer back.
        unsafe { dev.rx_point_next_descriptor_for_isolation_test(None) };
        // Later frames arrive whole.
        let mut good_after = 0u64;
        let after_deadline = Instant::now() + Duration::from_secs(10).min(timeout);
        while good_after == 0 && Instant::now() < after_deadline {
            if dev.rx_burst(&mut out, 64) > 0 {
                good_after += out
                    .drain(..)
                    .filter(|b| check_frame(b.as_slice()).is_some())
                    .count() as u64;
            }
        }
        line["rx_redirected_completed"] = first_len.is_some().into();
        line["canary_intact"] = (intact && canary.intact()).into();
        line["rx_good_after_restore"] = good_after.into();
        line["still_alive"] = dev.link().up.into();
        emit(&line);
        Ok(())
    });
}
