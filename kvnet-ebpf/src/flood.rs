//! Floods in tc: clone-redirect to every member of a (network, VLAN), up to
//! MAX_FLOOD_PORTS of them, walked with `bpf_loop` so the verifier checks
//! one member's step once however large the set is.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_SHOT},
    helpers::{bpf_clone_redirect, bpf_loop},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use kvnet_common::{FloodSet, FLOOD_M_IFINDEX, FLOOD_M_ISOLATED, MAX_FLOOD_PORTS};

use crate::{maps, stats, vlan::tc_retag};

/// Scratch slot for the tc flood's arguments (see `tc_flood`).
#[map(name = "flood_scratch")]
pub static FLOOD_SCRATCH: PerCpuArray<FloodArgs> = PerCpuArray::with_max_entries(1, 0);

/// What the flood needs, passed through a per-CPU scratch slot.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct FloodArgs {
    pub net_id: u32,
    pub vid: u32,
    pub ingress: u32,
    pub hairpin: u32,
    /// The ingress port is isolated: isolated members are skipped.
    pub isolated: u32,
    pub len: u32,
    pub tagged: u32,
    pub cur_tci: u32,
    pub out_tci: u32,
    pub second_start: u32,
    pub second_len: u32,
}

impl FloodArgs {
    /// An untagged frame of VLAN 0 from a port that is neither isolated
    /// nor hairpin (an uplink's host frames, the overlay's).
    #[inline(always)]
    pub fn untagged(net_id: u32, ingress: u32, len: u32) -> Self {
        FloodArgs {
            net_id,
            vid: 0,
            ingress,
            hairpin: 0,
            isolated: 0,
            len,
            tagged: 0,
            cur_tci: 0,
            out_tci: 0,
            second_start: 0,
            second_len: 0,
        }
    }
}

/// One walk over a range of a flood set: `bpf_loop`'s context, on the
/// caller's stack.
#[repr(C)]
struct Walk {
    skb: *mut __sk_buff,
    set: *const FloodSet,
    start: u32,
    ingress: u32,
    hairpin: u32,
    isolated: u32,
    len: u32,
    _pad: u32,
}

/// One member: clone-redirect unless it is the ingress port (without
/// hairpin) or both ends are isolated.
#[inline(never)]
extern "C" fn flood_member(i: u64, ctx: *mut c_void) -> i64 {
    let w = unsafe { &*(ctx as *const Walk) };
    // The mask shows the verifier the index in bounds; the daemon keeps
    // start + count <= MAX_FLOOD_PORTS.
    let idx = (w.start as u64).wrapping_add(i) as usize & (MAX_FLOOD_PORTS - 1);
    let member = unsafe { (*w.set).members[idx] };
    let egress = member & FLOOD_M_IFINDEX;
    if egress == w.ingress && w.hairpin == 0 {
        return 0;
    }
    if member & FLOOD_M_ISOLATED != 0 && w.isolated != 0 {
        return 0;
    }
    if unsafe { bpf_clone_redirect(w.skb, egress, 0) } == 0 {
        stats::tx(egress, w.len as u64);
    }
    0
}

/// Clone-redirects to members [start, start + n) of `set`.
#[inline(always)]
fn flood_range(ctx: &TcContext, set: &FloodSet, start: usize, n: usize, a: &FloodArgs) {
    let mut walk = Walk {
        skb: ctx.skb.skb as *mut _,
        set: set as *const FloodSet,
        start: start as u32,
        ingress: a.ingress,
        hairpin: a.hairpin,
        isolated: a.isolated,
        len: a.len,
        _pad: 0,
    };
    unsafe {
        bpf_loop(
            n as u32,
            flood_member as *mut c_void,
            &mut walk as *mut Walk as *mut c_void,
            0,
        )
    };
}

/// Clone-redirects the frame to every member of its (network, VLAN) flood
/// set: untagged members first, then the last `set.tagged` ones tagged. The
/// group matching the frame's tag state goes first, so the tag changes at
/// most once, between the groups.
///
/// The arguments go through a map slot: the verifier then sees the same
/// (unknown) values whichever way `decide` got here, and checks the walk
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
    let count = (set.count as usize).min(MAX_FLOOD_PORTS);
    let split = count - (set.tagged as usize).min(count);
    let tagged_first = a.tagged != 0;
    let (first, second) = if tagged_first {
        ((split, count - split), (0, split))
    } else {
        ((0, split), (split, count - split))
    };
    // The second group's bounds go through the slot too: each exit of the
    // first walk then reaches the second with the same verifier state.
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
