//! Floods in tc: clone-redirect to every member of a (network, VLAN).
use aya_ebpf::{
    bindings::TC_ACT_SHOT, helpers::bpf_clone_redirect, macros::map, maps::PerCpuArray,
    programs::TcContext,
};
use kvnet_common::FloodSet;

use crate::{maps, stats, vlan::tc_retag};

/// Scratch slot for the tc flood's arguments (see `tc_flood`).
#[map(name = "flood_scratch")]
pub static FLOOD_SCRATCH: PerCpuArray<FloodArgs> = PerCpuArray::with_max_entries(1, 0);

/// What the flood loop needs, passed through a per-CPU scratch slot.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct FloodArgs {
    pub net_id: u32,
    pub vid: u32,
    pub ingress: u32,
    pub hairpin: u32,
    pub len: u32,
    pub tagged: u32,
    pub cur_tci: u32,
    pub out_tci: u32,
    pub second_start: u32,
    pub second_len: u32,
}

/// Clone-redirects to members [start, start + n) of `set`.
#[inline(always)]
fn flood_range(ctx: &TcContext, set: &FloodSet, start: usize, n: usize, a: &FloodArgs) {
    let skb = ctx.skb.skb as *mut _;
    for p in 0..kvnet_common::MAX_FLOOD_PORTS {
        if p >= n {
            break;
        }
        // The mask (MAX_FLOOD_PORTS is a power of two) shows the verifier
        // the index in bounds; the daemon keeps start + n <= count.
        let egress = set.ifindex[start.wrapping_add(p) & (kvnet_common::MAX_FLOOD_PORTS - 1)];
        if egress == a.ingress && a.hairpin == 0 {
            continue;
        }
        if unsafe { bpf_clone_redirect(skb, egress, 0) } == 0 {
            stats::tx(egress, a.len as u64);
        }
    }
}

/// Clone-redirects the frame to every member of its (network, VLAN) flood
/// set: untagged members first, then the last `set.tagged` ones tagged. The group matching the frame's tag state goes first, so the tag
/// changes at most once, between the groups.
///
/// The arguments go through a map slot: the verifier then sees the same
/// (unknown) values whichever way `decide` got here, and checks the loop
/// once instead of once per path.
#[inline(always)]
pub fn tc_flood(ctx: &TcContext, args: FloodArgs) -> i32 {
    let Some(slot) = FLOOD_SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    let a = unsafe {
        core::ptr::write_volatile(slot, args);
        core::ptr::read_volatile(slot)
    };
    let key = kvnet_common::FloodKey {
        net_id: a.net_id,
        vid: a.vid as u16,
        _pad: 0,
    };
    let Some(set) = maps::flood_set(&key) else {
        return TC_ACT_SHOT;
    };
    let out_tci = a.out_tci as u16;
    let mut cur = (a.tagged != 0).then_some(a.cur_tci as u16);
    let count = (set.count as usize).min(kvnet_common::MAX_FLOOD_PORTS);
    let split = count - (set.tagged as usize).min(count);
    let tagged_first = a.tagged != 0;
    let (first, second) = if tagged_first {
        ((split, count - split), (0, split))
    } else {
        ((0, split), (split, count - split))
    };
    // The second group's bounds go through the slot too: each exit of the
    // first loop then reaches the second with the same verifier state.
    unsafe {
        core::ptr::write_volatile(&mut (*slot).second_start, second.0 as u32);
        core::ptr::write_volatile(&mut (*slot).second_len, second.1 as u32);
    }
    if first.1 > 0 {
        if tagged_first && !tc_retag(ctx, &mut cur, Some(out_tci)) {
            return TC_ACT_SHOT;
        }
        flood_range(ctx, set, first.0, first.1, &a);
    }
    let (start, n) = unsafe {
        (
            core::ptr::read_volatile(&(*slot).second_start) as usize,
            core::ptr::read_volatile(&(*slot).second_len) as usize,
        )
    };
    if n > 0 {
        let want = if tagged_first { None } else { Some(out_tci) };
        if !tc_retag(ctx, &mut cur, want) {
            return TC_ACT_SHOT;
        }
        flood_range(ctx, set, start, n, &a);
    }
    // The clones carry the frame; the original has nowhere to go.
    TC_ACT_SHOT
}
