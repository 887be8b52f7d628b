//! After a failover: frames out of the member(s) now carrying the group
//! whose source MACs are the group's and its guests', so the physical
//! switch moves them at once instead of when they next speak. The host's
//! IPv6 addresses on the group get an unsolicited neighbour advertisement
//! each (IPv6 neighbours that missed frames re-confirm at once too).
use std::net::{Ipv4Addr, Ipv6Addr};

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

/// An unsolicited neighbour advertisement (RFC 4861 7.2.6) for `target`
/// from `mac`: to all nodes, override set, the MAC as target link-layer
/// address option.
pub fn unsolicited_na(mac: Mac, target: Ipv6Addr) -> Vec<u8> {
    const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = Vec::with_capacity(32);
    // Type 136, code 0, checksum (later), flags: override.
    icmp.extend_from_slice(&[136, 0, 0, 0, 0x20, 0, 0, 0]);
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac.0);
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&target.octets());
    add(&ALL_NODES.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(&icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    // Next header ICMPv6, hop limit 255 (receivers check it).
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&target.octets());
    f.extend_from_slice(&ALL_NODES.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The IPv6 addresses of `iface` that may be announced (global and
/// link-local; not tentative, whose DAD is not done).
pub fn ipv6_of(iface: &str) -> Vec<Ipv6Addr> {
    let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, flags, name) = (f.first()?, f.get(4)?, f.get(5)?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            // IFA_F_TENTATIVE 0x40, IFA_F_DADFAILED 0x08.
            (*name == iface && flags & 0x48 == 0)
                .then(|| u128::from_str_radix(addr, 16).ok().map(Ipv6Addr::from))
                .flatten()
        })
        .collect()
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

/// Sends every announcement (and `extra` frames) out of `ifindex` (past
/// kvnet's programs: an AF_PACKET socket transmits on the device itself).
pub fn send(ifindex: u32, all: &[Announce], extra: &[Vec<u8>]) -> Result<usize> {
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket for announcements");
    }
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut sent = 0;
    for f in all.iter().map(frame).chain(extra.iter().cloned()) {
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

    #[test]
    fn unsolicited_na_checksums_and_carries_the_mac() {
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        let target: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let f = unsolicited_na(mac, target);
        assert_eq!(f.len(), 14 + 40 + 32);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!((f[20], f[21]), (58, 255));
        assert_eq!(f[54], 136);
        assert_eq!(&f[62..78], &target.octets());
        assert_eq!(&f[78..80], &[2, 1]);
        assert_eq!(&f[80..86], &mac.0);
        // The checksum over pseudo-header and message sums to 0xffff.
        let mut sum: u32 = 0;
        for c in f[22..54].chunks(2).chain(f[54..].chunks(2)) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        sum += 32 + 58;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }
}
