//! Per-port, per-CPU counters (map `port_stats`); the daemon creates the
//! entry when it adds the port, so a missing entry just means "not ours".
use kvnet_common::{DropReason, PortStats};

use crate::maps::PORT_STATS;

#[inline(always)]
fn with(ifindex: u32, f: impl FnOnce(&mut PortStats)) {
    if let Some(s) = PORT_STATS.get_ptr_mut(&ifindex) {
        f(unsafe { &mut *s });
    }
}

#[inline(always)]
pub fn seen_xdp(ifindex: u32) {
    with(ifindex, |s| s.xdp_seen += 1);
}

/// tc saw the frame, and (`handled`) kvnet received it.
#[inline(always)]
pub fn seen_tc_rx(ifindex: u32, len: u64, handled: bool) {
    with(ifindex, |s| {
        s.tc_seen += 1;
        if handled {
            s.rx_packets += 1;
            s.rx_bytes += len;
        }
    });
}

#[inline(always)]
pub fn rx(ifindex: u32, len: u64) {
    with(ifindex, |s| {
        s.rx_packets += 1;
        s.rx_bytes += len;
    });
}

#[inline(always)]
pub fn tx(ifindex: u32, len: u64) {
    with(ifindex, |s| {
        s.tx_packets += 1;
        s.tx_bytes += len;
    });
}

#[inline(always)]
pub fn flooded(ifindex: u32) {
    with(ifindex, |s| s.flooded += 1);
}

#[inline(always)]
pub fn routed(ifindex: u32) {
    with(ifindex, |s| s.routed += 1);
}

#[inline(always)]
pub fn to_host(ifindex: u32) {
    with(ifindex, |s| s.to_host += 1);
}

#[inline(always)]
pub fn learn_refused(ifindex: u32) {
    with(ifindex, |s| s.learn_refused += 1);
}

#[inline(always)]
pub fn arp_answered(ifindex: u32) {
    with(ifindex, |s| s.arp_answered += 1);
}

#[inline(always)]
pub fn learned(ifindex: u32) {
    with(ifindex, |s| s.learned += 1);
}

#[inline(always)]
pub fn drop(ifindex: u32, reason: DropReason) {
    let i = reason as usize;
    with(ifindex, |s| {
        if i < s.drops.len() {
            s.drops[i] += 1;
        }
    });
}
