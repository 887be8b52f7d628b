//! Port security: what a guest port may send. Every guest port is hostile
//! until the daemon says otherwise (`--trusted`, uplinks, the gateway).
//!
//! * MAC guard ([`PORT_F_GUARDED`]): frames only from MACs the port owns,
//!   claimed on first sight up to `max_macs` through `mac_owners`, whose
//!   BPF_NOEXIST insert makes a MAC owned by one port unclaimable by any
//!   other.
//! * IP source guard: IPv4 senders (packets and ARP) must be bound to the
//!   port; bindings come from the daemon (`--ip`) and from DHCP replies
//!   snooped on trusted ports ([`snoop_dhcp`]).
//! * Server guard (every untrusted port): DHCP/DHCPv6 server messages and
//!   IPv6 router advertisements and redirects.
//!
//! The bindings sit in the port's own map entry, so a well-behaved frame
//! pays a few compares and no lookup.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use kvnet_common::{
    owner_key, DropReason, FdbKey, NeighEntry, NeighKey, PortConfig, ETH_P_8021AD, ETH_P_8021Q,
    ETH_P_QINQ_9100, FDB_F_STATIC, FDB_VID_ANY, IPPROTO_UDP, PORT_F_GUARDED, PORT_F_IP_GUARD,
    PORT_F_TRUSTED, PORT_F_UPLINK_BRIDGED, PORT_F_UPLINK_ROUTED, PORT_F_V6_SLAAC, PORT_IPS,
    PORT_MACS,
};

use crate::{
    maps::{self, FDB, MAC_OWNERS, NEIGH, PORTS},
    parse::{self, ptr_at, Eth, L3},
};

const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
const DHCP6_CLIENT_PORT: u16 = 546;
const DHCP6_SERVER_PORT: u16 = 547;
const BOOTREPLY: u8 = 2;
use kvnet_common::IPPROTO_ICMPV6;
const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
const ND_REDIRECT: u8 = 137;
/// IPv6 extension headers looked through to find the upper layer.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
const IPV6_ROUTING: u8 = 43;

/// A VLAN TPID where an upper-layer ethertype belongs: a second tag.
#[inline(always)]
pub fn is_tag(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD || ethertype == ETH_P_QINQ_9100
}

/// Why a frame from `port` must not be switched, or None. `vid` is the VLAN
/// it was classified into.
#[inline(always)]
pub fn check(
    ingress: u32,
    port: &PortConfig,
    data: usize,
    data_end: usize,
    eth: &Eth,
    l3: &L3,
    vid: u16,
    tc: bool,
) -> Option<DropReason> {
    if port.flags & (PORT_F_TRUSTED | PORT_F_UPLINK_BRIDGED | PORT_F_UPLINK_ROUTED) != 0 {
        // Trusted ports carry the real DHCP servers: learn from their replies.
        snoop_dhcp(port.net_id, vid, data, data_end, l3, tc);
        return None;
    }
    let guarded = port.flags & PORT_F_GUARDED != 0;
    if guarded && !owns_mac(port, &eth.src) {
        if let Some(r) = claim_mac(ingress, port, vid, eth.src) {
            return Some(r);
        }
    }
    let ip_guard = guarded && (port.flags & PORT_F_IP_GUARD != 0 || port.ip_count != 0);
    match l3.ethertype {
        parse::ETH_P_IPV4 => ipv4(port, data, data_end, l3.off, guarded, ip_guard, &eth.src),
        parse::ETH_P_ARP if guarded => arp(port, data, data_end, l3.off, &eth.src, ip_guard),
        // IPv6 sources are held to link-local only where kvnet knows every
        // address (its own DHCP, `--ip`): IPv4 bindings snooped on a bridged
        // network say nothing about the guest's SLAAC addresses.
        parse::ETH_P_IPV6 => {
            let v6_guard =
                guarded && port.flags & (PORT_F_IP_GUARD | PORT_F_V6_SLAAC) == PORT_F_IP_GUARD;
            ipv6(data, data_end, l3.off, guarded, v6_guard, &eth.src)
        }
        _ => None,
    }
}

#[inline(always)]
fn owns_mac(port: &PortConfig, mac: &[u8; 6]) -> bool {
    let n = port.mac_count as usize;
    for i in 0..PORT_MACS {
        if i < n && port.macs[i] == *mac {
            return true;
        }
    }
    false
}

#[inline(always)]
fn bound_ip(port: &PortConfig, addr: u32) -> bool {
    let n = port.ip_count as usize;
    for i in 0..PORT_IPS {
        if i < n && port.ips[i] == addr {
            return true;
        }
    }
    false
}

/// A MAC another port sent from this recently is that port's device (a
/// LAN router behind an uplink, a trusted guest), not free to claim.
const CLAIM_QUIET_NS: u64 = 30_000_000_000;

/// Makes `mac` the port's (sticky) if it may own one more, nobody owns it
/// in this network, and no other port has been sending from it lately.
/// Two CPUs claiming for one port at once may each win a MAC while one
/// slot is written: the port then owns at most one extra MAC per CPU,
/// never another port's.
#[inline(always)]
fn claim_mac(ingress: u32, port: &PortConfig, vid: u16, mac: [u8; 6]) -> Option<DropReason> {
    let key = owner_key(port.net_id, mac);
    if port.mac_count >= port.max_macs || port.mac_count as usize >= PORT_MACS {
        return match unsafe { MAC_OWNERS.get(&key) } {
            Some(owner) if *owner == ingress => None,
            Some(_) => Some(DropReason::MacSpoof),
            None => Some(DropReason::FdbLimit),
        };
    }
    // Busy elsewhere: in this VLAN (static entries included), or in any
    // (a router on a trunk quiet in this VLAN but not in another).
    for v in [vid, FDB_VID_ANY] {
        let seen = FdbKey {
            net_id: port.net_id,
            vid: v,
            mac,
        };
        if let Some(e) = unsafe { FDB.get(&seen) } {
            let now = unsafe { bpf_ktime_get_coarse_ns() };
            if e.ifindex != ingress
                && (e.flags & FDB_F_STATIC != 0
                    || now.wrapping_sub(e.last_seen_ns) < CLAIM_QUIET_NS)
            {
                return Some(DropReason::MacSpoof);
            }
        }
    }
    if MAC_OWNERS
        .insert(&key, &ingress, BPF_NOEXIST as u64)
        .is_err()
    {
        match unsafe { MAC_OWNERS.get(&key) } {
            Some(owner) if *owner == ingress => {}
            _ => return Some(DropReason::MacSpoof),
        }
    }
    if let Some(p) = PORTS.get_ptr_mut(&ingress) {
        unsafe {
            let i = (*p).mac_count as usize;
            if i < PORT_MACS {
                (*p).macs[i & (PORT_MACS - 1)] = mac;
                (*p).mac_count = i as u8 + 1;
            }
        }
    }
    None
}

/// IPv4: DHCP server messages; a guarded port's DHCP requests name its own
/// MAC (else a guest could release or decline a neighbour's lease, or drain
/// the pool); and (`ip_guard`) the source binding.
#[inline(always)]
fn ipv4(
    port: &PortConfig,
    data: usize,
    data_end: usize,
    off: usize,
    guarded: bool,
    ip_guard: bool,
    src: &[u8; 6],
) -> Option<DropReason> {
    let Some(ip) = parse::ipv4(data, data_end, off) else {
        // Too short for an IPv4 header, or not one.
        return ip_guard.then_some(DropReason::Malformed);
    };
    let saddr = ip.saddr;
    if ip.proto == IPPROTO_UDP && ip.is_first_fragment() {
        // hlen <= 60: the mask shows the verifier what the parser checked.
        let l4 = off + (ip.hlen & 0x3c);
        // An untrusted port's UDP header must be readable (tc pulls the
        // headers into the linear part first): no guessing past it.
        let Some(udp) = ptr_at::<[u8; 8]>(data, data_end, l4) else {
            return Some(DropReason::Malformed);
        };
        let udp = unsafe { &*udp };
        let sport = u16::from_be_bytes([udp[0], udp[1]]);
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        // A server's message, whatever port it claims to come from.
        if sport == DHCP_SERVER_PORT || dport == DHCP_CLIENT_PORT {
            return Some(DropReason::RogueDhcp);
        }
        if dport == DHCP_SERVER_PORT {
            // UDP (8), then BOOTP: op at 0, chaddr at 28.
            let Some(m) = ptr_at::<[u8; 8 + 34]>(data, data_end, l4) else {
                return Some(DropReason::Malformed);
            };
            let m = unsafe { &*m };
            if m[8] == BOOTREPLY {
                // Aimed at another server or relay.
                return Some(DropReason::RogueDhcp);
            }
            if guarded && [m[36], m[37], m[38], m[39], m[40], m[41]] != *src {
                return Some(DropReason::MacSpoof);
            }
            if saddr == 0 {
                // A client without an address yet.
                return None;
            }
        }
    }
    if ip_guard && !bound_ip(port, saddr) {
        return Some(DropReason::IpSpoof);
    }
    None
}

/// ARP for IPv4 over Ethernet only, sender MAC = the frame's source, and
/// a sender address that is bound (`ip_guard`) and never the gateway's.
#[inline(always)]
fn arp(
    port: &PortConfig,
    data: usize,
    data_end: usize,
    off: usize,
    src: &[u8; 6],
    ip_guard: bool,
) -> Option<DropReason> {
    let Some(a) = ptr_at::<[u8; 28]>(data, data_end, off) else {
        return Some(DropReason::Malformed);
    };
    let a = unsafe { &*a };
    if a[0] != 0 || a[1] != 1 || a[2] != 8 || a[3] != 0 || a[4] != 6 || a[5] != 4 {
        return Some(DropReason::ArpSpoof);
    }
    if [a[8], a[9], a[10], a[11], a[12], a[13]] != *src {
        return Some(DropReason::ArpSpoof);
    }
    let spa = u32::from_ne_bytes([a[14], a[15], a[16], a[17]]);
    if spa == 0 {
        // Address probe (RFC 5227).
        return None;
    }
    if ip_guard && !bound_ip(port, spa) {
        return Some(DropReason::ArpSpoof);
    }
    if maps::net(port.net_id).is_some_and(|n| n.gw_ip != 0 && n.gw_ip == spa) {
        return Some(DropReason::ArpSpoof);
    }
    None
}

/// Where a guarded port's NS/NA must end, counted from the frame's start:
/// what tc makes linear for the guards (`GUARD_PULL_LEN`).
pub const ND_MAX_END: usize = 256;
/// Options of 8 bytes or more that fit there after the NS/NA header.
const ND_MAX_OPTIONS: usize = (ND_MAX_END - 14 - 40 - 24) / 8 + 1;

/// IPv6: router advertisements, redirects and DHCPv6 server messages are
/// a router's and a server's to send; with `ip_guard`, sources are
/// link-local (or unspecified, for DAD) only. Neighbour discovery from a
/// guarded port (ND inspection) names the frame's own MAC and, with
/// `ip_guard`, advertises link-local targets only.
#[inline(always)]
fn ipv6(
    data: usize,
    data_end: usize,
    off: usize,
    guarded: bool,
    ip_guard: bool,
    src: &[u8; 6],
) -> Option<DropReason> {
    let Some(h) = ptr_at::<[u8; 40]>(data, data_end, off) else {
        return Some(DropReason::Malformed);
    };
    let h = unsafe { &*h };
    if ip_guard {
        let unspecified = h[8..24].iter().all(|b| *b == 0);
        let link_local = h[8] == 0xfe && h[9] & 0xc0 == 0x80;
        if !unspecified && !link_local {
            return Some(DropReason::IpSpoof);
        }
    }
    // Look through a few extension headers: an RA hidden behind options
    // or in a first fragment is still an RA (RFC 7113).
    let mut next = h[6];
    let mut l4 = off + 40;
    for _ in 0..3 {
        if next != IPV6_HOPOPTS
            && next != IPV6_DSTOPTS
            && next != IPV6_ROUTING
            && next != IPV6_FRAGMENT
        {
            break;
        }
        let Some(e) = ptr_at::<[u8; 4]>(data, data_end, l4) else {
            return Some(DropReason::Malformed);
        };
        let e = unsafe { &*e };
        if next == IPV6_FRAGMENT {
            if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                // Not the first fragment: no upper-layer header here.
                return None;
            }
            l4 += 8;
        } else {
            l4 += (e[1] as usize + 1) * 8;
        }
        next = e[0];
    }
    match next {
        IPPROTO_ICMPV6 => {
            // Type, code, checksum: read whole (a one-byte read at a
            // variable offset loses its bounds check to the optimiser).
            let Some(t) = ptr_at::<[u8; 4]>(data, data_end, l4) else {
                return Some(DropReason::Malformed);
            };
            let t = unsafe { (*t)[0] };
            if t == ND_ROUTER_ADVERT || t == ND_REDIRECT {
                return Some(DropReason::RogueRa);
            }
            if !guarded || (t != ND_NEIGHBOR_SOLICIT && t != ND_NEIGHBOR_ADVERT) {
                return None;
            }
            // Header (4), reserved/flags (4), target (16), then options.
            let Some(nd) = ptr_at::<[u8; 24]>(data, data_end, l4) else {
                return Some(DropReason::Malformed);
            };
            let nd = unsafe { &*nd };
            let target_link_local = nd[8] == 0xfe && nd[9] & 0xc0 == 0x80;
            if t == ND_NEIGHBOR_ADVERT && ip_guard && !target_link_local {
                return Some(DropReason::ArpSpoof);
            }
            // Every link-layer address option, wherever in the list, must
            // name the frame's own MAC. The whole message lies within the
            // bytes tc makes linear (no NS/NA needs more), so every option
            // is read and none hides past them.
            let end = off + 40 + u16::from_be_bytes([h[4], h[5]]) as usize;
            if end > ND_MAX_END {
                return Some(DropReason::Malformed);
            }
            let mut o = l4 + 24;
            for _ in 0..ND_MAX_OPTIONS {
                if o + 8 > end {
                    return None;
                }
                let Some(opt) = ptr_at::<[u8; 8]>(data, data_end, o) else {
                    // Shorter than its IPv6 payload length says.
                    return Some(DropReason::Malformed);
                };
                let opt = unsafe { &*opt };
                if opt[1] == 0 {
                    return Some(DropReason::Malformed);
                }
                let ll = opt[0] == ND_OPT_SOURCE_LL || opt[0] == ND_OPT_TARGET_LL;
                if ll && [opt[2], opt[3], opt[4], opt[5], opt[6], opt[7]] != *src {
                    return Some(DropReason::ArpSpoof);
                }
                o += opt[1] as usize * 8;
            }
            None
        }
        IPPROTO_UDP => {
            let Some(udp) = ptr_at::<[u8; 4]>(data, data_end, l4) else {
                return Some(DropReason::Malformed);
            };
            let udp = unsafe { &*udp };
            let sport = u16::from_be_bytes([udp[0], udp[1]]);
            let dport = u16::from_be_bytes([udp[2], udp[3]]);
            (sport == DHCP6_SERVER_PORT || dport == DHCP6_CLIENT_PORT)
                .then_some(DropReason::RogueDhcp)
        }
        // Extension headers beyond what we look through: a guest has no
        // business hiding a packet that deep.
        IPV6_HOPOPTS | IPV6_DSTOPTS | IPV6_ROUTING | IPV6_FRAGMENT => Some(DropReason::RogueRa),
        _ => None,
    }
}

/// The address a DHCP server handed out, for ARP suppression.
#[inline(always)]
fn snoop_neigh(net_id: u32, vid: u16, ip: u32, mac: [u8; 6], owner: u32) {
    let key = NeighKey {
        net_id,
        vid,
        _pad: 0,
        ip,
    };
    let entry = NeighEntry {
        mac,
        _pad: 0,
        ifindex: owner,
    };
    let _ = NEIGH.insert(&key, &entry, 0);
}

/// DHCP snooping: a server's reply (from a trusted port) binds the address
/// it hands out to the port that owns the client's MAC. OFFERs bind too:
/// the server chose that address for that MAC; the daemon forgets
/// bindings with the port.
#[inline(always)]
fn snoop_dhcp(net_id: u32, vid: u16, data: usize, data_end: usize, l3: &L3, tc: bool) {
    if l3.ethertype != parse::ETH_P_IPV4 {
        return;
    }
    let Some(ip) = parse::ipv4(data, data_end, l3.off) else {
        return;
    };
    if ip.hlen != parse::IPV4_HLEN || ip.proto != IPPROTO_UDP {
        return;
    }
    // UDP (8) then BOOTP up to chaddr: op(1) .. yiaddr at 16, chaddr at 28.
    let Some(m) = ptr_at::<[u8; 8 + 34]>(data, data_end, l3.off + 20) else {
        return;
    };
    let m = unsafe { &*m };
    if u16::from_be_bytes([m[0], m[1]]) != DHCP_SERVER_PORT
        || u16::from_be_bytes([m[2], m[3]]) != DHCP_CLIENT_PORT
        || m[8] != BOOTREPLY
    {
        return;
    }
    let yiaddr = u32::from_ne_bytes([m[24], m[25], m[26], m[27]]);
    if yiaddr == 0 {
        return;
    }
    let key = owner_key(net_id, [m[36], m[37], m[38], m[39], m[40], m[41]]);
    let Some(owner) = (unsafe { MAC_OWNERS.get(&key) }).copied() else {
        return;
    };
    // ARP suppression answers for the address from now on (tc only: the
    // XDP hook's verifier budget is spent; DHCP replies reach guests from
    // the gateway port, which runs tc).
    if tc {
        snoop_neigh(
            net_id,
            vid,
            yiaddr,
            [m[36], m[37], m[38], m[39], m[40], m[41]],
            owner,
        );
    }
    let Some(p) = PORTS.get_ptr_mut(&owner) else {
        return;
    };
    unsafe {
        if (*p).flags & PORT_F_GUARDED == 0 || bound_ip(&*p, yiaddr) {
            return;
        }
        // Round-robin over the slots the daemon's own bindings leave.
        let fixed = (*p).ip_fixed as usize;
        if fixed >= PORT_IPS {
            return;
        }
        let mut i = (*p).ip_next as usize;
        if i < fixed || i >= PORT_IPS {
            i = fixed;
        }
        (*p).ips[i & (PORT_IPS - 1)] = yiaddr;
        (*p).ip_next = (i + 1) as u8;
        if ((*p).ip_count as usize) < PORT_IPS {
            (*p).ip_count += 1;
        }
    }
}
