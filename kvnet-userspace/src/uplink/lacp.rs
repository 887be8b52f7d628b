//! 802.3ad (LACP) for uplink groups: LACPDUs sent and read by the daemon
//! on each member (AF_PACKET, slow protocols), fast rate (a PDU a second,
//! a partner silent for 3 s expires). The mux is the coupled one: a member
//! is selected when its partner answers with aggregation on and the same
//! system and key as the group's other selected members; it carries
//! traffic once the partner is in sync, collecting, and names us back.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use kvnet_common::ETH_P_SLOW;
use serde::{Deserialize, Serialize};

use crate::mac::Mac;

/// Fast periodic time and short timeout (3 PDUs).
pub const FAST_PERIOD: Duration = Duration::from_secs(1);
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(3);

const LACP_DST: [u8; 6] = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x02];
const SUBTYPE_LACP: u8 = 1;
/// Bonding's default system priority.
const SYSTEM_PRIORITY: u16 = 0xffff;
const PORT_PRIORITY: u16 = 0xff;

pub const ST_ACTIVITY: u8 = 0x01;
pub const ST_TIMEOUT: u8 = 0x02;
pub const ST_AGGREGATION: u8 = 0x04;
pub const ST_SYNC: u8 = 0x08;
pub const ST_COLLECTING: u8 = 0x10;
pub const ST_DISTRIBUTING: u8 = 0x20;
pub const ST_DEFAULTED: u8 = 0x40;

/// One side's information in a LACPDU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    pub system: [u8; 6],
    pub key: u16,
    pub port: u16,
    pub state: u8,
}

impl PortInfo {
    fn write(&self, out: &mut Vec<u8>, tlv: u8) {
        out.extend_from_slice(&[tlv, 20]);
        out.extend_from_slice(&SYSTEM_PRIORITY.to_be_bytes());
        out.extend_from_slice(&self.system);
        out.extend_from_slice(&self.key.to_be_bytes());
        out.extend_from_slice(&PORT_PRIORITY.to_be_bytes());
        out.extend_from_slice(&self.port.to_be_bytes());
        out.push(self.state);
        out.extend_from_slice(&[0; 3]);
    }

    fn read(b: &[u8]) -> PortInfo {
        let mut system = [0; 6];
        system.copy_from_slice(&b[4..10]);
        PortInfo {
            system,
            key: u16::from_be_bytes([b[10], b[11]]),
            port: u16::from_be_bytes([b[14], b[15]]),
            state: b[16],
        }
    }
}

/// A whole LACPDU frame from `src`.
pub fn pdu(src: Mac, actor: &PortInfo, partner: &PortInfo) -> Vec<u8> {
    let mut f = Vec::with_capacity(124);
    f.extend_from_slice(&LACP_DST);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ETH_P_SLOW.to_be_bytes());
    f.extend_from_slice(&[SUBTYPE_LACP, 1]);
    actor.write(&mut f, 1);
    partner.write(&mut f, 2);
    // Collector (max delay 0), terminator, reserved.
    f.extend_from_slice(&[3, 16]);
    f.extend_from_slice(&[0; 14]);
    f.extend_from_slice(&[0, 0]);
    f.resize(14 + 110, 0);
    f
}

/// (actor, partner) of a LACPDU frame, None for anything else.
pub fn parse(f: &[u8]) -> Option<(PortInfo, PortInfo)> {
    if f.len() < 14 + 42 || f[12..14] != ETH_P_SLOW.to_be_bytes() || f[14] != SUBTYPE_LACP {
        return None;
    }
    let b = &f[14..];
    if b[2] != 1 || b[3] != 20 || b[22] != 2 || b[23] != 20 {
        return None;
    }
    Some((PortInfo::read(&b[2..22]), PortInfo::read(&b[22..42])))
}

/// A member's LACP: its socket and what its partner last said.
pub struct MemberLacp {
    sock: OwnedFd,
    pub port: u16,
    pub partner: Option<PortInfo>,
    /// What the partner says of us (its partner part).
    pub seen_as: Option<PortInfo>,
    pub last_rx: Option<Instant>,
    pub last_tx: Option<Instant>,
    pub selected: bool,
}

impl MemberLacp {
    /// An AF_PACKET socket for slow-protocol frames on `ifindex`.
    pub fn open(ifindex: u32, port: u16) -> Result<MemberLacp> {
        let proto = ETH_P_SLOW.to_be() as i32;
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                proto,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket for LACP");
        }
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        super::link::bind_packet(&sock, ifindex, ETH_P_SLOW).context("binding the LACP socket")?;
        // The slow protocols' address must reach us through the NIC's filter.
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = ifindex as i32;
        mreq.mr_type = libc::PACKET_MR_MULTICAST as u16;
        mreq.mr_alen = 6;
        mreq.mr_address[..6].copy_from_slice(&LACP_DST);
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                &mreq as *const libc::packet_mreq as *const libc::c_void,
                std::mem::size_of::<libc::packet_mreq>() as u32,
            )
        };
        Ok(MemberLacp {
            sock,
            port,
            partner: None,
            seen_as: None,
            last_rx: None,
            last_tx: None,
            selected: false,
        })
    }

    /// Reads every PDU waiting; the last one counts.
    pub fn receive(&mut self, now: Instant) {
        let mut buf = [0u8; 256];
        loop {
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n <= 0 {
                return;
            }
            if let Some((actor, partner)) = parse(&buf[..n as usize]) {
                self.partner = Some(actor);
                self.seen_as = Some(partner);
                self.last_rx = Some(now);
            }
        }
    }

    /// The partner, unless silent for the short timeout.
    pub fn fresh_partner(&self, now: Instant) -> Option<PortInfo> {
        match (self.partner, self.last_rx) {
            (Some(p), Some(t)) if now.duration_since(t) < SHORT_TIMEOUT => Some(p),
            _ => None,
        }
    }

    pub fn send(&mut self, src: Mac, actor: &PortInfo, now: Instant) {
        let partner = self.partner.unwrap_or_default();
        let f = pdu(src, actor, &partner);
        let rc = unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                f.as_ptr() as *const libc::c_void,
                f.len(),
                0,
            )
        };
        if rc >= 0 {
            self.last_tx = Some(now);
        }
    }
}

/// The actor state a member announces.
pub fn actor_state(selected: bool, has_partner: bool) -> u8 {
    let mut s = ST_ACTIVITY | ST_TIMEOUT | ST_AGGREGATION;
    if selected {
        s |= ST_SYNC | ST_COLLECTING | ST_DISTRIBUTING;
    }
    if !has_partner {
        s |= ST_DEFAULTED;
    }
    s
}

/// Whether a selected member's partner is ready and sees us as we are.
pub fn partner_ready(partner: &PortInfo, seen_as: Option<&PortInfo>, us: &PortInfo) -> bool {
    let ready = ST_SYNC | ST_COLLECTING;
    partner.state & ready == ready
        && seen_as.is_some_and(|s| s.system == us.system && s.key == us.key && s.port == us.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lacpdus_round_trip_and_others_are_ignored() {
        let actor = PortInfo {
            system: [2, 0, 0, 0, 0, 1],
            key: 7,
            port: 1,
            state: actor_state(true, true),
        };
        let partner = PortInfo {
            system: [2, 0, 0, 0, 0, 2],
            key: 9,
            port: 2,
            state: ST_ACTIVITY,
        };
        let f = pdu(Mac([2, 0, 0, 0, 0, 1]), &actor, &partner);
        assert_eq!(f.len(), 124);
        assert_eq!(parse(&f), Some((actor, partner)));
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[8, 6]);
        assert_eq!(parse(&arp), None);
        assert!(partner_ready(
            &PortInfo {
                state: ST_SYNC | ST_COLLECTING,
                ..partner
            },
            Some(&actor),
            &actor
        ));
        assert!(!partner_ready(&partner, Some(&actor), &actor));
    }
}
