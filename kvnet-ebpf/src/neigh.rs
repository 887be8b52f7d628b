//! ARP suppression: a request for an address whose owner kvnet knows
//! (map `neigh`) is answered from the datapath, back out of the port it
//! came from, instead of flooded to every port of the network.
use kvnet_common::{NeighKey, PORT_F_ISOLATED};

use crate::{maps, parse::ptr_at};

/// The answer to an ARP request: the owner's MAC and the asked address.
pub struct Answer {
    pub mac: [u8; 6],
    pub ip: u32,
}

/// Whether the ARP frame at `off` is a request kvnet answers for: Ethernet
/// and IPv4, a real question (not gratuitous), an owner in the same
/// network and VLAN that is not the asker (a probe for its own address
/// must go unanswered) and that the asker may reach.
#[inline(always)]
pub fn answer(
    net_id: u32,
    vid: u16,
    ingress: u32,
    ingress_flags: u32,
    data: usize,
    data_end: usize,
    off: usize,
) -> Option<Answer> {
    let a = unsafe { &*ptr_at::<[u8; 28]>(data, data_end, off)? };
    // htype 1, ptype IPv4, hlen 6, plen 4, op request.
    if a[..8] != [0, 1, 8, 0, 6, 4, 0, 1] {
        return None;
    }
    let spa = [a[14], a[15], a[16], a[17]];
    let tpa = [a[24], a[25], a[26], a[27]];
    if spa == tpa {
        return None;
    }
    let ip = u32::from_ne_bytes(tpa);
    let key = NeighKey {
        net_id,
        vid,
        _pad: 0,
        ip,
    };
    let e = unsafe { maps::NEIGH.get(&key) }?;
    let sha = [a[8], a[9], a[10], a[11], a[12], a[13]];
    if e.ifindex == ingress || e.mac == sha {
        return None;
    }
    if ingress_flags & PORT_F_ISOLATED != 0
        && maps::port(e.ifindex).is_some_and(|p| p.flags & PORT_F_ISOLATED != 0)
    {
        return None;
    }
    Some(Answer { mac: e.mac, ip })
}

/// Turns the request at `off` into its reply in place: to the asker, from
/// the owner. The frame keeps its length; no checksum covers ARP.
#[inline(always)]
pub fn make_reply(data: usize, data_end: usize, off: usize, ans: &Answer) -> bool {
    let (Some(eth), Some(arp)) = (
        ptr_at::<[u8; 12]>(data, data_end, 0),
        ptr_at::<[u8; 28]>(data, data_end, off),
    ) else {
        return false;
    };
    let (eth, arp) = unsafe { (&mut *(eth as *mut [u8; 12]), &mut *(arp as *mut [u8; 28])) };
    let mut asker_mac = [0u8; 6];
    asker_mac.copy_from_slice(&arp[8..14]);
    let mut asker_ip = [0u8; 4];
    asker_ip.copy_from_slice(&arp[14..18]);
    eth[..6].copy_from_slice(&asker_mac);
    eth[6..12].copy_from_slice(&ans.mac);
    arp[7] = 2;
    arp[8..14].copy_from_slice(&ans.mac);
    arp[14..18].copy_from_slice(&ans.ip.to_ne_bytes());
    arp[18..24].copy_from_slice(&asker_mac);
    arp[24..28].copy_from_slice(&asker_ip);
    true
}
