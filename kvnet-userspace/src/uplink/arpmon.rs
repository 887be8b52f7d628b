//! ARP monitoring of a group's members (`--arp-target`): a link can keep
//! its carrier while the path behind it is dead (a switch port out of its
//! VLAN, a failed line card). Every interval the daemon sends an ARP
//! request for each target out of every member with carrier; a member
//! that heard no ARP from a target for `MISSED` intervals is out.
//!
//! Probes are RFC 5227 ARP probes (sender address 0.0.0.0) from a MAC of
//! the member's own: the target answers the probe MAC (unicast, so the LAN
//! brings each answer back to the member that asked), and neither its ARP
//! cache for the host's address nor the LAN's FDB entry for the group's
//! MAC moves to a backup member.
use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::mac::Mac;

/// Intervals without an answer before a member is out (bonding counts 2
/// missed by default; one more rides out a late answer under load).
pub const MISSED: u32 = 3;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_ALL: u16 = 0x0003;

/// The MAC member number `index` probes from: the group's, locally
/// administered, its last byte moved per member.
pub fn probe_mac(group: Mac, index: usize) -> Mac {
    let mut m = group.0;
    m[0] = (m[0] | 0x02) & !0x01;
    m[5] ^= 0x80 | index as u8;
    Mac(m)
}

/// An ARP probe for `target` from `src`, broadcast.
pub fn probe(src: Mac, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// Whether an ARP frame comes from one of `targets` (its answer to a
/// probe, or its own request: either proves the path).
pub fn from_target(f: &[u8], targets: &[Ipv4Addr]) -> bool {
    if f.len() < 42 || f[12..14] != ETH_P_ARP.to_be_bytes() {
        return false;
    }
    let sender = Ipv4Addr::new(f[28], f[29], f[30], f[31]);
    targets.contains(&sender)
}

/// A member's ARP monitor: a socket that sees its ARP frames before
/// kvnet's tc program (which drops what a backup member receives).
pub struct MemberArp {
    sock: OwnedFd,
    pub probe_mac: Mac,
    /// When a target was last heard on this member.
    pub last_rx: Instant,
}

impl MemberArp {
    /// `now` counts as heard: a new member carries until it had a chance
    /// to be answered.
    pub fn open(ifindex: u32, probe_mac: Mac, now: Instant) -> Result<MemberArp> {
        // Protocol 0 receives nothing until bound: the filter goes on first.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("AF_PACKET socket for ARP monitoring");
        }
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // ldh [12]; jeq #ARP, accept, drop. A tap (ETH_P_ALL) runs before
        // tc ingress; the filter keeps the rest of the member's traffic
        // in the kernel.
        let mut code = [
            libc::sock_filter {
                code: 0x28,
                jt: 0,
                jf: 0,
                k: 12,
            },
            libc::sock_filter {
                code: 0x15,
                jt: 0,
                jf: 1,
                k: u32::from(ETH_P_ARP),
            },
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0xffff,
            },
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0,
            },
        ];
        let prog = libc::sock_fprog {
            len: code.len() as u16,
            filter: code.as_mut_ptr(),
        };
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                &prog as *const libc::sock_fprog as *const libc::c_void,
                std::mem::size_of::<libc::sock_fprog>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("ARP monitoring: socket filter");
        }
        super::link::bind_packet(&sock, ifindex, ETH_P_ALL)
            .context("binding the ARP monitoring socket")?;
        Ok(MemberArp {
            sock,
            probe_mac,
            last_rx: now,
        })
    }

    /// Reads every ARP frame waiting that came in (not the ones sent).
    pub fn receive(&mut self, targets: &[Ipv4Addr], now: Instant) {
        let mut buf = [0u8; 128];
        loop {
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n <= 0 {
                return;
            }
            let incoming = from.sll_pkttype != libc::PACKET_OUTGOING as u8;
            if incoming && from_target(&buf[..n as usize], targets) {
                self.last_rx = now;
            }
        }
    }

    /// One probe per target out of the member.
    pub fn probe(&self, targets: &[Ipv4Addr]) {
        for t in targets {
            let f = probe(self.probe_mac, *t);
            unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    f.as_ptr() as *const libc::c_void,
                    f.len(),
                    0,
                )
            };
        }
    }

    /// Heard from a target within `MISSED` intervals.
    pub fn alive(&self, now: Instant, every: Duration) -> bool {
        now.duration_since(self.last_rx) < every * MISSED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_probes_ask_from_nowhere_and_answers_are_recognised() {
        let group = Mac([0x52, 0x54, 0, 0, 0, 1]);
        let (a, b) = (probe_mac(group, 0), probe_mac(group, 1));
        assert_ne!(a, b);
        assert_ne!(a, group);
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered unicast");
        let target = Ipv4Addr::new(192, 0, 2, 100);
        let p = probe(a, target);
        assert_eq!(p.len(), 60);
        assert_eq!(&p[20..22], &[0, 1], "request");
        assert_eq!(&p[28..32], &[0; 4], "probe: sender 0.0.0.0");
        assert_eq!(&p[38..42], &target.octets());
        assert!(!from_target(&p, &[target]), "our own probe is no answer");
        let mut answer = p.clone();
        answer[20..22].copy_from_slice(&[0, 2]);
        answer[28..32].copy_from_slice(&target.octets());
        assert!(from_target(&answer, &[target]));
        assert!(!from_target(&answer, &[Ipv4Addr::new(192, 0, 2, 1)]));
    }
}
