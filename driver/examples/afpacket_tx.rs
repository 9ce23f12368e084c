//! The kernel-path baseline for `pktgen`: sends `--count` frames of
//! `--size` bytes through an AF_PACKET socket on `--iface` (a VF on igbvf,
//! or the PF on igb), same frame layout as pktgen, one `sendto` per frame.
//!
//! `afpacket_tx --iface eth1 [--count 10000] [--size 60] [--dst MAC] [--warmup 0]`

mod common;

use std::time::Instant;

use common::{Args, ETHERTYPE_TEST, ETHERTYPE_WARMUP, emit, fill_frame, run};
use vfplane_driver::MacAddress;
use vfplane_guest_insns::marker::{Mark, mark};

struct Socket(i32);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

fn send_all(
    sock: &Socket,
    ifindex: i32,
    frame: &mut [u8],
    dst: [u8; 6],
    src: [u8; 6],
    ethertype: u16,
    count: u32,
) -> Result<(), String> {
    let mut addr: libc::sockaddr_ll = unsafe_zeroed_sockaddr_ll();
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst);
    for seq in 0..count {
        fill_frame(frame, dst, src, ethertype, seq);
        loop {
            // SAFETY: `frame` and `addr` are valid for the lengths passed.
            let n = unsafe {
                libc::sendto(
                    sock.0,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n >= 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOBUFS) {
                return Err(format!("sendto: {err}"));
            }
        }
    }
    Ok(())
}

fn unsafe_zeroed_sockaddr_ll() -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

fn main() {
    run("afpacket_tx", || {
        let args = Args::parse()?;
        let iface = args.get("iface").ok_or("--iface is required")?.to_owned();
        let count: u32 = args.num("count", 10_000)?;
        let size: usize = args.num("size", 60)?;
        let warmup: u32 = args.num("warmup", 0)?;
        let dst = args
            .get("dst")
            .unwrap_or("ff:ff:ff:ff:ff:ff")
            .parse::<MacAddress>()
            .map_err(|e| e.to_string())?
            .0;
        let mac_text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
            .map_err(|e| format!("{iface}: {e}"))?;
        let src = mac_text
            .trim()
            .parse::<MacAddress>()
            .map_err(|e| e.to_string())?
            .0;
        let ifindex: i32 = std::fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
            .map_err(|e| format!("{iface}: {e}"))?
            .trim()
            .parse()
            .map_err(|_| "bad ifindex".to_owned())?;
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let sock = Socket(fd);
        let mut frame = vec![0u8; size];
        if warmup > 0 {
            send_all(&sock, ifindex, &mut frame, dst, src, ETHERTYPE_WARMUP, warmup)?;
        }
        let started = Instant::now();
        mark(Mark::SpanBegin);
        send_all(&sock, ifindex, &mut frame, dst, src, ETHERTYPE_TEST, count)?;
        mark(Mark::SpanEnd);
        let seconds = started.elapsed().as_secs_f64();
        emit(&serde_json::json!({
            "tool": "afpacket_tx", "iface": iface, "mac": MacAddress(src).to_string(),
            "sent": count, "size": size, "warmup": warmup, "seconds": seconds,
            "pps": (f64::from(count) / seconds).round(),
        }));
        Ok(())
    });
}
