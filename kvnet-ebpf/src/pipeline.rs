//! A frame's whole fate, top-down, written once and run by both hooks:
//!
//! 1. [`decide`]: uplinks of routed/NAT networks go to [`from_uplink`];
//!    everything else is
//! 2. [`admit`]ted (Ethernet header, source MAC, VLAN by [`classify`],
//!    double tags, port security), then
//! 3. [`learn`]ed (its source MAC), then
//! 4. [`forward`]ed: flood, NAT, route, or the FDB's port ([`to_port`]).
//!
//! Each stage returns the frame's [`Verdict`] or hands it on; the hooks
//! (`main.rs`) carry the verdict out.
use kvnet_common::{
    DropReason, FloodKey, PortConfig, ETH_P_8021Q, FDB_F_HOST, NET_F_CLOSED, NET_F_NAT, NET_F_NAT6,
    PORT_F_GUARDED, PORT_F_HAIRPIN, PORT_F_ISOLATED, PORT_F_ROUTED_NET, PORT_F_TRUSTED,
    PORT_F_UPLINK_NAT, PORT_F_UPLINK_ROUTED, VLAN_MODE_NONE, VLAN_MODE_TRUNK, VLAN_M_TAGGED,
    VLAN_VID_MASK,
};

pub use crate::vlan::Tag;
use crate::{
    fdb, guard, maps, neigh,
    parse::{self, Eth},
    route::{self, L3Ctx},
    stats, vxlan,
};

/// What becomes of a frame.
pub enum Verdict {
    /// Not kvnet's business: let the host stack have it.
    Pass,
    Drop(DropReason),
    /// Send out of `egress` (whose port flags are `egress_flags`) carrying
    /// the TCI `out_tci`, or untagged.
    Unicast {
        egress: u32,
        egress_flags: u32,
        out_tci: Option<u16>,
    },
    /// Send to every port of the flood domain but the ingress one; tagged
    /// members get `out_tci`.
    Flood {
        domain: FloodKey,
        out_tci: u16,
    },
    /// Routed in the fast path (the frame already rewritten): out of `egress`.
    Route {
        egress: u32,
    },
    /// Up this interface's host stack (a bridged uplink's).
    ToHost {
        uplink: u32,
    },
    /// IPv4 from a guest of this NAT network to its gateway (and IPv6 of a
    /// NAT66 one): tc translates and routes it (`nat::from_guest`,
    /// `nat6::from_guest`).
    NatOut {
        net_id: u32,
    },
    /// Arrived on a NAT uplink: replies, port forwards, ICMP errors (tc,
    /// `nat::from_uplink`; what NAT declines comes back to [`from_uplink`]).
    NatIn,
    /// An ARP request kvnet knows the answer to: tc turns the frame into
    /// the reply (ARP at `arp_off`) and sends it back out of the ingress.
    ArpReply {
        answer: neigh::Answer,
        arp_off: usize,
    },
}

/// A frame past admission: its Ethernet header, VLAN and the TCI it
/// carries on tagged egress.
struct Admitted {
    eth: Eth,
    vid: u16,
    out_tci: u16,
    /// The L3 header past the tags.
    hdr: parse::L3,
}

/// Stage 1: the frame's fate from its ingress port. `l3` is what the hook
/// allows beyond L2 (tc: routing and NAT; XDP: none, it hands those on).
#[inline(always)]
pub fn decide(
    ingress: u32,
    port: &PortConfig,
    data: usize,
    data_end: usize,
    tag: &Tag,
    l3: Option<L3Ctx>,
) -> Verdict {
    if port.flags & PORT_F_UPLINK_ROUTED != 0 {
        if port.flags & PORT_F_UPLINK_NAT != 0 && !tag.present() && l3.is_some_and(|c| c.to_us) {
            return Verdict::NatIn;
        }
        return from_uplink(ingress, data, data_end, tag, l3);
    }
    let a = match admit(ingress, port, data, data_end, tag, l3.is_some()) {
        Ok(a) => a,
        Err(r) => return Verdict::Drop(r),
    };
    learn(ingress, port, &a);
    forward(ingress, port, data, data_end, &a, l3)
}

/// Stage 2: headers, source MAC, VLAN, double tags, port security.
#[inline(always)]
fn admit(
    ingress: u32,
    port: &PortConfig,
    data: usize,
    data_end: usize,
    tag: &Tag,
    tc: bool,
) -> Result<Admitted, DropReason> {
    let eth = parse::eth(data, data_end).ok_or(DropReason::Malformed)?;
    if parse::is_multicast(&eth.src) || parse::is_zero(&eth.src) {
        return Err(DropReason::BadSrcMac);
    }
    let vid = classify(ingress, port, tag)?;
    let hdr = parse::l3(data, data_end, &eth, tag.in_packet);
    if guard::is_tag(hdr.ethertype) {
        // A tag behind the one classified (or behind none): a VLAN hop.
        return Err(DropReason::DoubleTag);
    }
    if let Some(r) = guard::check(ingress, port, data, data_end, &eth, &hdr, vid, tc) {
        return Err(r);
    }
    // Tagged egress keeps the PCP and DEI bits a trusted or unguarded port
    // sent; a guarded guest (access or trunk) gets no say in the priority.
    let keep = if port.flags & PORT_F_TRUSTED != 0 || port.flags & PORT_F_GUARDED == 0 {
        !VLAN_VID_MASK
    } else {
        0
    };
    Ok(Admitted {
        eth,
        vid,
        out_tci: (tag.tci & keep) | vid,
        hdr,
    })
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

/// Stage 3: the source MAC, learned on the ingress port (bounded per
/// network for ports without port security).
#[inline(always)]
fn learn(ingress: u32, port: &PortConfig, a: &Admitted) {
    fdb::learn(
        port.net_id,
        a.vid,
        a.eth.src,
        ingress,
        port.flags & PORT_F_GUARDED == 0,
    );
}

/// Stage 4: where an admitted frame goes.
#[inline(always)]
fn forward(
    ingress: u32,
    port: &PortConfig,
    data: usize,
    data_end: usize,
    a: &Admitted,
    l3: Option<L3Ctx>,
) -> Verdict {
    let net_id = port.net_id;
    let flood = Verdict::Flood {
        domain: FloodKey {
            net_id,
            vid: a.vid,
            _pad: 0,
        },
        out_tci: a.out_tci,
    };
    if parse::is_multicast(&a.eth.dst) {
        // tc only (`l3`): XDP hands ARP on, and its verifier budget is small.
        if l3.is_some() && a.hdr.ethertype == parse::ETH_P_ARP {
            if let Some(answer) = neigh::answer(
                net_id, a.vid, ingress, port.flags, data, data_end, a.hdr.off,
            ) {
                return Verdict::ArpReply {
                    answer,
                    arp_off: a.hdr.off,
                };
            }
        }
        return flood;
    }
    // (tc only: XDP hands isolated ports' frames to tc.)
    if l3.is_some() && port.flags & PORT_F_ISOLATED != 0 && to_own_subnet(net_id, a, data, data_end)
    {
        // Through the gateway back into its own network: routed or via the
        // host stack, that would reach the isolated ports it must not.
        return Verdict::Drop(DropReason::Isolated);
    }
    // Routed networks: IPv4 to the gateway MAC goes through the FIB (tc
    // only: XDP hands these to tc on its way to the gateway port).
    // (The gateway's VLAN only; the frame is untagged in the packet here:
    // access ports, or tc with the tag already in skb metadata.)
    if port.flags & PORT_F_ROUTED_NET != 0 && a.eth.ethertype == parse::ETH_P_IPV4 {
        if let (Some(l3c), Some(n)) = (l3, maps::net(net_id).filter(|n| n.gw_vid == a.vid)) {
            if a.eth.dst == n.gw_mac && n.flags & NET_F_NAT != 0 {
                return Verdict::NatOut { net_id };
            }
            if a.eth.dst == n.gw_mac {
                if let Some(fib) =
                    route::lookup_v4(&l3c, data, data_end, parse::ETH_HLEN, n.gw_host)
                {
                    let egress = match routed_to(&fib) {
                        Ok(e) => e,
                        Err(r) => return Verdict::Drop(r),
                    };
                    if route::rewrite_v4(data, data_end, parse::ETH_HLEN, &fib) {
                        stats::routed(ingress);
                        return Verdict::Route { egress };
                    }
                }
            }
        }
    }
    // IPv6 to the gateway MAC likewise (NAT networks route IPv6 too, as
    // libvirt's do); what the fast path cannot finish, or what would enter
    // a closed network, is the host's.
    if port.flags & PORT_F_ROUTED_NET != 0 && a.eth.ethertype == parse::ETH_P_IPV6 {
        if let (Some(l3c), Some(n)) = (l3, maps::net(net_id).filter(|n| n.gw_vid == a.vid)) {
            if a.eth.dst == n.gw_mac && n.flags & NET_F_NAT6 != 0 {
                return Verdict::NatOut { net_id };
            }
            if a.eth.dst == n.gw_mac {
                if let Some(egress) = route_v6(&l3c, data, data_end, n.gw_host, true) {
                    stats::routed(ingress);
                    return Verdict::Route { egress };
                }
            }
        }
    }
    let Some((egress, fdb_flags)) = fdb::lookup_entry(net_id, a.vid, a.eth.dst) else {
        return flood;
    };
    if fdb_flags & FDB_F_HOST != 0 {
        // The host's own MAC on a bridged uplink.
        return if egress == ingress {
            Verdict::Pass
        } else {
            Verdict::ToHost { uplink: egress }
        };
    }
    // Isolation in tc only: XDP hands isolated ports' frames to tc.
    let isolated = l3.is_some() && port.flags & PORT_F_ISOLATED != 0;
    to_port(ingress, port, egress, a, isolated, l3)
}

/// The FDB's port for the frame, if it may go there: not back where it came
/// from (unless hairpin), never into another network or VLAN, even with a
/// stale FDB; tagged or not as the egress port's membership says.
#[inline(always)]
fn to_port(
    ingress: u32,
    port: &PortConfig,
    egress: u32,
    a: &Admitted,
    isolated: bool,
    l3: Option<L3Ctx>,
) -> Verdict {
    if egress == ingress && port.flags & PORT_F_HAIRPIN == 0 {
        return Verdict::Drop(DropReason::Hairpin);
    }
    let Some(p) = maps::port(egress) else {
        // No port: a VTEP device (a MAC on another host), which tc alone
        // can send to; XDP cannot tell it from a stale port and hands on.
        return match l3 {
            Some(c) if vxlan::to_remote(c.ctx as *mut _, port.net_id, a.vid, a.eth.dst, egress) => {
                Verdict::Unicast {
                    egress,
                    egress_flags: 0,
                    out_tci: None,
                }
            }
            Some(_) => Verdict::Drop(DropReason::StalePort),
            None => Verdict::Pass,
        };
    };
    if p.net_id != port.net_id {
        return Verdict::Drop(DropReason::StalePort);
    }
    if isolated && p.flags & PORT_F_ISOLATED != 0 {
        return Verdict::Drop(DropReason::Isolated);
    }
    let unicast = |out_tci| Verdict::Unicast {
        egress,
        egress_flags: p.flags,
        out_tci,
    };
    // Ports without VLAN config are untagged members of VLAN 0 only: no
    // lookup for them.
    if p.vlan_mode == VLAN_MODE_NONE {
        return if a.vid == 0 {
            unicast(None)
        } else {
            Verdict::Drop(DropReason::StalePort)
        };
    }
    match maps::vlan_member(egress, a.vid) {
        Some(f) if f & VLAN_M_TAGGED != 0 => unicast(Some(a.out_tci)),
        Some(_) => unicast(None),
        None => Verdict::Drop(DropReason::StalePort),
    }
}

/// IPv4 from an isolated port to its gateway's MAC for another address of
/// its own network.
#[inline(always)]
fn to_own_subnet(net_id: u32, a: &Admitted, data: usize, data_end: usize) -> bool {
    if a.hdr.ethertype != parse::ETH_P_IPV4 {
        return false;
    }
    let Some(n) = maps::net(net_id) else {
        return false;
    };
    if a.eth.dst != n.gw_mac || n.mask == 0 {
        return false;
    }
    let Some(ip) = parse::ipv4(data, data_end, a.hdr.off) else {
        return false;
    };
    ip.daddr & n.mask == n.subnet && ip.daddr != n.gw_ip
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

/// Routes an IPv6 packet that arrived on (or as if on) `from`: its egress,
/// frame rewritten, or None (untouched) for the host stack. Into kvnet's
/// open networks only, or `anywhere` (a guest's packet out).
#[inline(always)]
fn route_v6(l3c: &L3Ctx, data: usize, data_end: usize, from: u32, anywhere: bool) -> Option<u32> {
    let fib = route::lookup_v6(l3c, data, data_end, parse::ETH_HLEN, from)?;
    if !anywhere {
        maps::gw_host_net(fib.ifindex)?;
    }
    let egress = routed_to(&fib).ok()?;
    route::rewrite_v6(data, data_end, parse::ETH_HLEN, &fib).then_some(egress)
}

/// Stage 1 for a routed network's uplink (and what NAT declines on a NAT
/// uplink): traffic for a guest subnet is routed to the
/// guest in the fast path, everything else goes to the host untouched.
#[inline(always)]
pub fn from_uplink(
    ingress: u32,
    data: usize,
    data_end: usize,
    tag: &Tag,
    l3: Option<L3Ctx>,
) -> Verdict {
    let Some(l3c) = l3 else { return Verdict::Pass };
    if !l3c.to_us || tag.present() {
        return Verdict::Pass;
    }
    let Some(eth) = parse::eth(data, data_end) else {
        return Verdict::Pass;
    };
    if eth.ethertype == parse::ETH_P_IPV6 {
        // Only into kvnet's networks: the rest is the host's business.
        return match route_v6(&l3c, data, data_end, ingress, false) {
            Some(egress) => {
                stats::routed(ingress);
                Verdict::Route { egress }
            }
            None => Verdict::Pass,
        };
    }
    if eth.ethertype != parse::ETH_P_IPV4 {
        return Verdict::Pass;
    }
    let Some(fib) = route::lookup_v4(&l3c, data, data_end, parse::ETH_HLEN, ingress) else {
        return Verdict::Pass;
    };
    if maps::gw_host_net(fib.ifindex).is_none() {
        return Verdict::Pass;
    }
    let egress = match routed_to(&fib) {
        Ok(e) => e,
        Err(r) => return Verdict::Drop(r),
    };
    if !route::rewrite_v4(data, data_end, parse::ETH_HLEN, &fib) {
        return Verdict::Pass;
    }
    stats::routed(ingress);
    Verdict::Route { egress }
}
