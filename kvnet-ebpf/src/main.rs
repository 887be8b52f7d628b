//! kvnet datapath: one switching core ([`switch::decide`]) run from two hooks.
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
mod maps;
mod parse;
mod stats;
mod switch;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_clone_redirect, bpf_redirect},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use kvnet_common::{DropReason, PORT_F_HAIRPIN, PORT_F_XDP_TX};

use crate::switch::Action;

#[xdp]
pub fn kvnet_xdp(ctx: XdpContext) -> u32 {
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let len = (data_end - data) as u64;
    let Some(port) = maps::port(ingress) else {
        return xdp_action::XDP_PASS;
    };
    stats::seen_xdp(ingress);
    match switch::decide(ingress, &port, data, data_end) {
        Action::Pass | Action::Flood(_) => xdp_action::XDP_PASS,
        Action::Drop(reason) => {
            stats::rx(ingress, len);
            stats::drop(ingress, reason);
            // Off unless the daemon runs with --log-datapath (AYA_LOG_LEVEL).
            debug!(
                &ctx,
                "xdp drop on ifindex {}: reason {}", ingress, reason as u32
            );
            xdp_action::XDP_DROP
        }
        Action::Unicast(egress, egress_flags) => {
            if egress_flags & PORT_F_XDP_TX == 0 {
                return xdp_action::XDP_PASS;
            }
            // A guest with tx checksum offload hands us TCP/UDP frames whose
            // checksum holds only the pseudo-header sum; XDP cannot see that
            // flag and the receiver would drop them, so frames whose L4
            // checksum we cannot vouch for go on to tc, which keeps the skb.
            if !csum::l4_checksum_complete(data, data_end) {
                return xdp_action::XDP_PASS;
            }
            stats::rx(ingress, len);
            let rc = unsafe { bpf_redirect(egress, 0) } as u32;
            if rc == xdp_action::XDP_REDIRECT {
                stats::tx(egress, len);
            } else {
                stats::drop(ingress, DropReason::RedirectFailed);
            }
            rc
        }
    }
}

#[classifier]
pub fn kvnet_tc(ctx: TcContext) -> i32 {
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len() as u64;
    let Some(port) = maps::port(ingress) else {
        return TC_ACT_OK;
    };
    stats::seen_tc(ingress);
    let action = switch::decide(ingress, &port, ctx.data(), ctx.data_end());
    if !matches!(action, Action::Pass) {
        stats::rx(ingress, len);
    }
    match action {
        Action::Pass => TC_ACT_OK,
        Action::Drop(reason) => {
            stats::drop(ingress, reason);
            debug!(
                &ctx,
                "tc drop on ifindex {}: reason {}", ingress, reason as u32
            );
            TC_ACT_SHOT
        }
        Action::Unicast(egress, _) => {
            let rc = unsafe { bpf_redirect(egress, 0) } as i32;
            stats::tx(egress, len);
            rc
        }
        Action::Flood(key) => {
            let Some(set) = maps::flood_set(&key) else {
                return TC_ACT_SHOT;
            };
            stats::flooded(ingress);
            let hairpin = port.flags & PORT_F_HAIRPIN != 0;
            let count = set.count as usize;
            let skb = ctx.skb.skb as *mut _;
            for i in 0..kvnet_common::MAX_FLOOD_PORTS {
                if i >= count {
                    break;
                }
                let egress = set.ifindex[i];
                if egress == ingress && !hairpin {
                    continue;
                }
                if unsafe { bpf_clone_redirect(skb, egress, 0) } == 0 {
                    stats::tx(egress, len);
                }
            }
            // The clones carry the frame; the original has nowhere to go.
            TC_ACT_SHOT
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
