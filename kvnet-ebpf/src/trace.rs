//! `kvnet trace`: per-packet path events into ring buffer `trace`,
//! filtered here by map `trace_cfg`. Off (`enabled == 0`) it costs one
//! array lookup per packet and hook.
//!
//! The event is built in a per-CPU scratch slot: [`begin`] records what
//! the packet looked like on arrival, [`finish`] adds the verdict and the
//! tuple it leaves with, filters, and copies the slot into the ring.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use kvnet_common::{CtKey, TraceEvent, TraceFilter, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

use crate::parse;

#[map(name = "trace_cfg")]
static TRACE_CFG: Array<TraceFilter> = Array::pinned(1, 0);

#[map(name = "trace")]
static TRACE: RingBuf = RingBuf::pinned(256 * 1024, 0);

#[map(name = "trace_scratch")]
static TRACE_SCRATCH: PerCpuArray<TraceEvent> = PerCpuArray::with_max_entries(1, 0);

/// True while someone traces.
#[inline(always)]
pub fn on() -> bool {
    match TRACE_CFG.get(0) {
        Some(f) => unsafe { core::ptr::read_volatile(&f.enabled) != 0 },
        None => false,
    }
}

#[inline(always)]
fn slot() -> Option<*mut TraceEvent> {
    TRACE_SCRATCH.get_ptr_mut(0)
}

/// The IPv4 tuple of a skb whose L3 starts at 14 (zero otherwise).
#[inline(always)]
fn skb_tuple(ctx: &TcContext) -> CtKey {
    let mut k = CtKey::default();
    let Ok(et) = ctx.load::<u16>(12) else {
        return k;
    };
    if u16::from_be(et) != parse::ETH_P_IPV4 {
        return k;
    }
    let Some(ip) = parse::ipv4_skb(ctx, parse::ETH_HLEN) else {
        return k;
    };
    let l4 = parse::ETH_HLEN + ip.hlen;
    k.proto = ip.proto;
    k.saddr = ip.saddr;
    k.daddr = ip.daddr;
    match k.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            k.sport = u16::from_be(ctx.load::<u16>(l4).unwrap_or(0));
            k.dport = u16::from_be(ctx.load::<u16>(l4 + 2).unwrap_or(0));
        }
        IPPROTO_ICMP => {
            k.sport = ctx.load::<u8>(l4).unwrap_or(0) as u16;
            k.dport = u16::from_be(ctx.load::<u16>(l4 + 4).unwrap_or(0));
        }
        _ => {}
    }
    k
}

/// Records a skb's arrival (MACs, tuple) in the scratch slot.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn begin_tc(
    ctx: &TcContext,
    hook: u8,
    ingress: u32,
    vid: u16,
    action: u8,
    egress: u32,
    reason: u8,
) {
    let Some(ev) = slot() else { return };
    let ev = unsafe { &mut *ev };
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.hook = hook;
    ev.ingress = ingress;
    ev.vid = vid;
    ev.action = action;
    ev.egress = egress;
    ev.reason = reason;
    ev.len = ctx.len();
    ev.dst_mac = ctx.load::<[u8; 6]>(0).unwrap_or([0; 6]);
    ev.src_mac = ctx.load::<[u8; 6]>(6).unwrap_or([0; 6]);
    ev.before = skb_tuple(ctx);
}

/// The egress NAT chose (FIB), for the event [`begin_tc`] started.
#[inline(always)]
pub fn egress(ifindex: u32) {
    if !on() {
        return;
    }
    if let Some(ev) = slot() {
        unsafe { (*ev).egress = ifindex };
    }
}

/// Adds the verdict and the tuple the skb leaves with, and emits the
/// event if it passes the filter.
#[inline(always)]
pub fn finish_tc(ctx: &TcContext, rc: i32) {
    let Some(ev) = slot() else { return };
    let ev = unsafe { &mut *ev };
    ev.rc = rc;
    ev.after = skb_tuple(ctx);
    emit(ev);
}

/// A frame XDP finished: dropped (`aux` the DropReason) or redirected
/// (`aux` the egress port). Read from the packet as it leaves.
#[inline(always)]
pub fn xdp(ctx: &XdpContext, rc: u32, aux: u32) {
    let Some(ev) = slot() else { return };
    let ev = unsafe { &mut *ev };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.hook = kvnet_common::TRACE_HOOK_XDP;
    ev.ingress = ingress;
    ev.len = (data_end - data) as u32;
    ev.rc = rc as i32;
    if rc == xdp_action::XDP_DROP {
        ev.action = kvnet_common::TRACE_DROP;
        ev.reason = aux as u8 + 1;
        ev.egress = 0;
    } else {
        ev.action = kvnet_common::TRACE_UNICAST;
        ev.reason = 0;
        ev.egress = aux;
    }
    let mut k = CtKey::default();
    ev.vid = 0;
    if let Some(eth) = parse::eth(data, data_end) {
        ev.dst_mac = eth.dst;
        ev.src_mac = eth.src;
        let tagged = eth.ethertype == kvnet_common::ETH_P_8021Q;
        let tag = crate::vlan::Tag::of(data, data_end, None);
        if tagged {
            ev.vid = tag.tci & kvnet_common::VLAN_VID_MASK;
        }
        let l3 = parse::l3(data, data_end, &eth, tagged);
        if l3.ethertype == parse::ETH_P_IPV4 {
            if let Some(ip) = parse::ipv4(data, data_end, l3.off) {
                k.proto = ip.proto;
                k.saddr = ip.saddr;
                k.daddr = ip.daddr;
            }
        }
    }
    ev.before = k;
    ev.after = k;
    emit(ev);
}

#[inline(always)]
fn emit(ev: &TraceEvent) {
    let Some(f) = TRACE_CFG.get(0) else { return };
    if f.enabled == 0 {
        return;
    }
    if f.ifindex != 0 && f.ifindex != ev.ingress && f.ifindex != ev.egress {
        return;
    }
    if f.proto != 0 && f.proto != ev.before.proto {
        return;
    }
    if f.ip != 0
        && f.ip != ev.before.saddr
        && f.ip != ev.before.daddr
        && f.ip != ev.after.saddr
        && f.ip != ev.after.daddr
    {
        return;
    }
    if f.has_mac != 0 && f.mac != ev.src_mac && f.mac != ev.dst_mac {
        return;
    }
    let _ = TRACE.output::<TraceEvent>(ev, 0);
}
