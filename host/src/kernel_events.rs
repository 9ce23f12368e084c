//! The kernel's own word that something a VF's health depends on changed:
//! uevents (`NETLINK_KOBJECT_UEVENT`) of PCI devices, network interfaces
//! and VFIO groups (a VF created, removed, bound, unbound), and rtnetlink
//! link messages (`RTMGRP_LINK`: a PF's carrier or state, a VF setting).
//! Each listener is a thread blocked on its socket; it costs nothing while
//! nothing happens.
//!
//! Both sockets see the network namespace they are opened in: kobject
//! uevents go to the host's namespace only, so a listener in a pod needs
//! `hostNetwork` (the chart's node pod has it). A listener that cannot open
//! its socket says so to its caller, which then relies on its periodic
//! checks.

use std::io;

use netlink_sys::protocols::{NETLINK_KOBJECT_UEVENT, NETLINK_ROUTE};
use netlink_sys::{Socket, SocketAddr};

/// The uevent multicast group the kernel sends on.
const UEVENT_GROUP: u32 = 1;
/// rtnetlink's link group (`RTMGRP_LINK`).
const RTMGRP_LINK: u32 = 1;
/// `RTM_NEWLINK` and `RTM_DELLINK`.
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;

/// A uevent about a PCI device, a network interface or a VFIO group.
pub fn is_vf_uevent(message: &[u8]) -> bool {
    message
        .split(|&b| b == 0)
        .any(|field| matches!(field, b"SUBSYSTEM=pci" | b"SUBSYSTEM=net" | b"SUBSYSTEM=vfio"))
}

/// True when a datagram from the rtnetlink link group holds a link message
/// (new or deleted link; a carrier change is a new-link message).
pub fn is_link_message(datagram: &[u8]) -> bool {
    let mut rest = datagram;
    // Each message: a 16-byte header (length u32, type u16, flags u16,
    // sequence u32, port u32), native endian, then its payload, aligned to 4.
    while rest.len() >= 16 {
        let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if matches!(kind, RTM_NEWLINK | RTM_DELLINK) {
            return true;
        }
        let step = (length + 3) & !3;
        if length < 16 || step > rest.len() {
            return false;
        }
        rest = &rest[step..];
    }
    false
}

/// Listens for VF uevents on a thread of its own; calls `on_event` for
/// each one. The thread ends when `on_event` returns false or the socket
/// fails (logged).
///
/// # Errors
/// When the uevent socket cannot be opened or bound.
pub fn spawn_uevent_listener(name: &str, on_event: impl FnMut() -> bool + Send + 'static) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_KOBJECT_UEVENT)?;
    socket.bind(&SocketAddr::new(0, UEVENT_GROUP))?;
    spawn(name, socket, is_vf_uevent, on_event)
}

/// Listens for rtnetlink link messages on a thread of its own; calls
/// `on_event` for each datagram that holds one. The thread ends when
/// `on_event` returns false or the socket fails (logged).
///
/// # Errors
/// When the rtnetlink socket cannot be opened or bound.
pub fn spawn_link_listener(name: &str, on_event: impl FnMut() -> bool + Send + 'static) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
    spawn(name, socket, is_link_message, on_event)
}

fn spawn(
    name: &str,
    socket: Socket,
    relevant: fn(&[u8]) -> bool,
    mut on_event: impl FnMut() -> bool + Send + 'static,
) -> io::Result<()> {
    let thread_name = name.to_owned();
    std::thread::Builder::new().name(thread_name.clone()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let read = match socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                // ENOBUFS: the receive queue overflowed and messages were
                // lost: something changed.
                Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                    if !on_event() {
                        return;
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(listener = %thread_name, %error, "kernel event socket failed; relying on periodic checks");
                    return;
                }
            };
            if relevant(&buf[..read.min(buf.len())]) && !on_event() {
                return;
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(length: u32, kind: u16) -> Vec<u8> {
        let mut message = Vec::new();
        message.extend_from_slice(&length.to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&[0; 10]);
        message
    }

    #[test]
    fn uevents_of_pci_net_and_vfio_count_others_do_not() {
        assert!(is_vf_uevent(
            b"unbind@/devices/pci0000:00/0000:00:12.0\0ACTION=unbind\0SUBSYSTEM=pci\0"
        ));
        assert!(is_vf_uevent(b"bind@/x\0SUBSYSTEM=vfio\0"));
        assert!(!is_vf_uevent(b"change@/x\0SUBSYSTEM=block\0"));
        assert!(!is_vf_uevent(b"SUBSYSTEM=pcie"));
    }

    #[test]
    fn link_messages_are_found_among_others_and_garbage_is_not_one() {
        let mut datagram = header(20, 24); // RTM_NEWROUTE, 4 bytes of payload
        datagram.extend_from_slice(&[0; 4]);
        assert!(!is_link_message(&datagram));
        datagram.extend(header(16, RTM_NEWLINK));
        assert!(is_link_message(&datagram));
        assert!(is_link_message(&header(16, RTM_DELLINK)));
        assert!(!is_link_message(&[1, 2, 3]));
        // A length that runs past the datagram, or below a header: stop.
        assert!(!is_link_message(&header(4096, 24)));
        assert!(!is_link_message(&header(0, 24)));
    }
}
