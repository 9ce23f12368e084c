//! The kernel-path baseline for `rxcount`: counts test frames (ethertype
//! 0x88b5) received through an AF_PACKET socket on `--iface` (a VF on
//! igbvf), one `recv` per frame, and reports the rate (first to last frame).
//!
//! `afpacket_rx --iface eth1 [--count 10000] [--timeout 60] [--idle-timeout S] [--rounds 1]`
//!
//! Prints `{"event":"ready",..}` (with the interface's MAC) once the socket
//! is bound (send after it), then one result line; with `--idle-timeout`
//! it stops that long after the last frame even when fewer than `--count`
//! came. `--rounds N` counts N times in turn on the same socket.

mod common;

use std::time::{Duration, Instant};

use common::{Args, ETHERTYPE_TEST, check_frame, emit, run};
use vfplane_driver::MacAddress;

struct Socket(i32);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

fn zeroed_sockaddr_ll() -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

fn main() {
    run("afpacket_rx", || {
        let args = Args::parse()?;
        let iface = args.get("iface").ok_or("--iface is required")?.to_owned();
        let count: u64 = args.num("count", 10_000)?;
        let timeout = Duration::from_secs_f64(args.num("timeout", 60.0)?);
        let idle_timeout = match args.get("idle-timeout") {
            Some(_) => Some(Duration::from_secs_f64(args.num("idle-timeout", 1.0)?)),
            None => None,
        };
        let rounds: u32 = args.num("rounds", 1)?;
        let mac = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
            .map_err(|e| format!("{iface}: {e}"))?
            .trim()
            .parse::<MacAddress>()
            .map_err(|e| e.to_string())?;
        let ifindex: i32 = std::fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
            .map_err(|e| format!("{iface}: {e}"))?
            .trim()
            .parse()
            .map_err(|_| "bad ifindex".to_owned())?;
        let proto = ETHERTYPE_TEST.to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let sock = Socket(fd);
        let mut addr = zeroed_sockaddr_ll();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex;
        // SAFETY: `addr` is a valid sockaddr_ll for the length passed.
        let rc = unsafe {
            libc::bind(
                sock.0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(format!("bind: {}", std::io::Error::last_os_error()));
        }
        // Wake at least every 100 ms to check the deadlines.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: `tv` is a valid timeval for the length passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.0,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc != 0 {
            return Err(format!("SO_RCVTIMEO: {}", std::io::Error::last_os_error()));
        }
        let mut frame = vec![0u8; 2048];
        for _ in 0..rounds {
            emit(&serde_json::json!({
                "tool": "afpacket_rx", "event": "ready", "iface": iface, "mac": mac.to_string(),
            }));
            let (mut good, mut bad) = (0u64, 0u64);
            let mut first: Option<Instant> = None;
            let mut last = Instant::now();
            let deadline = Instant::now() + timeout;
            let mut span = common::ReceiveSpan::default();
            // One clock read per frame (its time), as the driver's receiver
            // takes one per burst: a clock read can be a system call.
            let mut now = Instant::now();
            while good < count && now < deadline {
                if let (Some(idle), Some(_)) = (idle_timeout, first)
                    && now.duration_since(last) > idle
                {
                    break;
                }
                // SAFETY: `frame` is valid for writes of its length.
                let n = unsafe { libc::recv(sock.0, frame.as_mut_ptr().cast(), frame.len(), 0) };
                if n < 0 {
                    let err = std::io::Error::last_os_error();
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) {
                        now = Instant::now();
                        continue;
                    }
                    return Err(format!("recv: {err}"));
                }
                now = Instant::now();
                first.get_or_insert(now);
                last = now;
                match frame.get(..n as usize).and_then(check_frame) {
                    Some(_) => good += 1,
                    None => bad += 1,
                }
                span.received(good);
            }
            let span_frames = span.end(good);
            let seconds = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
            emit(&serde_json::json!({
                "tool": "afpacket_rx", "iface": iface, "mac": mac.to_string(),
                "expected": count, "received": good, "bad": bad, "timed_out": good < count,
                "seconds": seconds, "span_frames": span_frames,
                "pps": if seconds > 0.0 { (good as f64 / seconds).round() } else { 0.0 },
            }));
        }
        Ok(())
    });
}
