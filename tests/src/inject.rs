//! Raw Ethernet frame injection into a namespace's interface, and MAC and
//! frame building helpers.
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread;

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};

use crate::lab::netns_path;

/// Parse `aa:bb:cc:dd:ee:ff` (also accepts `-` separators).
pub fn mac_parse(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.trim().split([':', '-']).collect();
    if parts.len() != 6 {
        bail!("invalid MAC address {s:?}");
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.is_empty() || p.len() > 2 {
            bail!("invalid MAC address {s:?}");
        }
        *b = u8::from_str_radix(p, 16).with_context(|| format!("invalid MAC address {s:?}"))?;
    }
    Ok(mac)
}

/// Format as `aa:bb:cc:dd:ee:ff`.
pub fn mac_fmt(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An untagged Ethernet frame, zero-padded to the 60-byte minimum.
pub fn eth_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len().max(46));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// A frame with one 802.1Q tag (`vid`, priority 0), padded to 64 bytes.
pub fn eth_frame_vlan(
    dst: [u8; 6],
    src: [u8; 6],
    vid: u16,
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len().max(46));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < 64 {
        f.resize(64, 0);
    }
    f
}

/// Send raw frames out of `iface` in namespace `ns` (AF_PACKET/SOCK_RAW,
/// from a helper thread that joins the namespace, so the caller's thread
/// stays where it is).
pub fn inject(ns: &str, iface: &str, frames: &[Vec<u8>]) -> Result<()> {
    let nsfile = File::open(netns_path(ns)).with_context(|| format!("open netns {ns}"))?;
    let iface_c = CString::new(iface).with_context(|| format!("interface name {iface:?}"))?;
    let frames = frames.to_vec();
    let what = format!("inject into {iface} in netns {ns}");
    thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            setns(&nsfile, CloneFlags::CLONE_NEWNET).context("setns")?;
            send_frames(&iface_c, &frames)
        })
        .join()
        .map_err(|_| anyhow!("injector thread panicked"))?
    })
    .with_context(|| what)
}

fn send_frames(iface: &CString, frames: &[Vec<u8>]) -> Result<()> {
    // SAFETY: plain libc calls with checked results.
    let ifindex = unsafe { libc::if_nametoindex(iface.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error()).context("no such interface");
    }
    // Protocol 0: the socket only sends, it never receives.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET, SOCK_RAW)");
    }
    // SAFETY: raw is a fresh, owned descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    for (i, f) in frames.iter().enumerate() {
        if f.len() < 14 {
            bail!(
                "frame {i} is {} bytes, shorter than an Ethernet header",
                f.len()
            );
        }
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&f[..6]);
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("send frame {i} ({} bytes)", f.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        let m = mac_parse("02:AB:0c:00:00:ff").unwrap();
        assert_eq!(m, [2, 0xab, 0x0c, 0, 0, 0xff]);
        assert_eq!(mac_fmt(&m), "02:ab:0c:00:00:ff");
        assert!(mac_parse("02:ab:0c:00:00").is_err());
        assert!(mac_parse("02:ab:0c:00:00:fff").is_err());
        assert!(mac_parse("zz:ab:0c:00:00:ff").is_err());
    }

    #[test]
    fn frames() {
        let f = crate::pcap::Frame::new(eth_frame([0xff; 6], [2, 0, 0, 0, 0, 1], 0x88b5, b"hi"));
        assert_eq!(f.data.len(), 60);
        assert!(f.is_broadcast());
        assert_eq!(f.ethertype(), 0x88b5);
        assert_eq!(&f.payload()[..2], b"hi");
        let v = crate::pcap::Frame::new(eth_frame_vlan([1; 6], [2; 6], 42, 0x0800, &[]));
        assert_eq!(v.data.len(), 64);
        assert_eq!(v.vlan_id(), Some(42));
        assert_eq!(v.ethertype(), 0x0800);
    }
}
