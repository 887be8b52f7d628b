//! After a failover: frames out of the member(s) now carrying the group
//! whose source MACs are the group's and its guests', so the physical
//! switch moves them at once instead of when they next speak.
use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::mac::Mac;

const ETH_P_ARP: u16 = 0x0806;
/// Reverse ARP, as qemu announces a migrated guest whose address it does
/// not know.
const ETH_P_RARP: u16 = 0x8035;

/// Who to announce: a MAC and, if kvnet knows it, its IPv4 address.
#[derive(Clone, Copy, Debug)]
pub struct Announce {
    pub mac: Mac,
    pub ip: Option<Ipv4Addr>,
}

/// A gratuitous ARP request (sender = target = `ip`) or, without an
/// address, a RARP request for the MAC itself, broadcast.
pub fn frame(a: &Announce) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&a.mac.0);
    let (ethertype, op, ip) = match a.ip {
        Some(ip) => (ETH_P_ARP, 1u16, ip.octets()),
        None => (ETH_P_RARP, 3u16, [0; 4]),
    };
    f.extend_from_slice(&ethertype.to_be_bytes());
    // Ethernet, IPv4, 6-byte MACs, 4-byte addresses.
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&a.mac.0);
    f.extend_from_slice(&ip);
    let target_mac = if a.ip.is_some() { [0; 6] } else { a.mac.0 };
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}

/// Sends every announcement out of `ifindex` (past kvnet's programs: an
/// AF_PACKET socket transmits on the device itself).
pub fn send(ifindex: u32, all: &[Announce]) -> Result<usize> {
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket for announcements");
    }
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut sent = 0;
    for a in all {
        let f = frame(a);
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let rc = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                f.as_ptr() as *const libc::c_void,
                f.len(),
                0,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc >= 0 {
            sent += 1;
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplink_announcements_are_garp_or_rarp() {
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        let g = frame(&Announce {
            mac,
            ip: Some(Ipv4Addr::new(192, 0, 2, 1)),
        });
        assert_eq!(&g[12..14], &[0x08, 0x06]);
        assert_eq!(&g[20..22], &[0, 1]);
        assert_eq!(&g[28..32], &[192, 0, 2, 1]);
        assert_eq!(&g[38..42], &[192, 0, 2, 1]);
        let r = frame(&Announce { mac, ip: None });
        assert_eq!(&r[12..14], &[0x80, 0x35]);
        assert_eq!(&r[32..38], &mac.0);
        assert_eq!(r.len(), 60);
    }
}
