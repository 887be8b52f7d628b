//! kvnet datapath: one pipeline ([`pipeline::decide`]) run from two hooks.
//!
//! * `kvnet_tc` (tc clsact ingress) sees every frame as an skb, so it can
//!   carry GSO super-packets and checksum-offloaded frames, and flood by
//!   clone-redirect.
//! * `kvnet_xdp` runs first where attached; it finishes what it can
//!   (known unicast, drops) and hands the rest (floods) to `kvnet_tc`
//!   with XDP_PASS, so a port with the xdp hook also carries the tc one.
#![no_std]
#![no_main]

mod bench;
mod csum;
mod fdb;
mod flood;
mod guard;
mod maps;
mod nat;
mod parse;
mod pipeline;
mod route;
mod stats;
mod trace;
mod vlan;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_clone_redirect, bpf_redirect},
    macros::xdp,
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use kvnet_common::{
    DropReason, FDB_F_HOST, KVNET_HOST_MARK, PORT_F_BRIDGED_NET, PORT_F_HAIRPIN, PORT_F_TRUSTED,
    PORT_F_UPLINK_BRIDGED, PORT_F_UPLINK_NAT, PORT_F_UPLINK_ROUTED, PORT_F_XDP_TX, TRACE_DROP,
    TRACE_EGRESS, TRACE_FLOOD, TRACE_HOOK_TC, TRACE_HOOK_TC_OUT, TRACE_NAT_IN, TRACE_NAT_OUT,
    TRACE_PASS, TRACE_ROUTE, TRACE_TO_HOST, TRACE_UNICAST, VLAN_MODE_TRUNK,
};

use crate::{
    flood::{tc_flood, FloodArgs},
    pipeline::{Tag, Verdict},
    route::L3Ctx,
    vlan::{tc_retag, xdp_retag},
};

/// Bytes of an untrusted port's frame tc makes linear before the guards
/// look (headers, IPv6 extension headers, DHCP up to chaddr).
const GUARD_PULL_LEN: u32 = 256;

/// bpf_redirect flag: deliver to the device's receive path (its host stack).
const BPF_F_INGRESS: u64 = 1;

#[xdp]
pub fn kvnet_xdp(ctx: XdpContext) -> u32 {
    let (rc, aux) = xdp_act(&ctx);
    // One trace point for the frames XDP finishes (what it passes, tc
    // traces); `aux` is the drop reason or the egress port.
    if rc != xdp_action::XDP_PASS && trace::on() {
        trace::xdp(&ctx, rc, aux);
    }
    rc
}

#[inline(always)]
fn xdp_act(ctx: &XdpContext) -> (u32, u32) {
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let len = (data_end - data) as u64;
    let Some(port) = maps::port(ingress) else {
        return (xdp_action::XDP_PASS, 0);
    };
    stats::seen_xdp(ingress);
    let tag = Tag::of(data, data_end, None);
    // A NIC with rx VLAN offload strips the tag before XDP sees it; only
    // tc can tell an untagged frame on a trunk from a stripped tagged one.
    if port.vlan_mode == VLAN_MODE_TRUNK && !tag.present() {
        return (xdp_action::XDP_PASS, 0);
    }
    // No routing context: routed and host-bound frames go on to tc.
    match pipeline::decide(ingress, &port, data, data_end, &tag, None) {
        Verdict::Pass
        | Verdict::Flood { .. }
        | Verdict::Route { .. }
        | Verdict::ToHost { .. }
        | Verdict::NatOut { .. }
        | Verdict::NatIn => (xdp_action::XDP_PASS, 0),
        Verdict::Drop(reason) => {
            stats::rx(ingress, len);
            stats::drop(ingress, reason);
            // Off unless the daemon runs with --log-datapath (AYA_LOG_LEVEL).
            debug!(
                ctx,
                "xdp drop on ifindex {}: reason {}", ingress, reason as u32
            );
            (xdp_action::XDP_DROP, reason as u32)
        }
        Verdict::Unicast {
            egress,
            egress_flags,
            out_tci,
        } => {
            if egress_flags & PORT_F_XDP_TX == 0 {
                return (xdp_action::XDP_PASS, 0);
            }
            // A guest with tx checksum offload hands us TCP/UDP frames whose
            // checksum holds only the pseudo-header sum; XDP cannot see that
            // flag and the receiver would drop them, so frames whose L4
            // checksum we cannot vouch for go on to tc, which keeps the skb.
            if !csum::l4_checksum_complete(data, data_end) {
                return (xdp_action::XDP_PASS, 0);
            }
            if !xdp_retag(ctx, &tag, out_tci) {
                // No headroom for the tag: tc pushes it instead.
                return (xdp_action::XDP_PASS, 0);
            }
            let len = (ctx.data_end() - ctx.data()) as u64;
            stats::rx(ingress, len);
            let rc = unsafe { bpf_redirect(egress, 0) } as u32;
            if rc == xdp_action::XDP_REDIRECT {
                stats::tx(egress, len);
            } else {
                stats::drop(ingress, DropReason::RedirectFailed);
            }
            (rc, egress)
        }
    }
}

/// The tc entry point, written out instead of `#[classifier]`: the macro's
/// inner function is too big for LLVM to inline, and the outlined copy in
/// `.text` (calling memset there) fails to load. Inlining keeps the whole
/// program in its own section.
#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub fn kvnet_tc(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    tc_main(TcContext::new(skb))
}

#[inline(always)]
fn tc_main(ctx: TcContext) -> i32 {
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len() as u64;
    let Some(port) = maps::port(ingress) else {
        return TC_ACT_OK;
    };
    if unsafe { (*ctx.skb.skb).mark } == KVNET_HOST_MARK {
        // Handed to this uplink's host stack by kvnet itself.
        ctx.set_mark(0);
        return TC_ACT_OK;
    }
    // On receive the kernel has usually moved the outer tag into
    // skb->vlan_tci already; BPF_PROG_RUN and XDP_PASSed frames may not.
    let hw = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.vlan_present != 0).then(|| (u16::from_be(skb.vlan_proto as u16), skb.vlan_tci as u16))
    };
    if port.flags & (PORT_F_TRUSTED | PORT_F_UPLINK_BRIDGED | PORT_F_UPLINK_ROUTED) == 0 {
        // The guards read headers in place: a guest can hand over an skb
        // whose headers lie beyond its linear part (virtio hdr_len).
        let linear = (ctx.data_end() - ctx.data()) as u32;
        if ctx.len() > linear && linear < GUARD_PULL_LEN {
            let _ = ctx.pull_data(ctx.len().min(GUARD_PULL_LEN));
        }
    }
    // Read once: LLVM may otherwise keep `ctx + offset` around, which the
    // verifier refuses to dereference.
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let tag = Tag::of(data, data_end, hw);
    let l3 = unsafe {
        let skb = &*ctx.skb.skb;
        L3Ctx {
            ctx: ctx.skb.skb as *mut _,
            gso_size: skb.gso_size as u16,
            // PACKET_HOST: addressed to this interface's MAC.
            to_us: skb.pkt_type == 0,
        }
    };
    let action = pipeline::decide(ingress, &port, data, data_end, &tag, Some(l3));
    // One counter lookup for "seen" and "received" (the hot path's cost is
    // mostly hash lookups).
    stats::seen_tc_rx(ingress, len, !matches!(action, Verdict::Pass));
    if trace::on() {
        let (code, egress, reason) = match &action {
            Verdict::Pass => (TRACE_PASS, 0, 0),
            Verdict::Drop(r) => (TRACE_DROP, 0, *r as u8 + 1),
            Verdict::Unicast { egress, .. } => (TRACE_UNICAST, *egress, 0),
            Verdict::Flood { .. } => (TRACE_FLOOD, 0, 0),
            Verdict::Route { egress } => (TRACE_ROUTE, *egress, 0),
            Verdict::ToHost { uplink } => (TRACE_TO_HOST, *uplink, 0),
            Verdict::NatOut { .. } => (TRACE_NAT_OUT, 0, 0),
            Verdict::NatIn => (TRACE_NAT_IN, 0, 0),
        };
        let vid = tag.tci & kvnet_common::VLAN_VID_MASK;
        trace::begin_tc(&ctx, TRACE_HOOK_TC, ingress, vid, code, egress, reason);
    }
    let rc = tc_act(&ctx, ingress, len, &port, action, &tag, l3, data, data_end);
    // Looked up again rather than carried: the verifier then checks the
    // verdict paths once, not once per tracing state.
    if trace::on() {
        trace::finish_tc(&ctx, rc);
    }
    rc
}

/// The tc verdict for `action`: redirects, floods, NAT.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tc_act(
    ctx: &TcContext,
    ingress: u32,
    len: u64,
    port: &kvnet_common::PortConfig,
    action: Verdict,
    tag: &Tag,
    l3: L3Ctx,
    data: usize,
    data_end: usize,
) -> i32 {
    let mut cur = tag.present().then_some(tag.tci);
    match action {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop(reason) => {
            stats::drop(ingress, reason);
            debug!(
                &ctx,
                "tc drop on ifindex {}: reason {}", ingress, reason as u32
            );
            TC_ACT_SHOT
        }
        Verdict::Unicast {
            egress, out_tci, ..
        } => {
            if !tc_retag(&ctx, &mut cur, out_tci) {
                stats::drop(ingress, DropReason::RedirectFailed);
                return TC_ACT_SHOT;
            }
            let rc = unsafe { bpf_redirect(egress, 0) } as i32;
            stats::tx(egress, len);
            rc
        }
        Verdict::Route { egress } => {
            stats::tx(egress, len);
            unsafe { bpf_redirect(egress, 0) as i32 }
        }
        Verdict::NatOut { net_id } => {
            let Some(n) = maps::net(net_id) else {
                return TC_ACT_SHOT;
            };
            match nat::from_guest(&ctx, net_id, &n, ingress) {
                nat::Nat::Sent(rc, egress) => {
                    stats::routed(ingress);
                    trace::egress(egress);
                    rc
                }
                nat::Nat::Drop => TC_ACT_SHOT,
                nat::Nat::Refused(reason) => {
                    stats::drop(ingress, reason);
                    TC_ACT_SHOT
                }
                // Not translated: to the gateway, i.e. the host stack.
                nat::Nat::Skip | nat::Nat::ToHost => {
                    stats::tx(n.gw_port, len);
                    unsafe { bpf_redirect(n.gw_port, 0) as i32 }
                }
            }
        }
        Verdict::NatIn => match nat::from_uplink(&ctx, ingress) {
            nat::Nat::Sent(rc, egress) => {
                stats::routed(ingress);
                trace::egress(egress);
                rc
            }
            nat::Nat::Drop | nat::Nat::Refused(_) => TC_ACT_SHOT,
            nat::Nat::Skip | nat::Nat::ToHost => {
                // Not a NAT flow: a routed network's traffic, or the host's.
                // Skip: nat touched nothing, the packet pointers still hold.
                match pipeline::from_uplink(ingress, data, data_end, tag, Some(l3)) {
                    Verdict::Route { egress } => {
                        stats::tx(egress, len);
                        unsafe { bpf_redirect(egress, 0) as i32 }
                    }
                    Verdict::Drop(reason) => {
                        stats::drop(ingress, reason);
                        TC_ACT_SHOT
                    }
                    _ => TC_ACT_OK,
                }
            }
        },
        Verdict::ToHost { uplink } => {
            stats::to_host(ingress);
            ctx.set_mark(KVNET_HOST_MARK);
            unsafe { bpf_redirect(uplink, BPF_F_INGRESS) as i32 }
        }
        Verdict::Flood {
            domain: key,
            out_tci,
        } => {
            stats::flooded(ingress);
            if port.flags & PORT_F_BRIDGED_NET != 0 && key.vid == 0 && cur.is_none() {
                // A bridged network's broadcast also reaches the host stack.
                if let Some(n) = maps::net(key.net_id) {
                    ctx.set_mark(KVNET_HOST_MARK);
                    unsafe { bpf_clone_redirect(ctx.skb.skb as *mut _, n.uplink, BPF_F_INGRESS) };
                    ctx.set_mark(0);
                }
            }
            let rc = tc_flood(
                &ctx,
                FloodArgs {
                    net_id: key.net_id,
                    vid: key.vid as u32,
                    ingress,
                    hairpin: port.flags & PORT_F_HAIRPIN,
                    len: len as u32,
                    tagged: cur.is_some() as u32,
                    cur_tci: cur.unwrap_or(0) as u32,
                    out_tci: out_tci as u32,
                    second_start: 0,
                    second_len: 0,
                },
            );
            if port.flags & PORT_F_UPLINK_BRIDGED != 0 {
                // From the LAN: the original goes on up the host's stack.
                return TC_ACT_OK;
            }
            rc
        }
    }
}

/// tc egress on a bridged uplink: the host's own frames to guests go
/// straight to their ports (and its broadcasts to them too); everything
/// else, guests' frames to the LAN included, leaves untouched.
#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub fn kvnet_tc_out(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    tc_out_main(TcContext::new(skb))
}

#[inline(always)]
fn tc_out_main(ctx: TcContext) -> i32 {
    let rc = tc_out_act(&ctx);
    if trace::on() {
        let uplink = unsafe { (*ctx.skb.skb).ifindex };
        trace::begin_tc(&ctx, TRACE_HOOK_TC_OUT, uplink, 0, TRACE_EGRESS, 0, 0);
        trace::finish_tc(&ctx, rc);
    }
    rc
}

#[inline(always)]
fn tc_out_act(ctx: &TcContext) -> i32 {
    let uplink = unsafe { (*ctx.skb.skb).ifindex };
    let Some(port) = maps::port(uplink) else {
        return TC_ACT_OK;
    };
    if port.flags & PORT_F_UPLINK_NAT != 0 {
        // A NAT uplink: a guest's packet that reached it untranslated
        // (through the host stack) must not leave with the guest's address.
        return nat::guard_uplink(&ctx);
    }
    if port.flags & PORT_F_UPLINK_BRIDGED == 0 || unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return TC_ACT_OK;
    }
    let Some(eth) = parse::eth(ctx.data(), ctx.data_end()) else {
        return TC_ACT_OK;
    };
    let net_id = port.net_id;
    match fdb::lookup_entry(net_id, 0, eth.src) {
        Some((_, flags)) if flags & FDB_F_HOST != 0 => {}
        _ => return TC_ACT_OK,
    }
    let len = ctx.len();
    let egress = if parse::is_multicast(&eth.dst) {
        None
    } else {
        match fdb::lookup_entry(net_id, 0, eth.dst) {
            Some((egress, flags)) if egress != uplink && flags & FDB_F_HOST == 0 => Some(egress),
            // Behind the uplink (or the host's own): the wire has it.
            Some(_) => return TC_ACT_OK,
            // Unknown, as a bridge floods it: to the guests and the wire.
            None => None,
        }
    };
    match egress {
        Some(egress) => {
            stats::tx(egress, len as u64);
            unsafe { bpf_redirect(egress, 0) as i32 }
        }
        None => {
            stats::flooded(uplink);
            tc_flood(
                &ctx,
                FloodArgs {
                    net_id,
                    vid: 0,
                    ingress: uplink,
                    hairpin: 0,
                    len,
                    tagged: 0,
                    cur_tci: 0,
                    out_tci: 0,
                    second_start: 0,
                    second_len: 0,
                },
            );
            TC_ACT_OK
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
