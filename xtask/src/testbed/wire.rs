//! The host's view of a PF's wire: every frame the guest's PF sends, as it
//! arrives on the link's socket, collected by a reader thread.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// The ethertype of the driver examples' test frames (`pktgen`, `rxcount`,
/// `echo`).
pub const ETHERTYPE_TEST: [u8; 2] = [0x88, 0xb5];

/// The test frame the driver examples and the host agree on: `dst`, `src`,
/// [`ETHERTYPE_TEST`], the sequence number (big endian), then byte `i` =
/// `(i ^ seq) as u8`.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(18)];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE_TEST);
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(18) {
        *b = (i as u32 ^ seq) as u8;
    }
    f
}

/// Everything the guest's PF sends, as it arrives.
pub struct Wire {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Wire {
    /// Starts reading `socket` (a PF link's host side) on a thread of its own.
    ///
    /// # Errors
    /// When the socket's read timeout cannot be set.
    pub fn listen(socket: UdpSocket) -> std::io::Result<Self> {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        // pktgen outruns the default 208 KiB (~270 small datagrams) while the
        // reader thread is descheduled on a 2-core machine running TCG.
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
        let reader = {
            let (frames, stop) = (Arc::clone(&frames), Arc::clone(&stop));
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, _)) = socket.recv_from(&mut buf) {
                        frames
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(buf[..n].to_vec());
                    }
                }
            })
        };
        Ok(Self {
            frames,
            stop,
            reader: Some(reader),
        })
    }

    /// Frames with `ethertype` received so far, from any source, taken.
    pub fn take_ethertype(&self, ethertype: [u8; 2]) -> Vec<Vec<u8>> {
        let mut frames = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut *frames)
            .into_iter()
            .partition(|f| f.len() >= 14 && f[12..14] == ethertype);
        *frames = rest;
        mine
    }

    /// Frames from `src` with `ethertype` received so far, taken (each program run in
    /// the guest has its own MAC, so phases do not mix).
    pub fn take_from(&self, src: [u8; 6], ethertype: [u8; 2]) -> Vec<Vec<u8>> {
        let mut frames = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut *frames)
            .into_iter()
            .partition(|f| f.len() >= 14 && f[6..12] == src);
        *frames = rest;
        mine.into_iter().filter(|f| f[12..14] == ethertype).collect()
    }

    /// Every frame received and not taken yet.
    pub fn remaining(&self) -> Vec<Vec<u8>> {
        self.frames.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Waits until no frame came for `quiet`.
    pub fn settle(&self, quiet: Duration) {
        let mut last = self.frames.lock().unwrap_or_else(PoisonError::into_inner).len();
        let mut since = Instant::now();
        while since.elapsed() < quiet {
            thread::sleep(Duration::from_millis(50));
            let now = self.frames.lock().unwrap_or_else(PoisonError::into_inner).len();
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire").finish_non_exhaustive()
    }
}
