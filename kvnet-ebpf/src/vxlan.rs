//! VXLAN (networks across hosts), tc only: frames for a remote MAC leave
//! through the host's collect_md VXLAN device (the VTEP) with the tunnel key
//! set here (VNI, remote VTEP); what arrives on it joins the network its
//! VNI names ([`ingress`]); floods are replicated to every remote VTEP of
//! the network (head-end replication).
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_tunnel_key, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_clone_redirect, bpf_loop, bpf_redirect, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
    },
    macros::map,
    maps::HashMap,
    programs::TcContext,
};
use kvnet_common::{
    DropReason, FdbKey, VxlanNet, FDB_F_HOST, KVNET_HOST_MARK, MAX_FDB_ENTRIES, MAX_NETWORKS,
    MAX_PORTS, MAX_VTEPS, VLAN_MODE_NONE, VLAN_M_TAGGED,
};

use crate::{
    fdb,
    flood::{tc_flood, FloodArgs},
    guard, maps, parse, stats,
};

/// bpf_redirect flag: deliver to the device's receive path (its host stack).
const BPF_F_INGRESS: u64 = 1;

/// Net id -> its VNI, VTEP device and flood list.
#[map(name = "vxlan_nets")]
pub static VXLAN_NETS: HashMap<u32, VxlanNet> = HashMap::pinned(MAX_NETWORKS, 0);

/// VNI -> the id of the network it carries.
#[map(name = "vxlan_vnis")]
pub static VXLAN_VNIS: HashMap<u32, u32> = HashMap::pinned(MAX_NETWORKS, 0);

/// VTEP device ifindexes (value unused).
#[map(name = "vteps")]
pub static VTEPS: HashMap<u32, u32> = HashMap::pinned(MAX_PORTS, 0);

/// (network, VLAN, MAC) -> the remote VTEP (IPv4, network order) behind a
/// MAC whose FDB entry points at the VTEP device: learned from the outer
/// source, or written by the daemon (static peers' MACs, EVPN).
#[map(name = "fdb_remote")]
pub static FDB_REMOTE: HashMap<FdbKey, u32> = HashMap::pinned(MAX_FDB_ENTRIES, 0);

/// Outer TTL of encapsulated frames.
const TUNNEL_TTL: u8 = 64;

#[inline(always)]
fn tunnel_key(vni: u32, remote: u32, local: u32) -> bpf_tunnel_key {
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    // The helper takes addresses in host order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(remote);
    key.__bindgen_anon_3.local_ipv4 = u32::from_be(local);
    key.tunnel_ttl = TUNNEL_TTL;
    key
}

#[inline(always)]
fn set_key(skb: *mut __sk_buff, key: &mut bpf_tunnel_key) -> bool {
    unsafe {
        bpf_skb_set_tunnel_key(
            skb,
            key as *mut _,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        ) == 0
    }
}

/// A frame decapsulated on VTEP device `ifindex`: switched within the
/// network its VNI names, on a path of its own rather than through the
/// whole pipeline (the tc verifier's budget would not take a second copy of
/// it). What another host sends is its guests' traffic, already admitted
/// there: learned (its source behind the sending VTEP), then to the FDB's
/// port or flooded to this host's ports (never back to the overlay).
#[inline(always)]
pub fn ingress(ctx: &TcContext, ifindex: u32) -> i32 {
    if unsafe { VTEPS.get(&ifindex) }.is_none() {
        return TC_ACT_OK;
    }
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    let got = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb as *mut _,
            &mut key as *mut _,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    let len = ctx.len();
    stats::seen_tc_rx(ifindex, len as u64, true);
    if got != 0 {
        return drop(ifindex, DropReason::Malformed);
    }
    let Some(net_id) = (unsafe { VXLAN_VNIS.get(&key.tunnel_id) }).copied() else {
        return drop(ifindex, DropReason::ForeignNet);
    };
    let Some(eth) = parse::eth(ctx.data(), ctx.data_end()) else {
        return drop(ifindex, DropReason::Malformed);
    };
    // VXLAN networks carry untagged frames (VLAN 0) only.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 || guard::is_tag(eth.ethertype) {
        return drop(ifindex, DropReason::VlanNotAllowed);
    }
    if parse::is_multicast(&eth.src) || parse::is_zero(&eth.src) {
        return drop(ifindex, DropReason::BadSrcMac);
    }
    let remote = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be();
    let at = FdbKey {
        net_id,
        vid: 0,
        mac: eth.src,
    };
    // Written when it changes only (a MAC moved to another host).
    if unsafe { FDB_REMOTE.get(&at) }.is_none_or(|r| *r != remote) {
        let _ = FDB_REMOTE.insert(&at, &remote, 0);
    }
    fdb::learn(net_id, 0, eth.src, ifindex, true);
    let known = if parse::is_multicast(&eth.dst) {
        None
    } else {
        fdb::lookup_entry(net_id, 0, eth.dst)
    };
    let Some((egress, flags)) = known else {
        stats::flooded(ifindex);
        return tc_flood(ctx, FloodArgs::untagged(net_id, ifindex, len));
    };
    if egress == ifindex {
        // Behind another VTEP: that host's business (split horizon).
        return drop(ifindex, DropReason::Hairpin);
    }
    if flags & FDB_F_HOST != 0 {
        // A bridged network's host MAC: up its uplink's stack.
        stats::to_host(ifindex);
        ctx.set_mark(KVNET_HOST_MARK);
        return unsafe { bpf_redirect(egress, BPF_F_INGRESS) as i32 };
    }
    let untagged_member = match maps::port(egress) {
        Some(p) if p.net_id == net_id && p.vlan_mode == VLAN_MODE_NONE => true,
        Some(p) if p.net_id == net_id => {
            maps::vlan_member(egress, 0).is_some_and(|f| f & VLAN_M_TAGGED == 0)
        }
        _ => false,
    };
    if !untagged_member {
        return drop(ifindex, DropReason::StalePort);
    }
    stats::tx(egress, len as u64);
    unsafe { bpf_redirect(egress, 0) as i32 }
}

#[inline(always)]
fn drop(ifindex: u32, reason: DropReason) -> i32 {
    stats::drop(ifindex, reason);
    TC_ACT_SHOT
}

/// Sets the tunnel key for a frame of `net_id` to `dst`, whose FDB entry
/// points at `egress`: true if `egress` is the network's VTEP and the MAC's
/// remote VTEP is known (the caller then redirects to `egress`).
#[inline(always)]
pub fn to_remote(skb: *mut __sk_buff, net_id: u32, vid: u16, dst: [u8; 6], egress: u32) -> bool {
    let Some(n) = (unsafe { VXLAN_NETS.get(&net_id) }) else {
        return false;
    };
    if n.vtep != egress {
        return false;
    }
    let at = FdbKey {
        net_id,
        vid,
        mac: dst,
    };
    let Some(remote) = (unsafe { FDB_REMOTE.get(&at) }) else {
        return false;
    };
    set_key(skb, &mut tunnel_key(n.vni, *remote, n.local_ip))
}

/// `bpf_loop`'s context for [`replicate`], on the caller's stack.
#[repr(C)]
struct Replicas {
    skb: *mut __sk_buff,
    net: *const VxlanNet,
    len: u32,
    _pad: u32,
}

#[inline(never)]
extern "C" fn replicate_one(i: u64, ctx: *mut c_void) -> i64 {
    let r = unsafe { &*(ctx as *const Replicas) };
    let n = unsafe { &*r.net };
    let remote = n.remotes[i as usize & (MAX_VTEPS - 1)];
    if !set_key(r.skb, &mut tunnel_key(n.vni, remote, n.local_ip)) {
        return 1;
    }
    // The VTEP device has no queue: the clone is encapsulated before the
    // next iteration rewrites the (per-CPU) tunnel key.
    if unsafe { bpf_clone_redirect(r.skb, n.vtep, 0) } == 0 {
        stats::tx(n.vtep, r.len as u64);
    }
    0
}

/// A flood of `net_id` from `ingress`: one copy to each remote VTEP of the
/// network, unless it came from the overlay (split horizon: every host
/// floods what it gets to its own ports only).
#[inline(always)]
pub fn replicate(ctx: &TcContext, net_id: u32, ingress: u32, len: u32) {
    let Some(n) = (unsafe { VXLAN_NETS.get(&net_id) }) else {
        return;
    };
    if n.vtep == ingress {
        return;
    }
    let mut r = Replicas {
        skb: ctx.skb.skb as *mut _,
        net: n as *const VxlanNet,
        len,
        _pad: 0,
    };
    let count = (n.count as usize).min(MAX_VTEPS) as u32;
    unsafe {
        bpf_loop(
            count,
            replicate_one as *mut c_void,
            &mut r as *mut Replicas as *mut c_void,
            0,
        )
    };
}
