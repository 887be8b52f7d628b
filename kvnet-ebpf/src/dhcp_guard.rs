//! Rogue DHCP guard: a guest may not act as a DHCP server for the other
//! guests unless its port is trusted. Server-to-client DHCP messages (IPv4
//! UDP from port 67) arriving on an untrusted guest port are dropped.
//! Gateway ports (kvnet's own server) and uplinks are trusted by role.
use kvnet_common::{
    DropReason, PortConfig, PORT_F_TRUSTED, PORT_F_UPLINK_BRIDGED, PORT_F_UPLINK_ROUTED,
};

use crate::parse;

const IPPROTO_UDP: u8 = 17;
const DHCP_SERVER_PORT: u16 = 67;

/// `Some(RogueDhcp)` when the frame is a DHCP server message from a port
/// that may not send one. `ethertype` is the frame's outer ethertype; a
/// tag still in the packet (0x8100) is looked through once. Costs one
/// flag test and one compare for anything that is not IPv4.
#[inline(always)]
pub fn check(
    port: &PortConfig,
    data: usize,
    data_end: usize,
    ethertype: u16,
) -> Option<DropReason> {
    if port.flags & (PORT_F_TRUSTED | PORT_F_UPLINK_BRIDGED | PORT_F_UPLINK_ROUTED) != 0 {
        return None;
    }
    let l3 = if ethertype == parse::ETH_P_IPV4 {
        parse::ETH_HLEN
    } else if ethertype == parse::ETH_P_8021Q {
        let inner = parse::ptr_at::<[u8; 2]>(data, data_end, parse::ETH_HLEN + 2)?;
        if u16::from_be_bytes(unsafe { *inner }) != parse::ETH_P_IPV4 {
            return None;
        }
        parse::ETH_HLEN + 4
    } else {
        return None;
    };
    // Version/IHL, and the protocol byte at offset 9.
    let ip = parse::ptr_at::<[u8; 20]>(data, data_end, l3)?;
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 4 || ip[9] != IPPROTO_UDP {
        return None;
    }
    // Only first fragments carry the UDP header.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return None;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ihl < 20 || ihl > 60 {
        return None;
    }
    let sport = parse::ptr_at::<[u8; 2]>(data, data_end, l3 + ihl)?;
    if u16::from_be_bytes(unsafe { *sport }) == DHCP_SERVER_PORT {
        return Some(DropReason::RogueDhcp);
    }
    None
}
