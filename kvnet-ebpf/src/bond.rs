//! Uplink groups (kvnet's bonding, `kvnet uplink`): the group device's tc
//! egress sends each frame out of the member(s) its mode picks; a member's
//! tc ingress takes the frame as arrived on the group, so every member is
//! one port (one FDB identity, never flooded back into the group).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_clone_redirect, bpf_redirect},
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use kvnet_common::{
    UplinkGroup, ETH_P_SLOW, FDB_F_HOST, MAX_UPLINK_GROUPS, MAX_UPLINK_MEMBERS, UPLINK_HASH_L3L4,
    UPLINK_MODE_ACTIVE_BACKUP, UPLINK_MODE_BALANCE_RR, UPLINK_MODE_BROADCAST, UPLINK_MODE_LACP,
};

use crate::{fdb, parse, stats};

/// Group device ifindex -> its mode and usable members (the daemon writes
/// it whole when a member's carrier changes: a failover is one update).
#[map(name = "uplink_groups")]
pub static UPLINK_GROUPS: HashMap<u32, UplinkGroup> = HashMap::pinned(MAX_UPLINK_GROUPS, 0);

/// Member ifindex -> its group's ifindex.
#[map(name = "uplink_members")]
pub static UPLINK_MEMBERS: HashMap<u32, u32> =
    HashMap::pinned(MAX_UPLINK_GROUPS * MAX_UPLINK_MEMBERS as u32, 0);

/// balance-rr's turn (per CPU: packets of one flow stay on one CPU, so
/// they still alternate).
#[map(name = "uplink_rr")]
static UPLINK_RR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// What a member's frame is on ingress.
pub enum Member {
    /// Not a member of any group.
    No,
    /// A member: the frame belongs to this group device.
    Of(u32),
    /// A backup member of an active-backup group: nothing comes in there.
    Backup,
}

#[inline(always)]
pub fn member(ifindex: u32) -> Member {
    let Some(group) = (unsafe { UPLINK_MEMBERS.get(&ifindex) }).copied() else {
        return Member::No;
    };
    match unsafe { UPLINK_GROUPS.get(&group) } {
        Some(g) if g.mode == UPLINK_MODE_ACTIVE_BACKUP && g.active != ifindex => Member::Backup,
        Some(g) if g.mode == UPLINK_MODE_LACP && !aggregated(g, ifindex) => Member::Backup,
        _ => Member::Of(group),
    }
}

/// A frame on a member that carries nothing now (backup, not aggregated):
/// dropped, but for LACPDUs.
#[inline(always)]
pub fn backup(ctx: &TcContext) -> i32 {
    match parse::eth(ctx.data(), ctx.data_end()) {
        Some(eth) if eth.ethertype == ETH_P_SLOW => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

/// 802.3ad: whether `ifindex` is in the aggregation (the usable members).
#[inline(always)]
fn aggregated(g: &UplinkGroup, ifindex: u32) -> bool {
    let count = (g.count as usize).min(MAX_UPLINK_MEMBERS);
    let mut found = false;
    for i in 0..MAX_UPLINK_MEMBERS {
        if i < count && g.members[i] == ifindex {
            found = true;
        }
    }
    found
}

/// A member's frame before the pipeline: Some(verdict) if it ends here.
/// LACPDUs go up the member's own stack, where the daemon's socket (bound
/// to slow protocols, so served after tc) takes them and nothing else does.
/// A group no network uses (yet) hands everything to its host stack. A
/// frame that came back in on one member after kvnet sent it out of
/// another (the LAN flooded it back) is dropped: its source MAC is the
/// host's or lives behind another port of the network, and switching it
/// would move the MAC onto the group and deliver the frame twice.
#[inline(always)]
pub fn admit(ctx: &TcContext, group: u32) -> Option<i32> {
    let Some(eth) = parse::eth(ctx.data(), ctx.data_end()) else {
        return None;
    };
    if eth.ethertype == ETH_P_SLOW {
        return Some(TC_ACT_OK);
    }
    let Some(port) = crate::maps::port(group) else {
        return Some(to_group_host(ctx, group, false));
    };
    let vid = unsafe {
        let skb = &*ctx.skb.skb;
        if skb.vlan_present != 0 {
            skb.vlan_tci as u16 & kvnet_common::VLAN_VID_MASK
        } else {
            0
        }
    };
    match fdb::lookup_entry(port.net_id, vid, eth.src) {
        Some((p, flags)) if p != group || flags & FDB_F_HOST != 0 => {
            stats::drop(group, kvnet_common::DropReason::Hairpin);
            Some(TC_ACT_SHOT)
        }
        _ => None,
    }
}

/// tc egress of a group device: out of the member its mode picks (all of
/// them for broadcast): the verdict and the member (0 for none or all).
/// None: `ifindex` is no group.
#[inline(always)]
pub fn out(ctx: &TcContext, ifindex: u32) -> Option<(i32, u32)> {
    let g = unsafe { UPLINK_GROUPS.get(&ifindex) }?;
    let count = (g.count as usize).min(MAX_UPLINK_MEMBERS);
    if count == 0 {
        // No member has carrier: as a bond without slaves, drop.
        stats::drop(ifindex, kvnet_common::DropReason::RedirectFailed);
        return Some((TC_ACT_SHOT, 0));
    }
    let len = ctx.len() as u64;
    let egress = match g.mode {
        UPLINK_MODE_ACTIVE_BACKUP => g.active,
        UPLINK_MODE_BROADCAST => {
            for i in 0..MAX_UPLINK_MEMBERS {
                if i < count && unsafe { bpf_clone_redirect(ctx.skb.skb, g.members[i], 0) } == 0 {
                    stats::tx(g.members[i], len);
                }
            }
            return Some((TC_ACT_SHOT, 0));
        }
        UPLINK_MODE_BALANCE_RR => {
            let turn = UPLINK_RR.get_ptr_mut(0)?;
            let i = unsafe {
                let t = *turn;
                *turn = t.wrapping_add(1);
                t
            };
            nth(g, i as usize % count)
        }
        _ => nth(g, flow_hash(ctx, g.hash) as usize % count),
    };
    if egress == 0 {
        return Some((TC_ACT_SHOT, 0));
    }
    stats::tx(egress, len);
    Some((unsafe { bpf_redirect(egress, 0) } as i32, egress))
}

/// Member `n`, with constant indexes only: LLVM drops a mask after a
/// modulo, and the verifier then refuses the variable offset.
#[inline(always)]
fn nth(g: &UplinkGroup, n: usize) -> u32 {
    let mut out = 0;
    for i in 0..MAX_UPLINK_MEMBERS {
        if i == n {
            out = g.members[i];
        }
    }
    out
}

/// balance-xor's hash, deterministic (as bonding's `xmit_hash_policy`): the
/// same flow always leaves by the same member.
#[inline(always)]
fn flow_hash(ctx: &TcContext, policy: u32) -> u32 {
    let Some(eth) = parse::eth(ctx.data(), ctx.data_end()) else {
        return 0;
    };
    let l2 = u32::from(eth.src[5] ^ eth.dst[5]) | u32::from(eth.src[4] ^ eth.dst[4]) << 8;
    if policy != UPLINK_HASH_L3L4 || eth.ethertype != parse::ETH_P_IPV4 {
        return fold(l2);
    }
    // IPv4: protocol at 9, addresses at 12..20; ports right after the
    // header (fragments past the first hash by addresses only).
    let Ok(ip) = ctx.load::<[u8; 20]>(parse::ETH_HLEN) else {
        return fold(l2);
    };
    let addrs = u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]])
        ^ u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let first_fragment = ip[6] & 0x1f == 0 && ip[7] == 0;
    let ports = if (ip[9] == 6 || ip[9] == 17) && first_fragment && ihl >= 20 {
        ctx.load::<u32>(parse::ETH_HLEN + ihl).unwrap_or(0)
    } else {
        0
    };
    fold(addrs ^ u32::from_be(ports))
}

#[inline(always)]
fn fold(h: u32) -> u32 {
    let h = h ^ (h >> 16);
    h ^ (h >> 8)
}

/// Up the group device's host stack (a member's frame the pipeline passed).
#[inline(always)]
pub fn to_group_host(ctx: &TcContext, group: u32, mark: bool) -> i32 {
    if mark {
        // The group's own tc ingress lets marked frames by.
        ctx.set_mark(kvnet_common::KVNET_HOST_MARK);
    }
    unsafe { bpf_redirect(group, BPF_F_INGRESS) as i32 }
}

/// bpf_redirect flag: deliver to the device's receive path.
const BPF_F_INGRESS: u64 = 1;
