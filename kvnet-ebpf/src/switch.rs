//! The switching decision, written once and executed by both hooks.
use kvnet_common::{
    DropReason, FloodKey, PortConfig, ETH_P_8021Q, FDB_F_HOST, NET_F_CLOSED, NET_F_NAT,
    PORT_F_GUARDED, PORT_F_HAIRPIN, PORT_F_ROUTED_NET, PORT_F_TRUSTED, PORT_F_UPLINK_NAT,
    PORT_F_UPLINK_ROUTED, VLAN_MODE_NONE, VLAN_MODE_TRUNK, VLAN_M_TAGGED, VLAN_VID_MASK,
};

pub use crate::vlan::Tag;
use crate::{
    fdb, guard, maps, parse,
    route::{self, L3Ctx},
    stats,
};

pub enum Action {
    /// Not kvnet's business: let the host stack have it.
    Pass,
    Drop(DropReason),
    /// Send out of this port (ifindex, its port flags, the TCI it must
    /// carry or None for untagged).
    Unicast(u32, u32, Option<u16>),
    /// Send to every port of this flood domain except the ingress one;
    /// tagged members get this TCI.
    Flood(FloodKey, u16),
    /// Routed in the fast path (frame already rewritten): send out of
    /// this interface.
    Route(u32),
    /// Deliver up this interface's host stack (a bridged uplink's).
    ToHost(u32),
    /// IPv4 from a guest of this NAT network to its gateway: tc translates
    /// and routes it (see `nat::from_guest`).
    NatOut(u32),
    /// Arrived on a NAT uplink: replies, port forwards, ICMP errors.
    NatIn,
}

/// The VLAN a frame belongs to on ingress, or why it is dropped.
#[inline(always)]
fn classify(ingress: u32, port: &PortConfig, tag: &Tag) -> Result<u16, DropReason> {
    if tag.present() && tag.tpid != ETH_P_8021Q {
        return Err(DropReason::Qinq);
    }
    let vid = tag.tci & VLAN_VID_MASK;
    if !tag.present() || vid == 0 {
        // Untagged or priority-tagged.
        if port.vlan_mode == VLAN_MODE_TRUNK && port.native_vid == 0 {
            return Err(DropReason::VlanUntagged);
        }
        return Ok(port.pvid);
    }
    if port.vlan_mode != VLAN_MODE_TRUNK {
        return Err(DropReason::VlanNotAllowed);
    }
    match maps::vlan_member(ingress, vid) {
        Some(_) => Ok(vid),
        None => Err(DropReason::VlanNotAllowed),
    }
}

/// Where a routed packet goes once the FIB has chosen `fib.ifindex`: a
/// kvnet gateway interface leads into that network, straight to the
/// guest's port when its MAC is known; anything else is the egress itself.
/// A closed (NAT, host-only) network takes nothing routed in.
#[inline(always)]
fn routed_to(fib: &route::Fib) -> Result<u32, DropReason> {
    if let Some(net_id) = maps::gw_host_net(fib.ifindex) {
        let n = maps::net(net_id);
        if n.is_some_and(|n| n.flags & NET_F_CLOSED != 0) {
            return Err(DropReason::ForeignNet);
        }
        let vid = n.map_or(0, |n| n.gw_vid);
        if let Some(port) = fdb::lookup(net_id, vid, fib.dmac) {
            return Ok(port);
        }
    }
    Ok(fib.ifindex)
}

/// A routed network's uplink: traffic for a guest subnet is routed to the
/// guest in the fast path, everything else goes to the host untouched.
#[inline(always)]
pub fn from_routed_uplink(
    ingress: u32,
    data: usize,
    data_end: usize,
    tag: &Tag,
    l3: Option<L3Ctx>,
) -> Action {
    let Some(l3c) = l3 else { return Action::Pass };
    if !l3c.to_us || tag.present() {
        return Action::Pass;
    }
    let Some(eth) = parse::eth(data, data_end) else {
        return Action::Pass;
    };
    if eth.ethertype != parse::ETH_P_IPV4 {
        return Action::Pass;
    }
    let Some(fib) = route::lookup_v4(&l3c, data, data_end, parse::ETH_HLEN, ingress) else {
        return Action::Pass;
    };
    if maps::gw_host_net(fib.ifindex).is_none() {
        return Action::Pass;
    }
    let egress = match routed_to(&fib) {
        Ok(e) => e,
        Err(r) => return Action::Drop(r),
    };
    if !route::rewrite_v4(data, data_end, parse::ETH_HLEN, &fib) {
        return Action::Pass;
    }
    stats::routed(ingress);
    Action::Route(egress)
}

#[inline(always)]
pub fn decide(
    ingress: u32,
    port: &PortConfig,
    data: usize,
    data_end: usize,
    tag: &Tag,
    l3: Option<L3Ctx>,
) -> Action {
    if port.flags & PORT_F_UPLINK_ROUTED != 0 {
        if port.flags & PORT_F_UPLINK_NAT != 0 && !tag.present() && l3.is_some_and(|c| c.to_us) {
            return Action::NatIn;
        }
        return from_routed_uplink(ingress, data, data_end, tag, l3);
    }
    let Some(eth) = parse::eth(data, data_end) else {
        return Action::Drop(DropReason::Malformed);
    };
    if parse::is_multicast(&eth.src) || parse::is_zero(&eth.src) {
        return Action::Drop(DropReason::BadSrcMac);
    }
    let vid = match classify(ingress, port, tag) {
        Ok(v) => v,
        Err(r) => return Action::Drop(r),
    };
    let hdr = parse::l3(data, data_end, &eth, tag.in_packet);
    if guard::is_tag(hdr.ethertype) {
        // A tag behind the one classified (or behind none): a VLAN hop.
        return Action::Drop(DropReason::DoubleTag);
    }
    if let Some(r) = guard::check(ingress, port, data, data_end, &eth, &hdr, vid) {
        return Action::Drop(r);
    }
    // Tagged egress keeps the PCP and DEI bits a trusted or unguarded port
    // sent; a guarded guest (access or trunk) gets no say in the priority.
    let keep = if port.flags & PORT_F_TRUSTED != 0 || port.flags & PORT_F_GUARDED == 0 {
        !VLAN_VID_MASK
    } else {
        0
    };
    let out_tci = (tag.tci & keep) | vid;
    let net_id = port.net_id;
    fdb::learn(
        net_id,
        vid,
        eth.src,
        ingress,
        port.flags & PORT_F_GUARDED == 0,
    );

    let flood = Action::Flood(
        FloodKey {
            net_id,
            vid,
            _pad: 0,
        },
        out_tci,
    );
    if parse::is_multicast(&eth.dst) {
        return flood;
    }
    // Routed networks: IPv4 to the gateway MAC goes through the FIB (tc
    // only: XDP hands these to tc on its way to the gateway port).
    // (The gateway's VLAN only; the frame is untagged in the packet here:
    // access ports, or tc with the tag already in skb metadata.)
    if port.flags & PORT_F_ROUTED_NET != 0 && eth.ethertype == parse::ETH_P_IPV4 {
        if let (Some(l3c), Some(n)) = (l3, maps::net(net_id).filter(|n| n.gw_vid == vid)) {
            if eth.dst == n.gw_mac && n.flags & NET_F_NAT != 0 {
                return Action::NatOut(net_id);
            }
            if eth.dst == n.gw_mac {
                if let Some(fib) =
                    route::lookup_v4(&l3c, data, data_end, parse::ETH_HLEN, n.gw_host)
                {
                    let egress = match routed_to(&fib) {
                        Ok(e) => e,
                        Err(r) => return Action::Drop(r),
                    };
                    if route::rewrite_v4(data, data_end, parse::ETH_HLEN, &fib) {
                        stats::routed(ingress);
                        return Action::Route(egress);
                    }
                }
            }
        }
    }
    let Some((egress, fdb_flags)) = fdb::lookup_entry(net_id, vid, eth.dst) else {
        return flood;
    };
    if fdb_flags & FDB_F_HOST != 0 {
        // The host's own MAC on a bridged uplink.
        return if egress == ingress {
            Action::Pass
        } else {
            Action::ToHost(egress)
        };
    }
    if egress == ingress && port.flags & PORT_F_HAIRPIN == 0 {
        return Action::Drop(DropReason::Hairpin);
    }
    // Never forward into another network or VLAN, even if the FDB is stale.
    let Some(p) = maps::port(egress) else {
        return Action::Drop(DropReason::StalePort);
    };
    if p.net_id != net_id {
        return Action::Drop(DropReason::StalePort);
    }
    // Ports without VLAN config are untagged members of VLAN 0 only: no
    // lookup for them.
    if p.vlan_mode == VLAN_MODE_NONE {
        return if vid == 0 {
            Action::Unicast(egress, p.flags, None)
        } else {
            Action::Drop(DropReason::StalePort)
        };
    }
    match maps::vlan_member(egress, vid) {
        Some(f) if f & VLAN_M_TAGGED != 0 => Action::Unicast(egress, p.flags, Some(out_tci)),
        Some(_) => Action::Unicast(egress, p.flags, None),
        None => Action::Drop(DropReason::StalePort),
    }
}
